//! `tollgate spend`: the spend account, grouped and filtered, from a
//! running server or straight from Redis.

use std::process::ExitCode;

use tollgate::http_client;
use tollgate::spend::{day_text, report, SpendQuery, SpendReport};
use tollgate_core::clock::{Clock, SystemClock};
use tollgate_core::store::{CounterStore, DayCalendar};

use super::client::{RedisArgs, Server, ServerTlsArgs};
use super::runtime::{runtime, Threads};

#[derive(clap::Args)]
pub(super) struct SpendArgs {
    /// First day, YYYY-MM-DD; today by default.
    #[arg(long)]
    from: Option<String>,
    /// Last day, included; --from by default.
    #[arg(long)]
    to: Option<String>,
    /// Group by these dimensions, comma-separated: model, model_family,
    /// team, key, workflow, environment, customer, modality. Without it,
    /// one total.
    #[arg(long, default_value = "")]
    by: String,
    /// Keep only rows with this value, such as team=growth; may be given
    /// several times.
    #[arg(long = "where", value_name = "DIMENSION=VALUE")]
    filters: Vec<String>,
    /// Print CSV instead of a table.
    #[arg(long, conflicts_with = "json")]
    csv: bool,
    /// Print JSON (the body of GET /v1/spend) instead of a table.
    #[arg(long)]
    json: bool,
    /// A running server's HTTP address, such as http://127.0.0.1:8080.
    #[arg(long, conflicts_with = "redis")]
    server: Option<String>,
    #[command(flatten)]
    tls: ServerTlsArgs,
    #[command(flatten)]
    store: RedisArgs,
    /// With --redis: the time zone the servers cut days in (their
    /// --spend-timezone), for what "today" is and what the report says.
    #[arg(long, env = "TOLLGATE_SPEND_TIMEZONE", default_value = "UTC")]
    timezone: String,
}

pub(super) fn spend(args: SpendArgs) -> ExitCode {
    let runtime = match runtime(Threads::One) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let calendar = match DayCalendar::named(&args.timezone) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: --timezone: {e}");
            return ExitCode::from(2);
        }
    };
    let today = day_text(calendar.day(SystemClock.now()));
    let from = args.from.clone().unwrap_or(today);
    let to = args.to.clone().unwrap_or_else(|| from.clone());
    let query = match SpendQuery::parse(&from, &to, &args.by, &args.filters) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match (&args.server, &args.store.redis) {
            (Some(server), _) => from_server(server, &args, &from, &to).await,
            (None, Some(url)) => from_redis(&args, url, &query, calendar.name()).await,
            (None, None) => Err("give --server URL, or --redis URL".to_string()),
        }
    });
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else if args.csv {
        print!("{}", report.to_csv());
    } else {
        print!("{}", report.to_table());
    }
    ExitCode::SUCCESS
}

/// `GET /v1/spend` on a running server's HTTP listener.
async fn from_server(
    url: &str,
    args: &SpendArgs,
    from: &str,
    to: &str,
) -> Result<SpendReport, String> {
    let server = Server::new(url, &args.tls)?;
    let mut path = format!(
        "/v1/spend?from={}&to={}&by={}",
        encode(from),
        encode(to),
        encode(&args.by)
    );
    for f in &args.filters {
        path.push_str("&where=");
        path.push_str(&encode(f));
    }
    let answer = http_client::send_with(
        &server.target,
        server.tls,
        hyper::Method::GET,
        &path,
        &[],
        hyper::body::Bytes::new(),
        std::time::Duration::from_secs(10),
    )
    .await
    .map_err(|e| format!("{url}: {e}"))?;
    if answer.status != 200 {
        return Err(format!(
            "{url}: HTTP {}: {}",
            answer.status,
            String::from_utf8_lossy(&answer.body).trim()
        ));
    }
    serde_json::from_slice(&answer.body).map_err(|e| format!("bad /v1/spend answer: {e}"))
}

async fn from_redis(
    args: &SpendArgs,
    url: &str,
    query: &SpendQuery,
    timezone: &str,
) -> Result<SpendReport, String> {
    let store = args.store.connect(url).await?;
    let days = store
        .spend(query.from, query.to)
        .await
        .map_err(|e| e.to_string())?;
    Ok(report(&days, query, timezone))
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
