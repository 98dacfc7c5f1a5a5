//! `tollgate usage`: counters against their limits, from a running server
//! or straight from Redis.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tollgate::reload;
use tollgate::usage::{UsageReport, UsageRow};
use tollgate_core::gate::{Gate, GateConfig, SystemClock};

use super::args::parse_attrs;
use super::client::{RedisArgs, Server, ServerTlsArgs};
use super::runtime::{runtime, Threads};

#[derive(clap::Args)]
pub(super) struct UsageArgs {
    /// A running server's HTTP address, such as http://127.0.0.1:8080 (or
    /// https:// for a server with TLS): lists every scope it has seen, read
    /// from its store now.
    #[arg(long, conflicts_with_all = ["attrs", "api_key"])]
    server: Option<String>,
    #[command(flatten)]
    tls: ServerTlsArgs,
    /// With --redis: needs --policies and --attr or --api-key.
    #[command(flatten)]
    store: RedisArgs,
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

pub(super) fn usage(args: UsageArgs) -> ExitCode {
    let runtime = match runtime(Threads::One) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let report = runtime.block_on(async {
        match (&args.server, &args.store.redis) {
            (Some(server), _) => usage_from_server(server, &args.tls).await,
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

/// `GET /v1/usage` on a running server's HTTP listener.
async fn usage_from_server(url: &str, tls: &ServerTlsArgs) -> Result<UsageReport, String> {
    let server = Server::new(url, tls)?;
    tollgate::usage::fetch(&server.target, server.tls)
        .await
        .map_err(|e| format!("{url}: {e}"))
}

/// The counters that apply to `--attr`/`--api-key`, read from Redis
/// through the same gate a server uses.
async fn usage_from_redis(args: &UsageArgs, url: &str) -> Result<UsageReport, String> {
    if args.policies.is_empty() {
        return Err("--redis needs --policies to know the rules".to_string());
    }
    let policy = reload::load(&args.policies, false).map_err(|e| e.to_string())?;
    let attributes = parse_attrs(&args.attrs)?;
    let store = args.store.connect(url).await?;
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
        policy_version: version.to_string(),
        scopes_tracked: None,
        scopes_max: None,
        scopes_overflowed: None,
        counters: counters.iter().map(UsageRow::from).collect(),
    })
}
