//! The `tollgate` command: serve, validate, explain and usage.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rust_decimal::Decimal;

use tollgate::audit::{AuditConfig, AuditLog};
use tollgate::engine::{Attributes, Estimate};
use tollgate::gate::{CheckInput, Clock, Gate, GateConfig, SystemClock};
use tollgate::policy::{self, parse_duration, Attr};
use tollgate::reload::{self, ReloadConfig, Reloader};
use tollgate::store::{CounterStore, MemoryStore, RedisConfig, RedisStore};
use tollgate::telemetry::{Telemetry, TelemetryConfig};
use tollgate::usage::{UsageReport, UsageRow};

/// glibc's allocator showed up as a fifth of the CPU time of a decision
/// under load; mimalloc's thread-local caches suit tokio's small, short-lived
/// allocations much better.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Keeps AI API spend inside approved budgets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar: native gRPC API and gRPC health on one port.
    Serve(ServeArgs),
    /// Check policy directories; print every error with file:line:column.
    Validate {
        /// Policy directories, read together as one set.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Show which rules a request meets and the decision on an empty store.
    Explain(ExplainArgs),
    /// Show counters against their limits, from a running server or from
    /// Redis directly.
    Usage(UsageArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address of the gRPC listener.
    #[arg(long, env = "TOLLGATE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Policy directory; may be given several times.
    #[arg(
        long = "policies",
        env = "TOLLGATE_POLICIES",
        default_value = "./policies",
        value_delimiter = ','
    )]
    policies: Vec<PathBuf>,
    /// How long an unsettled reservation holds its estimate and slots.
    #[arg(long, env = "TOLLGATE_RESERVATION_TTL", default_value = "10m", value_parser = duration_arg)]
    reservation_ttl: Duration,
    /// Upper bound on any one counter-store call.
    #[arg(long, env = "TOLLGATE_STORE_TIMEOUT_MS", default_value_t = 50)]
    store_timeout_ms: u64,
    /// Redis URL (`redis://` or `rediss://`, with credentials if needed).
    /// Without it, counters live in this process only.
    #[arg(long, env = "TOLLGATE_REDIS_URL")]
    redis: Option<String>,
    /// CA certificate (PEM) that signed the Redis server's TLS certificate.
    #[arg(long, env = "TOLLGATE_REDIS_CA_FILE")]
    redis_ca_file: Option<PathBuf>,
    /// Treat `--redis` as a comma-separated list of Redis Cluster nodes.
    #[arg(long, env = "TOLLGATE_REDIS_CLUSTER")]
    redis_cluster: bool,
    /// Prefix of every Redis key.
    #[arg(long, env = "TOLLGATE_REDIS_PREFIX", default_value = "tollgate:")]
    redis_prefix: String,
    /// Address of the HTTP listener (`/status`).
    #[arg(long, env = "TOLLGATE_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
    /// Start even when the policy directories hold no policy files.
    #[arg(long, env = "TOLLGATE_ALLOW_EMPTY")]
    allow_empty: bool,
    /// Read the policy directories this often even without file events.
    #[arg(long, env = "TOLLGATE_RESCAN_EVERY", default_value = "10s", value_parser = duration_arg)]
    rescan_every: Duration,
    /// Most live counters the embedded store holds.
    #[arg(long, env = "TOLLGATE_MAX_COUNTERS", default_value_t = tollgate::store::memory::DEFAULT_MAX_COUNTERS)]
    max_counters: usize,
    /// Most distinct (rule, scope) pairs given their own metric series and
    /// listed by `/v1/usage`; the rest count as scope="other".
    #[arg(long, env = "TOLLGATE_METRICS_MAX_SCOPES", default_value_t = tollgate::telemetry::DEFAULT_MAX_SCOPES)]
    metrics_max_scopes: usize,
    /// Write one JSON line per decision to this file (`-` for stdout).
    #[arg(long, env = "TOLLGATE_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
    /// Share of decisions written to the audit log, from 0 to 1.
    #[arg(long, env = "TOLLGATE_AUDIT_SAMPLE", default_value_t = 1.0, value_parser = rate_arg)]
    audit_sample: f64,
    /// Write only denials (and failed decisions) to the audit log.
    #[arg(long, env = "TOLLGATE_AUDIT_DENIALS_ONLY")]
    audit_denials_only: bool,
}

#[derive(clap::Args)]
struct UsageArgs {
    /// A running server's HTTP address, such as http://127.0.0.1:8080: lists
    /// every scope it has seen, read from its store now.
    #[arg(long, conflicts_with_all = ["attrs", "api_key"])]
    server: Option<String>,
    /// Read straight from Redis (needs --policies and --attr or --api-key).
    #[arg(long, env = "TOLLGATE_REDIS_URL")]
    redis: Option<String>,
    #[arg(long, env = "TOLLGATE_REDIS_CA_FILE")]
    redis_ca_file: Option<PathBuf>,
    #[arg(long, env = "TOLLGATE_REDIS_CLUSTER")]
    redis_cluster: bool,
    #[arg(long, env = "TOLLGATE_REDIS_PREFIX", default_value = "tollgate:")]
    redis_prefix: String,
    /// Policy directory; may be given several times.
    #[arg(long = "policies", env = "TOLLGATE_POLICIES", value_delimiter = ',')]
    policies: Vec<PathBuf>,
    /// A request attribute, such as team=growth or labels.tier=gold.
    #[arg(long = "attr", value_name = "NAME=VALUE")]
    attrs: Vec<String>,
    /// A raw API key to look up in the key registry (hashed, never printed).
    #[arg(long)]
    api_key: Option<String>,
    /// Only this rule's counters.
    #[arg(long)]
    rule: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn rate_arg(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|r| (0.0..=1.0).contains(r))
        .ok_or_else(|| format!("{s:?} is not a rate between 0 and 1"))
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// Policy directory.
    dir: PathBuf,
    /// A request attribute, such as team=growth or labels.tier=gold.
    #[arg(long = "attr", value_name = "NAME=VALUE")]
    attrs: Vec<String>,
    /// A raw API key to look up in the key registry (hashed, never printed).
    #[arg(long)]
    api_key: Option<String>,
    /// An estimate field: input_tokens, cached_input_tokens, output_tokens,
    /// images, image_quality, video_seconds or audio_seconds.
    #[arg(long = "estimate", value_name = "FIELD=VALUE")]
    estimate: Vec<String>,
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is not a duration such as 30s, 10m or 1h"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { dirs } => validate(&dirs),
        Command::Explain(args) => explain(args),
        Command::Serve(args) => serve(args),
        Command::Usage(args) => usage(args),
    }
}

fn validate(dirs: &[PathBuf]) -> ExitCode {
    match policy::load_dirs(dirs) {
        Ok(p) => {
            println!(
                "ok: {} rules, policy version {}",
                p.rules().len(),
                p.version
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s)", errors.0.len());
            ExitCode::FAILURE
        }
    }
}

fn explain(args: ExplainArgs) -> ExitCode {
    let policy = match policy::load_dirs(std::slice::from_ref(&args.dir)) {
        Ok(p) => p,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let input = match explain_input(&args) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match tollgate::explain::explain(policy, input, SystemClock.now()) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", e.code());
            ExitCode::FAILURE
        }
    }
}

fn explain_input(args: &ExplainArgs) -> Result<CheckInput, String> {
    let attributes = parse_attrs(&args.attrs)?;
    let mut estimate = Estimate::default();
    for pair in &args.estimate {
        let (name, value) = split_pair(pair)?;
        let int = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{name} must be a whole number"))
        };
        let dec = || Decimal::from_str(value).map_err(|_| format!("{name} must be a number"));
        match name {
            "input_tokens" => estimate.input_tokens = Some(int()?),
            "cached_input_tokens" => estimate.cached_input_tokens = Some(int()?),
            "output_tokens" => estimate.output_tokens = Some(int()?),
            "images" => estimate.images = Some(int()?),
            "image_quality" => estimate.image_quality = Some(value.to_string()),
            "video_seconds" => estimate.video_seconds = Some(dec()?),
            "audio_seconds" => estimate.audio_seconds = Some(dec()?),
            other => return Err(format!("unknown estimate field {other:?}")),
        }
    }
    Ok(CheckInput {
        attributes,
        api_key: args.api_key.clone(),
        estimate,
        request_id: None,
    })
}

fn parse_attrs(pairs: &[String]) -> Result<Attributes, String> {
    let mut attributes = Attributes::default();
    for pair in pairs {
        let (name, value) = split_pair(pair)?;
        let attr = Attr::parse(name)
            .filter(|a| *a != Attr::ModelFamily)
            .ok_or_else(|| {
                format!("unknown attribute {name:?}; model_family is derived from the model")
            })?;
        attributes.set(&attr, value.to_string());
    }
    Ok(attributes)
}

fn split_pair(pair: &str) -> Result<(&str, &str), String> {
    pair.split_once('=')
        .ok_or_else(|| format!("{pair:?} is not NAME=VALUE"))
}

fn serve(args: ServeArgs) -> ExitCode {
    init_logging();
    let policy = match reload::load(&args.policies, args.allow_empty) {
        Ok(p) => p,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "refusing to start: {} error(s) in the policies",
                errors.0.len()
            );
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(rules = policy.rules().len(), version = %policy.version, "policies loaded");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let store = match open_store(&args).await {
            Ok(store) => store,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let telemetry = match telemetry(&args) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let gate = Arc::new(
            Gate::new(
                policy,
                store,
                Arc::new(SystemClock),
                GateConfig {
                    reservation_ttl: args.reservation_ttl,
                    store_timeout: Duration::from_millis(args.store_timeout_ms),
                },
            )
            .with_telemetry(telemetry.clone()),
        );
        let reloader = Reloader::new(
            gate.clone(),
            ReloadConfig {
                dirs: args.policies.clone(),
                debounce: reload::DEFAULT_DEBOUNCE,
                rescan_every: args.rescan_every,
                allow_empty: args.allow_empty,
            },
        );
        let grpc = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        let http = match tokio::net::TcpListener::bind(args.http_listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("cannot listen on {}: {e}", args.http_listen);
                return ExitCode::FAILURE;
            }
        };

        let (stop, stopped) = tokio::sync::watch::channel(false);
        let shutdown = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            }
        };
        if let Err(e) = reloader.spawn(shutdown()) {
            tracing::warn!(error = %e, "cannot watch the policy directories; relying on the periodic rescan");
        }
        let http_task = tokio::spawn(tollgate::server::http::serve_http(gate.clone(), reloader.clone(), http, shutdown()));
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop.send(true);
        });
        tracing::info!(grpc = %args.listen, http = %args.http_listen, "serving gRPC");
        let grpc_result = tollgate::server::serve_grpc(gate, reloader, grpc, shutdown()).await;
        let _ = http_task.await;
        if let Some(audit) = telemetry.audit() {
            audit.flush().await;
        }
        match grpc_result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("server error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Metrics (the process-wide Prometheus recorder, with its histograms
/// drained every few seconds) and the audit log, if asked for.
fn telemetry(args: &ServeArgs) -> Result<Arc<Telemetry>, String> {
    let audit = match &args.audit_log {
        Some(path) => Some(
            AuditLog::open(&AuditConfig {
                path: path.clone(),
                sample: args.audit_sample,
                denials_only: args.audit_denials_only,
                queue: tollgate::audit::DEFAULT_QUEUE,
            })
            .map_err(|e| format!("cannot open the audit log {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let telemetry = Arc::new(Telemetry::new(TelemetryConfig {
        max_scopes: args.metrics_max_scopes,
        reservation_ttl: args.reservation_ttl,
        audit,
    }));
    let handle = tollgate::telemetry::install_prometheus()?;
    telemetry.set_prometheus(handle);
    let upkeep = telemetry.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.upkeep();
        }
    });
    Ok(telemetry)
}

/// The embedded store, or Redis with its connections opened (an
/// unreachable Redis is reported, not fatal: rules' failure policies apply
/// until it answers).
async fn open_store(args: &ServeArgs) -> Result<Arc<dyn CounterStore>, String> {
    let Some(url) = &args.redis else {
        return Ok(Arc::new(MemoryStore::new(args.max_counters)));
    };
    let config = RedisConfig {
        prefix: args.redis_prefix.clone(),
        cluster: args.redis_cluster,
        ca_file: args.redis_ca_file.clone(),
        ..RedisConfig::new(url.clone())
    };
    let store = RedisStore::connect(&config)
        .await
        .map_err(|e| e.to_string())?;
    // A handshake takes longer than one decision may: do it now rather than
    // on the first request.
    match tokio::time::timeout(Duration::from_secs(3), store.warm_up()).await {
        Ok(Ok(())) => tracing::info!(prefix = %args.redis_prefix, "counters in Redis"),
        Ok(Err(e)) => tracing::warn!(error = %e, "Redis is not answering yet"),
        Err(_) => tracing::warn!("Redis did not answer within 3 s; continuing"),
    }
    Ok(Arc::new(store))
}

fn usage(args: UsageArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(async {
        match (&args.server, &args.redis) {
            (Some(server), _) => tollgate::usage::fetch(server).await,
            (None, Some(url)) => usage_from_redis(&args, url).await,
            (None, None) => Err("give --server URL, or --redis URL with --policies".to_string()),
        }
    });
    let mut report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(rule) = &args.rule {
        report.counters.retain(|c| &c.rule == rule);
    }
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", tollgate::usage::table(&report.counters));
    }
    ExitCode::SUCCESS
}

/// The counters that apply to `--attr`/`--api-key`, read from Redis
/// through the same gate a server uses.
async fn usage_from_redis(args: &UsageArgs, url: &str) -> Result<UsageReport, String> {
    if args.policies.is_empty() {
        return Err("--redis needs --policies to know the rules".to_string());
    }
    let policy = reload::load(&args.policies, false).map_err(|e| e.to_string())?;
    let attributes = parse_attrs(&args.attrs)?;
    let config = RedisConfig {
        prefix: args.redis_prefix.clone(),
        cluster: args.redis_cluster,
        ca_file: args.redis_ca_file.clone(),
        ..RedisConfig::new(url.to_string())
    };
    let store = RedisStore::connect(&config)
        .await
        .map_err(|e| e.to_string())?;
    let version = policy.version.clone();
    let gate = Gate::new(
        policy,
        Arc::new(store),
        Arc::new(SystemClock),
        GateConfig {
            // A one-off command can wait for a connection to be made.
            store_timeout: Duration::from_secs(5),
            ..GateConfig::default()
        },
    );
    let counters = gate
        .usage(attributes, args.api_key.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    Ok(UsageReport {
        policy_version: version,
        scopes_tracked: None,
        scopes_max: None,
        scopes_overflowed: None,
        counters: counters.iter().map(UsageRow::from).collect(),
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutting down");
}

/// Logs go to stderr; `TOLLGATE_LOG` takes a filter such as `debug` or
/// `tollgate=debug,info`.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
