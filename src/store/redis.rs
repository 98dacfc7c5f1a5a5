//! The Redis store: counters shared by every replica.
//!
//! A decision is one `EVALSHA` of `reserve.lua`, which checks and reserves
//! every counter of every candidate atomically, so concurrent requests on
//! any number of replicas can never push a counter past its cap. Amounts are
//! integers (spend in micro-USD); time is the caller's, passed in, so that
//! window edges do not depend on Redis's clock.
//!
//! Keys: `<prefix>c:<rule>|<unit>|<scope hash>|<window>` for counters (a
//! hash of `v` value and `e` logical expiry, or a sorted set of reservation
//! ids for concurrency gauges), `<prefix>r:<id>` for reservations and
//! `<prefix>q:<request id>` for replays. Every key carries a TTL, so counters
//! of removed rules and old windows disappear by themselves.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::Script;
use async_trait::async_trait;

use super::*;
use crate::policy::Unit;

/// Extra lifetime on every key beyond its logical end, so that a settle
/// arriving just after still finds it.
const CLEANUP_GRACE: Millis = 60_000;

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
    pub url: String,
    /// Prepended to every key, so several deployments can share a server.
    pub prefix: String,
    /// How long a new connection attempt may take.
    pub connect_timeout: Duration,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            prefix: "tollgate:".to_string(),
            connect_timeout: Duration::from_millis(500),
        }
    }
}

#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: Arc<str>,
    reserve: Arc<Script>,
    settle: Arc<Script>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn unavailable(e: ::redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    /// Sets up a connection that is made on first use and remade by itself
    /// whenever it breaks, so tollgate can start before Redis and recovers
    /// when Redis comes back.
    pub fn connect(config: &RedisConfig) -> Result<RedisStore, StoreError> {
        if config.url.starts_with("rediss://") {
            // Any provider already installed is kept.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = ::redis::Client::open(config.url.as_str()).map_err(|e| {
            StoreError::Unavailable(format!(
                "invalid Redis URL: {}",
                e.detail().unwrap_or("cannot parse")
            ))
        })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn =
            ConnectionManager::new_lazy_with_config(client, manager_config).map_err(unavailable)?;
        Ok(RedisStore {
            conn,
            prefix: config.prefix.as_str().into(),
            reserve: Arc::new(Script::new(include_str!("reserve.lua"))),
            settle: Arc::new(Script::new(include_str!("settle.lua"))),
        })
    }

    /// Answers once Redis answers a PING.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        ::redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    fn counter_key(&self, key: &str) -> String {
        format!("{}c:{key}", self.prefix)
    }

    fn reservation_key(&self, id: &str) -> String {
        format!("{}r:{id}", self.prefix)
    }
}

#[async_trait]
impl CounterStore for RedisStore {
    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, StoreError> {
        let mut inv = self.reserve.prepare_invoke();
        inv.key(self.reservation_key(&req.reservation_id));
        match &req.request_id {
            Some(id) => inv.key(format!("{}q:{id}", self.prefix)),
            None => inv.key(format!("{}q:", self.prefix)),
        };
        inv.arg(req.now)
            .arg(req.reservation_ttl)
            .arg(&req.reservation_id)
            .arg(if req.request_id.is_some() {
                memory::REPLAY_WINDOW
            } else {
                0
            })
            .arg(CLEANUP_GRACE)
            .arg(req.candidates.len());
        for candidate in &req.candidates {
            inv.arg(candidate.ops.len())
                .arg(candidate.model.as_deref().unwrap_or(""));
            for op in &candidate.ops {
                inv.key(self.counter_key(&op.key));
                let (kind, value) = match op.expiry {
                    Expiry::Never => ("n", 0),
                    Expiry::At(t) => ("t", t),
                    Expiry::AfterFirstUse(d) => ("a", d),
                };
                inv.arg(op.amount)
                    .arg(op.limit)
                    .arg(u8::from(op.enforced))
                    .arg(u8::from(op.downgradable))
                    .arg(kind)
                    .arg(value)
                    .arg(u8::from(op.release_on_settle))
                    .arg(op.unit.name());
            }
        }
        let mut conn = self.conn.clone();
        let (replayed, result): (i64, String) =
            inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        parse_outcome(&result, replayed == 1)
            .ok_or_else(|| StoreError::Unavailable(format!("unexpected reserve reply {result:?}")))
    }

    async fn reservation(&self, id: &str, _now: Millis) -> Result<Option<Reservation>, StoreError> {
        let mut conn = self.conn.clone();
        let fields: Vec<Option<String>> = ::redis::cmd("HMGET")
            .arg(self.reservation_key(id))
            .arg(&["m", "s", "x", "o"])
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let [model, settled, expires, ops] = <[Option<String>; 4]>::try_from(fields)
            .map_err(|_| StoreError::Unavailable("unexpected HMGET reply".to_string()))?;
        let (Some(settled), Some(expires), Some(ops)) = (settled, expires, ops) else {
            return Ok(None);
        };
        let counter_prefix = format!("{}c:", self.prefix);
        let ops = ops
            .lines()
            .map(|line| {
                let mut parts = line.splitn(4, '\t');
                let unit = Unit::parse(parts.next()?)?;
                let amount = parts.next()?.parse().ok()?;
                let gauge = parts.next()? == "1";
                let key = parts.next()?.strip_prefix(&counter_prefix)?.to_string();
                Some(ReservedOp {
                    key,
                    unit,
                    amount,
                    release_on_settle: gauge,
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| StoreError::Unavailable(format!("reservation {id} is malformed")))?;
        Ok(Some(Reservation {
            model: model.filter(|m| !m.is_empty()),
            ops,
            settled: settled == "1",
            expires_at: expires.parse().unwrap_or(0),
        }))
    }

    async fn settle(
        &self,
        id: &str,
        actual: &[i64],
        now: Millis,
    ) -> Result<SettleOutcome, StoreError> {
        let Some(reservation) = self.reservation(id, now).await? else {
            return Ok(SettleOutcome::Unknown);
        };
        let mut inv = self.settle.prepare_invoke();
        inv.key(self.reservation_key(id));
        inv.arg(now).arg(id);
        for (i, op) in reservation.ops.iter().enumerate() {
            inv.key(self.counter_key(&op.key));
            inv.arg(actual.get(i).copied().unwrap_or(0));
        }
        let mut conn = self.conn.clone();
        let outcome: String = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        Ok(match outcome.as_str() {
            "settled" => SettleOutcome::Settled,
            "already_settled" => SettleOutcome::AlreadySettled,
            _ => SettleOutcome::Unknown,
        })
    }

    async fn read(
        &self,
        counters: &[CounterRef],
        now: Millis,
    ) -> Result<Vec<CounterState>, StoreError> {
        let mut pipe = ::redis::pipe();
        for c in counters {
            let key = self.counter_key(&c.key);
            if c.gauge {
                pipe.cmd("ZCOUNT")
                    .arg(key)
                    .arg(format!("({now}"))
                    .arg("+inf");
            } else {
                pipe.cmd("HMGET").arg(key).arg("v").arg("e");
            }
        }
        let mut conn = self.conn.clone();
        let replies: Vec<::redis::Value> =
            pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(counters
            .iter()
            .zip(replies)
            .map(|(c, reply)| {
                if c.gauge {
                    let n: i64 = ::redis::from_redis_value(reply).unwrap_or(0);
                    return CounterState {
                        used_before: n,
                        resets_at: None,
                    };
                }
                let (v, e): (Option<i64>, Option<i64>) =
                    ::redis::from_redis_value(reply).unwrap_or((None, None));
                match (v, e) {
                    (Some(v), Some(e)) if e == 0 || e > now => CounterState {
                        used_before: v,
                        resets_at: (e > 0).then_some(e),
                    },
                    _ => CounterState {
                        used_before: 0,
                        resets_at: None,
                    },
                }
            })
            .collect())
    }
}

fn parse_outcome(text: &str, replayed: bool) -> Option<ReserveOutcome> {
    let mut tokens = text.split(' ');
    let rid = tokens.next()?;
    let applied: i64 = tokens.next()?.parse().ok()?;
    let tried_count: usize = tokens.next()?.parse().ok()?;
    let mut int = || -> Option<i64> { tokens.next()?.parse().ok() };
    let mut tried = Vec::with_capacity(tried_count);
    for _ in 0..tried_count {
        let n = int()? as usize;
        let mut states = Vec::with_capacity(n);
        for _ in 0..n {
            let used = int()?;
            let reset = int()?;
            states.push(CounterState {
                used_before: used,
                resets_at: (reset >= 0).then_some(reset),
            });
        }
        tried.push(states);
    }
    Some(ReserveOutcome {
        applied: usize::try_from(applied).ok(),
        tried,
        reservation_id: (rid != "-").then(|| rid.to_string()),
        replayed,
    })
}
