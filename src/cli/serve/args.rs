//! The options of `tollgate serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;

use crate::cli::args::{duration_arg, rate_arg, retry_within_arg};

/// `--dashboard`: the budget page at `/ui/` and its JSON.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DashboardArg {
    /// Read-only for anyone who reaches the HTTP port; approving takes the
    /// admin token.
    On,
    /// Not served (`/ui/` and `/v1/dashboard` answer 404).
    Off,
    /// Its data only with the admin token.
    Admin,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Switch {
    On,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// Every option is also a key of the `--config` file, under its long name
/// (kebab or snake case), and each must be documented in
/// `docs/configuration.md` (a test checks).
#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// YAML file of options, keyed by long name; flags and environment
    /// variables override it.
    #[arg(long, env = "TOLLGATE_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Print the effective configuration, credentials redacted, and exit.
    #[arg(long)]
    pub(crate) print_config: bool,
    /// Address of the gRPC listener.
    #[arg(long, env = "TOLLGATE_LISTEN", default_value = "127.0.0.1:50051")]
    pub(crate) listen: SocketAddr,
    /// Policy directory; may be given several times.
    #[arg(
        long = "policies",
        env = "TOLLGATE_POLICIES",
        default_value = "./policies",
        value_delimiter = ','
    )]
    pub(crate) policies: Vec<PathBuf>,
    /// How long an unsettled reservation holds its estimate and slots.
    #[arg(long, env = "TOLLGATE_RESERVATION_TTL", default_value = "10m", value_parser = duration_arg)]
    pub(crate) reservation_ttl: Duration,
    /// Upper bound on any one counter-store call.
    #[arg(long, env = "TOLLGATE_STORE_TIMEOUT_MS", default_value_t = 50)]
    pub(crate) store_timeout_ms: u64,
    /// A budget denial whose window resets within this long tells clients
    /// to retry (`x-should-retry: true`); a longer one tells them not to.
    /// At most 120s, the longest Retry-After the OpenAI SDKs wait for.
    #[arg(long, env = "TOLLGATE_RETRY_WITHIN", default_value = "60s", value_parser = retry_within_arg)]
    pub(crate) retry_within: Duration,
    /// Redis URL (`redis://` or `rediss://`, with credentials if needed).
    /// Without it, counters live in the embedded store (`--data-dir`).
    #[arg(long, env = "TOLLGATE_REDIS_URL")]
    pub(crate) redis: Option<String>,
    /// CA certificate (PEM) that signed the Redis server's TLS certificate.
    #[arg(long, env = "TOLLGATE_REDIS_CA_FILE")]
    pub(crate) redis_ca_file: Option<PathBuf>,
    /// Treat `--redis` as a comma-separated list of Redis Cluster nodes.
    #[arg(long, env = "TOLLGATE_REDIS_CLUSTER")]
    pub(crate) redis_cluster: bool,
    /// Prefix of every Redis key.
    #[arg(long, env = "TOLLGATE_REDIS_PREFIX", default_value = "tollgate:")]
    pub(crate) redis_prefix: String,
    /// Multiplexed connections to a single Redis server, used in turn.
    #[arg(long, env = "TOLLGATE_REDIS_CONNECTIONS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) redis_connections: u16,
    /// Leases on Redis counters: each replica decides most requests from
    /// budget already counted in Redis on its behalf, with no round trip,
    /// and never past a cap (docs/ARCHITECTURE.md, Leases). `off` makes
    /// every decision one Redis call.
    #[arg(long, env = "TOLLGATE_REDIS_LEASES", value_enum, default_value = "on")]
    pub(crate) redis_leases: Switch,
    /// How long a lease lives, in milliseconds: also the bound on how long
    /// a lowered cap, a revocation or another replica's unused lease can
    /// take to be felt, and the demand a lease is sized for.
    #[arg(long, env = "TOLLGATE_REDIS_LEASE_MS", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(500..=60_000))]
    pub(crate) redis_lease_ms: u64,
    /// Entries kept in each Redis log stream (the approvals audit trail,
    /// the alert feed), about; older ones are trimmed first.
    #[arg(long, env = "TOLLGATE_REDIS_LOG_MAX_ENTRIES", default_value_t = tollgate_core::store::redis::MAX_LOG_ENTRIES)]
    pub(crate) redis_log_max_entries: usize,
    /// A Redis log stream with nothing appended for this long is deleted.
    #[arg(long, env = "TOLLGATE_REDIS_LOG_RETENTION", default_value = "366d", value_parser = duration_arg)]
    pub(crate) redis_log_retention: Duration,
    /// Distinct rows the spend account keeps a day (owner combinations:
    /// model, team, key, ...); later rows are counted as `other`.
    #[arg(long, env = "TOLLGATE_SPEND_MAX_ROWS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub(crate) spend_max_rows: u32,
    /// Days the spend account of a day is kept after it.
    #[arg(long, env = "TOLLGATE_SPEND_RETENTION_DAYS", default_value_t = 400,
          value_parser = clap::value_parser!(u32).range(1..=3_660))]
    pub(crate) spend_retention_days: u32,
    /// Where the spend account cuts its days: UTC, or an IANA time zone
    /// such as Europe/Berlin.
    #[arg(long, env = "TOLLGATE_SPEND_TIMEZONE", default_value = "UTC",
          value_parser = spend_timezone_arg)]
    pub(crate) spend_timezone: tollgate_core::store::DayCalendar,
    /// Address of the HTTP listener (forward auth, settle, `/status`,
    /// `/healthz`, `/readyz`).
    #[arg(long, env = "TOLLGATE_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub(crate) http_listen: SocketAddr,
    /// Start even when the policy directories hold no policy files.
    #[arg(long, env = "TOLLGATE_ALLOW_EMPTY")]
    pub(crate) allow_empty: bool,
    /// Read the policy directories this often even without file events.
    #[arg(long, env = "TOLLGATE_RESCAN_EVERY", default_value = "10s", value_parser = duration_arg)]
    pub(crate) rescan_every: Duration,
    /// Most live counters the embedded store holds.
    #[arg(long, env = "TOLLGATE_MAX_COUNTERS", default_value_t = tollgate_core::store::memory::DEFAULT_MAX_COUNTERS)]
    pub(crate) max_counters: usize,
    /// Directory where the embedded store keeps its counters, reservations,
    /// grants and logs across restarts (a snapshot and a log of changes
    /// since), locked while in use. Not used with `--redis`.
    #[arg(long, env = "TOLLGATE_DATA_DIR", default_value = "./data")]
    pub(crate) data_dir: PathBuf,
    /// Keep the embedded store in memory only: every restart starts every
    /// budget from zero. `--data-dir` is then not used.
    #[arg(long, env = "TOLLGATE_EPHEMERAL")]
    pub(crate) ephemeral: bool,
    /// How often, in milliseconds, the embedded store writes its changes to
    /// `--data-dir` and syncs them: a crash loses at most about this long.
    #[arg(long, env = "TOLLGATE_DATA_SYNC_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub(crate) data_sync_ms: u64,
    /// Log format on stderr.
    #[arg(long, env = "TOLLGATE_LOG_FORMAT", value_enum, default_value = "text")]
    pub(crate) log_format: LogFormat,
    /// Log filter: a level (`info`, `debug`) or per-module directives such
    /// as `tollgate=debug,info`.
    #[arg(long, env = "TOLLGATE_LOG", default_value = "info")]
    pub(crate) log_level: String,
    /// On SIGTERM or SIGINT, how long calls in flight may take to finish.
    #[arg(long, env = "TOLLGATE_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration_arg)]
    pub(crate) drain_timeout: Duration,
    /// How often readiness probes the counter store.
    #[arg(long, env = "TOLLGATE_STORE_PROBE_EVERY", default_value = "2s", value_parser = duration_arg)]
    pub(crate) store_probe_every: Duration,
    /// Certificate chain (PEM) for TLS on the gRPC and HTTP listeners.
    #[arg(long, env = "TOLLGATE_TLS_CERT", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert`.
    #[arg(long, env = "TOLLGATE_TLS_KEY", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must be signed by; clients without
    /// one are refused (mutual TLS). Needs `--tls-cert`.
    #[arg(long, env = "TOLLGATE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub(crate) tls_client_ca: Option<PathBuf>,
    /// File holding the admin token (16 characters or more); or set
    /// TOLLGATE_ADMIN_TOKEN. Without a token the admin API is not served.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN_FILE")]
    pub(crate) admin_token_file: Option<PathBuf>,
    /// Serve the admin API (gRPC and HTTP) on its own address, HOST:PORT
    /// or unix:/path/to.sock, instead of the gRPC and HTTP ports.
    #[arg(long, env = "TOLLGATE_ADMIN_LISTEN")]
    pub(crate) admin_listen: Option<String>,
    /// CA (PEM) that client certificates on the admin listener must be
    /// signed by. Needs `--admin-listen` on a TCP address and `--tls-cert`.
    #[arg(long, env = "TOLLGATE_ADMIN_TLS_CLIENT_CA", requires_all = ["tls_cert", "admin_listen"])]
    pub(crate) admin_tls_client_ca: Option<PathBuf>,
    /// Alert deliveries waiting at most; beyond it alerts are dropped,
    /// counted and logged.
    #[arg(long, env = "TOLLGATE_ALERT_QUEUE", default_value_t = 10_000)]
    pub(crate) alert_queue: usize,
    /// Most distinct (rule, scope) pairs given their own metric series and
    /// listed by `/v1/usage`; the rest count as scope="other".
    #[arg(long, env = "TOLLGATE_METRICS_MAX_SCOPES", default_value_t = tollgate::telemetry::DEFAULT_MAX_SCOPES)]
    pub(crate) metrics_max_scopes: usize,
    /// Write one JSON line per decision to this file (`-` for stdout).
    #[arg(long, env = "TOLLGATE_AUDIT_LOG")]
    pub(crate) audit_log: Option<PathBuf>,
    /// Share of decisions written to the audit log, from 0 to 1.
    #[arg(long, env = "TOLLGATE_AUDIT_SAMPLE", default_value_t = 1.0, value_parser = rate_arg)]
    pub(crate) audit_sample: f64,
    /// The budget dashboard on the HTTP port (`/ui/`, `/v1/dashboard`):
    /// `on` (read-only for anyone who reaches the port), `off`, or `admin`
    /// (its data only with the admin token).
    #[arg(long, env = "TOLLGATE_DASHBOARD", value_enum, default_value = "on")]
    pub(crate) dashboard: DashboardArg,
    /// Write only denials (and failed decisions) to the audit log.
    #[arg(long, env = "TOLLGATE_AUDIT_DENIALS_ONLY")]
    pub(crate) audit_denials_only: bool,
}

fn spend_timezone_arg(s: &str) -> Result<tollgate_core::store::DayCalendar, String> {
    tollgate_core::store::DayCalendar::named(s)
}
