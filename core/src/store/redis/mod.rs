//! The Redis store: counters shared by every replica.
//!
//! A decision is one `EVALSHA` of `reserve.lua`, which checks and reserves
//! every counter of every candidate atomically, so concurrent requests on
//! any number of replicas can never push a counter past its cap. Amounts are
//! integers (spend in micro-USD); time is the caller's, passed in, so that
//! window edges do not depend on Redis's clock.
//!
//! On Redis Cluster the `{scope}` hash tag puts counters that share a scope
//! in one slot (see [`keys`]). A decision whose keys all share a slot is
//! still one script; otherwise it runs one script per slot, in order, and
//! undoes the slots already reserved when a later one does not fit. Each
//! slot's check and reserve is atomic, so no counter ever ends above its
//! cap; the price is that a request undone this way may briefly have held
//! budget that a concurrent request was then denied.
//!
//! The parts, by job: this file holds the connection and dispatches the
//! [`CounterStore`] calls; `keys` is the key layout, `reserve` the
//! single-slot reserve, `cross_slot` the reserve across slots with its
//! undo, `settle` settling and reading counters, `codec` every record's
//! text form, `grants` the approval grants, `markers` the alert markers,
//! `spend` the spend account and `logs` the append-only streams. Each script sits beside them, its KEYS and ARGV documented at
//! its top.

mod codec;
mod cross_slot;
mod grants;
mod keys;
mod leased;
mod logs;
mod markers;
mod replays;
mod reserve;
mod settle;
mod spend;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{FromRedisValue, Script, ScriptInvocation};
use async_trait::async_trait;

use super::*;

/// Extra lifetime on every key beyond its logical end, so that a settle
/// arriving just after still finds it.
const CLEANUP_GRACE: Millis = 60_000;

/// How long a key meant to last `span` lives in Redis: the span and the
/// grace, the grace never longer than the span. What is meant for seconds
/// (a final estimate's record and request id, which nothing settles) then
/// lives seconds, not a minute.
fn key_lifetime(span: Millis) -> Millis {
    span + CLEANUP_GRACE.min(span)
}

/// How long the key of a settled reservation lives: it is kept
/// [`SETTLED_RETENTION`], plus the grace.
const SETTLED_KEY_LIFETIME: Millis = SETTLED_RETENTION + CLEANUP_GRACE;

/// Entries kept per append-only log stream (trimmed approximately), by
/// default.
pub const MAX_LOG_ENTRIES: usize = 1_000_000;

/// How long a log stream is kept after its last entry, by default.
pub const LOG_RETENTION: Duration = Duration::from_secs(366 * 86_400);

pub use grants::MAX_GRANTS;
pub use leased::{LeaseStats, LeasedStore, FLUSH_EVERY};

/// How the append-only log streams are bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    /// Entries kept per stream, about (older ones are trimmed first).
    pub max_entries: usize,
    /// A stream with nothing appended for this long is deleted.
    pub retention: Duration,
}

impl Default for LogBounds {
    fn default() -> Self {
        LogBounds {
            max_entries: MAX_LOG_ENTRIES,
            retention: LOG_RETENTION,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS. For
    /// a cluster, one or more node URLs separated by commas.
    pub url: String,
    /// Talk to a Redis Cluster rather than one server.
    pub cluster: bool,
    /// Prepended to every key, so several deployments can share a server.
    pub prefix: String,
    /// How long a new connection attempt may take.
    pub connect_timeout: Duration,
    /// Multiplexed connections kept open to a single server.
    pub connections: usize,
    /// A PEM file of the CA that signed Redis's TLS certificate, for a
    /// private CA; without it, `rediss://` trusts the public web roots.
    pub ca_file: Option<std::path::PathBuf>,
    pub logs: LogBounds,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            cluster: false,
            prefix: "tollgate:".to_string(),
            connect_timeout: Duration::from_millis(500),
            connections: 1,
            ca_file: None,
            logs: LogBounds::default(),
        }
    }
}

#[derive(Clone)]
enum Conn {
    /// Connections used in turn; each reconnects by itself.
    Single(Arc<[ConnectionManager]>, Arc<AtomicUsize>),
    Cluster(ClusterConnection),
}

#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: Arc<str>,
    logs: LogBounds,
    reserve: Arc<Script>,
    settle: Arc<Script>,
    read: Arc<Script>,
    adjust: Arc<Script>,
    claim: Arc<Script>,
    forget_grant: Arc<Script>,
    replay: Arc<Script>,
    spend: Arc<Script>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.conn {
            Conn::Single(..) => "single",
            Conn::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("mode", &mode)
            .finish()
    }
}

fn unavailable(e: ::redis::RedisError) -> StoreError {
    // Redis at `maxmemory` under `noeviction` answers every write with OOM
    // (a script, at its first write, before it has changed anything).
    if e.code() == Some("OOM") {
        return StoreError::OutOfMemory(format!(
            "Redis reached its maxmemory and evicts nothing: {e}"
        ));
    }
    StoreError::Unavailable(e.to_string())
}

fn invalid_url(e: ::redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!(
        "invalid Redis URL: {}",
        e.detail().unwrap_or("cannot parse")
    ))
}

impl RedisStore {
    /// Connects to a single server lazily (made on first use, remade
    /// whenever it breaks), or to a cluster (which must answer now). Must be
    /// called inside a Tokio runtime.
    pub async fn connect(config: &RedisConfig) -> Result<RedisStore, StoreError> {
        if config.prefix.contains(['{', '}']) {
            return Err(StoreError::Unavailable(
                "the Redis key prefix may not contain { or }: they choose cluster slots"
                    .to_string(),
            ));
        }
        if config.url.contains("rediss://") {
            // Any provider already installed is kept.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let root_cert = match &config.ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot read the Redis CA file {}: {e}",
                    path.display()
                ))
            })?),
            None => None,
        };
        let certs = || ::redis::TlsCertificates {
            client_tls: None,
            root_cert: root_cert.clone(),
        };
        let conn = if config.cluster {
            let nodes: Vec<&str> = config
                .url
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            let mut builder = ::redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(config.connect_timeout);
            if root_cert.is_some() {
                builder = builder.certs(certs());
            }
            let client = builder.build().map_err(invalid_url)?;
            Conn::Cluster(client.get_async_connection().await.map_err(unavailable)?)
        } else {
            let client = match root_cert {
                Some(_) => ::redis::Client::build_with_tls(config.url.as_str(), certs()),
                None => ::redis::Client::open(config.url.as_str()),
            }
            .map_err(invalid_url)?;
            // The gate bounds every call with --store-timeout-ms; the
            // client's own 500 ms response timeout would silently cap it.
            let manager_config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(config.connect_timeout))
                .set_response_timeout(None)
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(200));
            let conns = (0..config.connections.max(1))
                .map(|_| {
                    ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(unavailable)?;
            Conn::Single(conns.into(), Arc::new(AtomicUsize::new(0)))
        };
        Ok(RedisStore {
            conn,
            prefix: config.prefix.as_str().into(),
            logs: config.logs,
            reserve: Arc::new(Script::new(include_str!("reserve.lua"))),
            settle: Arc::new(Script::new(concat!(
                include_str!("move_counter.lua"),
                include_str!("settle.lua")
            ))),
            read: Arc::new(Script::new(include_str!("read.lua"))),
            adjust: Arc::new(Script::new(concat!(
                include_str!("move_counter.lua"),
                include_str!("adjust.lua")
            ))),
            claim: Arc::new(Script::new(include_str!("claim.lua"))),
            forget_grant: Arc::new(Script::new(include_str!("forget_grant.lua"))),
            replay: Arc::new(Script::new(include_str!("replay.lua"))),
            spend: Arc::new(Script::new(include_str!("spend.lua"))),
        })
    }

    async fn invoke<T: FromRedisValue>(&self, inv: &ScriptInvocation<'_>) -> Result<T, StoreError> {
        match &self.conn {
            Conn::Single(conns, next) => {
                let mut c = conns[next.fetch_add(1, Ordering::Relaxed) % conns.len()].clone();
                inv.invoke_async(&mut c).await.map_err(unavailable)
            }
            Conn::Cluster(c) => inv.invoke_async(&mut c.clone()).await.map_err(unavailable),
        }
    }

    async fn query<T: FromRedisValue>(&self, cmd: &::redis::Cmd) -> Result<T, StoreError> {
        match &self.conn {
            Conn::Single(conns, next) => {
                let mut c = conns[next.fetch_add(1, Ordering::Relaxed) % conns.len()].clone();
                cmd.query_async(&mut c).await.map_err(unavailable)
            }
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await.map_err(unavailable),
        }
    }

    /// Answers once Redis answers a PING.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.query::<String>(&::redis::cmd("PING"))
            .await
            .map(|_| ())
    }

    /// Opens every connection and loads the scripts, so that the first
    /// decisions do not pay for a handshake.
    pub async fn warm_up(&self) -> Result<(), StoreError> {
        let conns = match &self.conn {
            Conn::Single(conns, _) => conns.len(),
            Conn::Cluster(_) => 1,
        };
        for _ in 0..conns {
            self.ping().await?;
        }
        if let Conn::Single(conns, _) = &self.conn {
            let mut c = conns[0].clone();
            for script in [&self.reserve, &self.settle, &self.read] {
                script
                    .prepare_invoke()
                    .load_async(&mut c)
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(())
    }

    fn cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }
}

#[async_trait]
impl CounterStore for RedisStore {
    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, StoreError> {
        self.reserve_decision(req).await
    }

    async fn reservation(&self, id: &str, _now: Millis) -> Result<Option<Reservation>, StoreError> {
        self.load_reservation(id).await
    }

    async fn settle(
        &self,
        id: &str,
        actual: &[i64],
        now: Millis,
    ) -> Result<SettleOutcome, StoreError> {
        self.settle_reservation(id, actual, now).await
    }

    async fn withdraw(
        &self,
        id: &str,
        request_id: Option<&str>,
        now: Millis,
    ) -> Result<SettleOutcome, StoreError> {
        self.withdraw_reservation(id, request_id, now).await
    }

    async fn mark_alerts(
        &self,
        markers: &[AlertMarker],
        now: Millis,
    ) -> Result<Vec<bool>, StoreError> {
        self.set_markers(markers, now).await
    }

    async fn record_spend(
        &self,
        batch: &str,
        deltas: &[SpendDelta],
        bounds: SpendBounds,
        now: Millis,
    ) -> Result<(), StoreError> {
        self.add_spend(batch, deltas, bounds, now).await
    }

    async fn spend(
        &self,
        from: crate::store::spend::Day,
        to: crate::store::spend::Day,
    ) -> Result<Vec<SpendDay>, StoreError> {
        self.read_spend(from, to).await
    }

    async fn read(
        &self,
        counters: &[CounterRef],
        now: Millis,
    ) -> Result<Vec<CounterState>, StoreError> {
        self.read_counters(counters, now, "", &[]).await
    }

    async fn put_grant(&self, grant: &Grant, now: Millis) -> Result<(), StoreError> {
        self.store_grant(grant, now).await
    }

    async fn remove_grant(&self, key: &str, now: Millis) -> Result<Option<Grant>, StoreError> {
        self.drop_grant(key, now).await
    }

    async fn grants(&self, now: Millis) -> Result<Vec<Grant>, StoreError> {
        self.live_grants(now).await
    }

    async fn append(&self, log: &str, entry: &str) -> Result<(), StoreError> {
        self.append_entry(log, entry).await
    }

    async fn entries(&self, log: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.last_entries(log, limit).await
    }
}
