//! The `tollgate` command: serve, validate, explain, health, usage, and
//! the approval commands.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use rust_decimal::Decimal;

use tollgate::admin_client::{describe_grant, AdminCallError, AdminClient};
use tollgate::alerts::{Dispatcher, DispatcherConfig};
use tollgate::audit::{AuditConfig, AuditLog};
use tollgate::engine::{Attributes, Estimate};
use tollgate::gate::{CheckInput, Clock, Gate, GateConfig, SystemClock};
use tollgate::policy::{self, parse_duration, Attr};
use tollgate::reload::{self, ReloadConfig, Reloader};
use tollgate::server::admin::{AdminApi, AdminToken};
use tollgate::server::health::{self, Readiness};
use tollgate::server::tls::{self, TlsFiles};
use tollgate::server::{AdminListener, ListenerOptions};
use tollgate::shutdown::{self, FlushHooks, Shutdown};
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
    /// Run the sidecar: gRPC (native API, Envoy ext_authz, health) and HTTP.
    Serve(Box<ServeArgs>),
    /// Check policy directories; print every error with file:line:column.
    Validate {
        /// Policy directories, read together as one set.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Show which rules a request meets and the decision on an empty store.
    Explain(ExplainArgs),
    /// Ask a running server's HTTP port whether it is ready; exit 0 if so.
    /// For container health checks (plaintext HTTP only).
    Health(HealthArgs),
    /// Approve a rule for a scope on a running server (needs the admin token).
    Approve(ApproveArgs),
    /// End an approval before its time.
    Revoke(RevokeArgs),
    /// List active approvals and the newest audit entries.
    Approvals(ApprovalsArgs),
    /// Show counters against their limits, from a running server or from
    /// Redis directly.
    Usage(UsageArgs),
}
#[derive(clap::Args)]
struct AdminClientArgs {
    /// The server's HTTP port or admin listener: http://HOST:PORT or
    /// unix:/path/to.sock.
    #[arg(
        long,
        env = "TOLLGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// File holding the admin token; or set TOLLGATE_ADMIN_TOKEN.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// For https://: the CA (PEM) that signed the server's certificate, in
    /// place of the public web roots.
    #[arg(long, env = "TOLLGATE_ADMIN_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// For https://: a client certificate (PEM) to present, for an admin
    /// listener that requires one.
    #[arg(long, env = "TOLLGATE_ADMIN_CLIENT_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The private key (PEM) of `--client-cert`.
    #[arg(long, env = "TOLLGATE_ADMIN_CLIENT_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ApproveArgs {
    #[command(flatten)]
    client: AdminClientArgs,
    /// The rule to approve (`enforcement: approval` or `on_exceed: approval`).
    #[arg(long)]
    rule: String,
    /// The scope, as the rule counts it: team=growth (comma-separated for
    /// several attributes), or all.
    #[arg(long, default_value = "all")]
    scope: String,
    /// Added to the rule's limit while the approval lasts, in its unit
    /// (USD for spend).
    #[arg(long)]
    extra: Option<String>,
    /// How long the approval lasts: 12h, 7d (at most 366d).
    #[arg(long = "for", default_value = "1d")]
    duration: String,
    /// Why; recorded in the audit trail.
    #[arg(long)]
    reason: String,
    /// Who approves; recorded in the audit trail. Defaults to $USER.
    #[arg(long)]
    approver: Option<String>,
}

#[derive(clap::Args)]
struct RevokeArgs {
    #[command(flatten)]
    client: AdminClientArgs,
    #[arg(long)]
    rule: String,
    #[arg(long, default_value = "all")]
    scope: String,
    /// Why; recorded in the audit trail.
    #[arg(long, default_value = "")]
    reason: String,
    /// Who revokes. Defaults to $USER.
    #[arg(long)]
    by: Option<String>,
}

#[derive(clap::Args)]
struct ApprovalsArgs {
    #[command(flatten)]
    client: AdminClientArgs,
    /// Also print this many of the newest audit entries.
    #[arg(long, default_value_t = 0)]
    audit: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct HealthArgs {
    /// The server's HTTP listener; an unspecified address (0.0.0.0) means
    /// this host. Without it, `http-listen` from the `serve` configuration
    /// file, then 127.0.0.1:8080.
    #[arg(long, env = "TOLLGATE_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// The `serve` configuration file, read for `http-listen` only.
    #[arg(long, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    /// `/readyz` (ready for traffic) or `/healthz` (process up).
    #[arg(long, default_value = "/readyz")]
    path: String,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Every option is also a key of the `--config` file, under its long name
/// (kebab or snake case), and each must be documented in
/// `docs/configuration.md` (a test checks).
#[derive(clap::Args)]
struct ServeArgs {
    /// YAML file of options, keyed by long name; flags and environment
    /// variables override it.
    #[arg(long, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration, credentials redacted, and exit.
    #[arg(long)]
    print_config: bool,
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
    /// A budget denial whose window resets within this long tells clients
    /// to retry (`x-should-retry: true`); a longer one tells them not to.
    /// At most 120s, the longest Retry-After the OpenAI SDKs wait for.
    #[arg(long, env = "TOLLGATE_RETRY_WITHIN", default_value = "60s", value_parser = retry_within_arg)]
    retry_within: Duration,
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
    /// Multiplexed connections to a single Redis server, used in turn.
    #[arg(long, env = "TOLLGATE_REDIS_CONNECTIONS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    redis_connections: u16,
    /// Address of the HTTP listener (forward auth, settle, `/status`,
    /// `/healthz`, `/readyz`).
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
    /// Log format on stderr.
    #[arg(long, env = "TOLLGATE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log filter: a level (`info`, `debug`) or per-module directives such
    /// as `tollgate=debug,info`.
    #[arg(long, env = "TOLLGATE_LOG", default_value = "info")]
    log_level: String,
    /// On SIGTERM or SIGINT, how long calls in flight may take to finish.
    #[arg(long, env = "TOLLGATE_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration_arg)]
    drain_timeout: Duration,
    /// How often readiness probes the counter store.
    #[arg(long, env = "TOLLGATE_STORE_PROBE_EVERY", default_value = "2s", value_parser = duration_arg)]
    store_probe_every: Duration,
    /// Certificate chain (PEM) for TLS on the gRPC and HTTP listeners.
    #[arg(long, env = "TOLLGATE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert`.
    #[arg(long, env = "TOLLGATE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must be signed by; clients without
    /// one are refused (mutual TLS). Needs `--tls-cert`.
    #[arg(long, env = "TOLLGATE_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// File holding the admin token (16 characters or more); or set
    /// TOLLGATE_ADMIN_TOKEN. Without a token the admin API is not served.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Serve the admin API (gRPC and HTTP) on its own address, HOST:PORT
    /// or unix:/path/to.sock, instead of the gRPC and HTTP ports.
    #[arg(long, env = "TOLLGATE_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// CA (PEM) that client certificates on the admin listener must be
    /// signed by. Needs `--admin-listen` on a TCP address and `--tls-cert`.
    #[arg(long, env = "TOLLGATE_ADMIN_TLS_CLIENT_CA", requires_all = ["tls_cert", "admin_listen"])]
    admin_tls_client_ca: Option<PathBuf>,
    /// Alert deliveries waiting at most; beyond it alerts are dropped,
    /// counted and logged.
    #[arg(long, env = "TOLLGATE_ALERT_QUEUE", default_value_t = 10_000)]
    alert_queue: usize,
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
    /// A route attribute (Envoy context_extensions, a trusted header), such
    /// as team=growth or labels.tier=gold; beats the key registry.
    #[arg(long = "attr", value_name = "NAME=VALUE")]
    attrs: Vec<String>,
    /// An attribute as a client's own header sets it; only fills what the
    /// route and the registry leave empty, and only for the policy's
    /// `client_attributes`.
    #[arg(long = "client-attr", value_name = "NAME=VALUE")]
    client_attrs: Vec<String>,
    /// Explain as for a route that cannot switch the model (ext_authz,
    /// nginx, forward auth without `downgrade: header`).
    #[arg(long)]
    no_model_switch: bool,
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

fn retry_within_arg(s: &str) -> Result<Duration, String> {
    let d = duration_arg(s)?;
    let max = tollgate::engine::decide::MAX_RETRY_WITHIN_SECS;
    if d.as_secs() > max {
        return Err(format!(
            "{s:?} is over {max}s: SDKs do not wait for a Retry-After that long"
        ));
    }
    Ok(d)
}

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let matches = Cli::command().get_matches_from(&argv);
    let (matches, from_file) = match with_config_file(argv, matches) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Validate { dirs } => validate(&dirs),
        Command::Explain(args) => explain(args),
        Command::Health(args) => health_check(&args),
        Command::Serve(args) if args.print_config => {
            let serve = matches.subcommand_matches("serve").expect("serve matches");
            if let Some(path) = &args.config {
                println!("# Configuration file: {}", path.display());
            }
            print!(
                "{}",
                tollgate::config::render(&serve_command(), serve, &from_file)
            );
            ExitCode::SUCCESS
        }
        Command::Serve(args) => serve(*args),
        Command::Approve(args) => approve(args),
        Command::Revoke(args) => revoke(args),
        Command::Approvals(args) => approvals(args),
        Command::Usage(args) => usage(args),
    }
}

/// The admin token from a file or TOLLGATE_ADMIN_TOKEN; `None` when
/// neither is set.
fn admin_token(file: Option<&PathBuf>) -> Result<Option<String>, String> {
    if let Some(path) = file {
        return std::fs::read_to_string(path)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|e| format!("cannot read the admin token file {}: {e}", path.display()));
    }
    Ok(std::env::var("TOLLGATE_ADMIN_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

fn admin_call<F>(args: &AdminClientArgs, call: impl FnOnce(AdminClient) -> F) -> ExitCode
where
    F: std::future::Future<Output = Result<String, AdminCallError>>,
{
    let token = match admin_token(args.token_file.as_ref()) {
        Ok(Some(t)) => t,
        Ok(None) => {
            eprintln!("error: give the admin token with --token-file or TOLLGATE_ADMIN_TOKEN");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let tls = if args.ca_file.is_some() || args.client_cert.is_some() {
        let identity = args.client_cert.as_deref().zip(args.client_key.as_deref());
        Some(tollgate::http_client::client_tls(
            args.ca_file.as_deref(),
            identity,
        ))
    } else {
        None
    };
    let client = match (AdminClient::new(&args.server, &token), tls) {
        (Ok(c), None) => c,
        (Ok(c), Some(Ok(tls))) => c.with_tls(tls),
        (Err(e), _) | (_, Some(Err(e))) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
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
    match runtime.block_on(call(client)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn current_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_default()
}

/// Who approves or revokes: the flag, else $USER; audits need a name.
fn actor(given: Option<&str>, flag: &str) -> Result<String, ExitCode> {
    let name = given.map(str::to_string).unwrap_or_else(current_user);
    if name.trim().is_empty() {
        eprintln!("error: give {flag} NAME: there is no $USER to record as who did it");
        return Err(ExitCode::from(2));
    }
    Ok(name)
}

fn approve(args: ApproveArgs) -> ExitCode {
    let approver = match actor(args.approver.as_deref(), "--approver") {
        Ok(name) => name,
        Err(code) => return code,
    };
    let body = serde_json::json!({
        "rule": args.rule,
        "scope": args.scope,
        "extra": args.extra,
        "for": args.duration,
        "approver": approver,
        "reason": args.reason,
    });
    admin_call(&args.client, |c| async move {
        let grant = c.approve(&body).await?;
        Ok(format!("approved: {}\n", describe_grant(&grant)))
    })
}

fn revoke(args: RevokeArgs) -> ExitCode {
    let by = match actor(args.by.as_deref(), "--by") {
        Ok(name) => name,
        Err(code) => return code,
    };
    let body = serde_json::json!({
        "rule": args.rule,
        "scope": args.scope,
        "revoked_by": by,
        "reason": args.reason,
    });
    admin_call(&args.client, |c| async move {
        let grant = c.revoke(&body).await?;
        Ok(format!("revoked: {}\n", describe_grant(&grant)))
    })
}

fn approvals(args: ApprovalsArgs) -> ExitCode {
    let (audit, json) = (args.audit, args.json);
    admin_call(&args.client, |c| async move {
        let listing = c.list(audit).await?;
        if json {
            return Ok(format!("{listing:#}\n"));
        }
        let mut out = String::new();
        let grants = listing["grants"].as_array().cloned().unwrap_or_default();
        if grants.is_empty() {
            out.push_str("no active approvals\n");
        }
        for g in &grants {
            out.push_str(&describe_grant(g));
            out.push('\n');
        }
        if audit > 0 {
            out.push_str("\naudit trail (oldest first):\n");
            for entry in listing["audit"].as_array().cloned().unwrap_or_default() {
                out.push_str(&format!(
                    "{}  {}  by {}: {}  [{}]\n",
                    entry["at"].as_str().unwrap_or(""),
                    entry["action"].as_str().unwrap_or(""),
                    entry["by"].as_str().unwrap_or(""),
                    entry["reason"].as_str().unwrap_or(""),
                    describe_grant(&entry["grant"])
                ));
            }
        }
        Ok(out)
    })
}

fn serve_command() -> clap::Command {
    Cli::command()
        .find_subcommand("serve")
        .expect("serve is a subcommand")
        .clone()
}

/// Layers `serve --config FILE` under the command line and environment:
/// the file's settings become flags for whatever the first parse left at
/// its default, and the whole command line is parsed again.
fn with_config_file(
    mut argv: Vec<std::ffi::OsString>,
    matches: clap::ArgMatches,
) -> Result<(clap::ArgMatches, std::collections::BTreeSet<String>), ExitCode> {
    let Some(serve) = matches.subcommand_matches("serve") else {
        return Ok((matches, Default::default()));
    };
    let Some(path) = serve.get_one::<PathBuf>("config") else {
        return Ok((matches, Default::default()));
    };
    let file = match tollgate::config::FileConfig::load(path, &serve_command()) {
        Ok(f) => f,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("{} error(s) in the configuration file", errors.len());
            return Err(ExitCode::from(2));
        }
    };
    let (extra, applied) = file.extra_args(serve);
    argv.extend(extra);
    match Cli::command().try_get_matches_from(&argv) {
        Ok(m) => Ok((m, applied)),
        Err(e) => {
            let _ = e.print();
            eprintln!("(after applying {})", file.path().display());
            Err(ExitCode::from(2))
        }
    }
}

/// `tollgate health`: one plain HTTP/1.1 GET, so that a container image
/// without curl can still have a health check.
fn health_check(args: &HealthArgs) -> ExitCode {
    let addr = match (args.http_listen, &args.config) {
        (Some(addr), _) => addr,
        (None, None) => SocketAddr::from(([127, 0, 0, 1], 8080)),
        (None, Some(path)) => match tollgate::config::FileConfig::load(path, &serve_command()) {
            Ok(file) => match file.values_of("http_listen").and_then(|v| v.first()) {
                Some(v) => match v.parse() {
                    Ok(addr) => addr,
                    Err(e) => {
                        eprintln!("{}: http-listen: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                },
                None => SocketAddr::from(([127, 0, 0, 1], 8080)),
            },
            Err(errors) => {
                for e in errors {
                    eprintln!("error: {e}");
                }
                return ExitCode::FAILURE;
            }
        },
    };
    match health::http_check(addr, &args.path) {
        Ok((ready, body)) => {
            println!("{}", body.trim());
            if ready {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("{addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn validate(dirs: &[PathBuf]) -> ExitCode {
    match policy::load_dirs(dirs) {
        Ok(p) => {
            for (origin, message) in &p.set.warnings {
                eprintln!("warning: {origin}: {message}");
            }
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
        client_attributes: parse_attrs(&args.client_attrs)?,
        api_key: args.api_key.clone(),
        estimate,
        request_id: None,
        can_switch_model: !args.no_model_switch,
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
    if let Err(e) = init_logging(args.log_format, &args.log_level) {
        eprintln!("error: --log-level: {e}");
        return ExitCode::from(2);
    }
    let tls_files = args
        .tls_cert
        .clone()
        .zip(args.tls_key.clone())
        .map(|(cert, key)| TlsFiles {
            cert,
            key,
            client_ca: args.tls_client_ca.clone(),
        });
    // Both listeners are checked before anything starts, so a bad
    // certificate is a refusal to start rather than a half-up server.
    let tls_configs = match &tls_files {
        None => None,
        Some(files) => match (
            tls::server_config(files, tls::ALPN_H2),
            tls::server_config(files, tls::ALPN_HTTP1),
        ) {
            (Ok(grpc), Ok(http)) => Some((grpc, http)),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
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
    let code = runtime.block_on(async move {
        let store = match open_store(&args).await {
            Ok(store) => store,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let admin_token = match admin_token(args.admin_token_file.as_ref())
            .and_then(|t| t.map(|t| AdminToken::new(&t)).transpose())
        {
            Ok(token) => token,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        if admin_token.is_none() && args.admin_listen.is_some() {
            eprintln!("--admin-listen needs an admin token (--admin-token-file or TOLLGATE_ADMIN_TOKEN)");
            return ExitCode::FAILURE;
        }
        let alerts = Dispatcher::start(
            store.clone(),
            DispatcherConfig {
                queue: args.alert_queue,
                ..DispatcherConfig::default()
            },
        );
        let telemetry = match telemetry(&args) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let gate = Arc::new(
            Gate::new(
                policy,
                store.clone(),
                clock.clone(),
                GateConfig {
                    reservation_ttl: args.reservation_ttl,
                    store_timeout: Duration::from_millis(args.store_timeout_ms),
                    retry_within: args.retry_within,
                },
            )
            .with_alerts(alerts.clone())
            .with_telemetry(telemetry.clone()),
        );
        let readiness = Readiness::new();
        readiness.set_policies_loaded();
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

        let shutdown = Shutdown::new();
        // Where components that buffer work (the alert queue, the audit
        // log) register their flush; it runs after the listeners drain.
        let mut flush = FlushHooks::default();
        {
            let alerts = alerts.clone();
            let limit = args.drain_timeout;
            flush.add("alerts", async move {
                if !alerts.flush(limit).await {
                    tracing::warn!("some alerts were still being delivered at shutdown");
                }
            });
        }
        if telemetry.audit().is_some() {
            let telemetry = telemetry.clone();
            flush.add("audit log", async move {
                if let Some(audit) = telemetry.audit() {
                    audit.flush().await;
                }
            });
        }
        if let Err(e) = reloader.spawn(shutdown.wait()) {
            tracing::warn!(error = %e, "cannot watch the policy directories; relying on the periodic rescan");
        }
        health::spawn_probe(
            readiness.clone(),
            store,
            clock,
            args.store_probe_every,
            shutdown.wait(),
        );
        let (grpc_tls, http_tls) = match tls_configs {
            Some((g, h)) => (Some(g), Some(h)),
            None => (None, None),
        };
        // The admin API shares the gRPC and HTTP listeners, or has one of
        // its own.
        let mut shared_admin = None;
        let mut admin_task = None;
        if let Some(token) = admin_token {
            let api = AdminApi::new(gate.clone(), token);
            match &args.admin_listen {
                None => shared_admin = Some(api),
                Some(address) => {
                    let tls = match (&tls_files, address.starts_with("unix:")) {
                        (Some(files), false) => {
                            let files = TlsFiles {
                                client_ca: args
                                    .admin_tls_client_ca
                                    .clone()
                                    .or_else(|| files.client_ca.clone()),
                                ..files.clone()
                            };
                            match tls::server_config(&files, tls::ALPN_H2_AND_HTTP1) {
                                Ok(c) => Some(c),
                                Err(e) => {
                                    eprintln!("error: admin listener: {e}");
                                    return ExitCode::FAILURE;
                                }
                            }
                        }
                        (None, _) | (_, true) if args.admin_tls_client_ca.is_some() => {
                            eprintln!("--admin-tls-client-ca needs --tls-cert and a TCP --admin-listen");
                            return ExitCode::FAILURE;
                        }
                        _ => None,
                    };
                    let listener = match AdminListener::bind(address).await {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("cannot listen on {address}: {e}");
                            return ExitCode::FAILURE;
                        }
                    };
                    if tls.is_none() && !address.starts_with("unix:") {
                        tracing::warn!(admin = %address, "the admin API listens on TCP without TLS: its bearer token crosses the network in the clear");
                    }
                    tracing::info!(admin = %address, tls = tls.is_some(), "serving the admin API on its own listener");
                    admin_task = Some(tokio::spawn(tollgate::server::serve_admin(
                        api,
                        listener,
                        tls,
                        shutdown.wait(),
                    )));
                }
            }
        }
        let http_task = tokio::spawn(tollgate::server::http::serve_http_with(
            gate.clone(),
            reloader.clone(),
            http,
            ListenerOptions {
                readiness: Some(readiness.clone()),
                tls: http_tls,
                admin: shared_admin.clone(),
            },
            shutdown.wait(),
        ));
        let grpc_task = tokio::spawn(tollgate::server::serve_grpc_with(
            gate,
            reloader,
            grpc,
            ListenerOptions {
                readiness: Some(readiness.clone()),
                tls: grpc_tls,
                admin: shared_admin,
            },
            shutdown.wait(),
        ));
        {
            let (readiness, shutdown) = (readiness.clone(), shutdown.clone());
            tokio::spawn(async move {
                shutdown::signal().await;
                readiness.set_shutting_down();
                shutdown.trigger();
            });
        }
        tracing::info!(grpc = %args.listen, http = %args.http_listen, tls = tls_files.is_some(), "serving gRPC");

        let servers = async {
            let servers = (grpc_task.await, http_task.await);
            if let Some(task) = admin_task {
                if let Ok(Err(e)) = task.await {
                    eprintln!("admin server error: {e}");
                }
            }
            servers
        };
        let drain_deadline = {
            let wait = shutdown.wait();
            let drain = args.drain_timeout;
            async move {
                wait.await;
                tokio::time::sleep(drain).await;
            }
        };
        let code = tokio::select! {
            (grpc, http) = servers => match (grpc, http) {
                (Ok(Ok(())), Ok(Ok(()))) => ExitCode::SUCCESS,
                (grpc, http) => {
                    if let Ok(Err(e)) = grpc { eprintln!("gRPC server error: {e}"); }
                    if let Ok(Err(e)) = http { eprintln!("HTTP server error: {e}"); }
                    ExitCode::FAILURE
                }
            },
            () = drain_deadline => {
                tracing::warn!(drain_timeout = ?args.drain_timeout, "calls still in flight at the drain timeout; closing them");
                ExitCode::SUCCESS
            }
        };
        if !flush.is_empty() {
            flush.run(args.drain_timeout).await;
        }
        tracing::info!("stopped");
        code
    });
    // Blocking reload threads are not waited for past this.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
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
        connections: usize::from(args.redis_connections),
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

/// Logs go to stderr, as text or one JSON object a line.
fn init_logging(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    // Colour codes only help a person at a terminal; in a file or a log
    // collector they are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
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
