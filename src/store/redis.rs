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
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Multiplexed connections kept open.
    pub connections: usize,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            prefix: "tollgate:".to_string(),
            connect_timeout: Duration::from_millis(500),
            connections: 2,
        }
    }
}

#[derive(Clone)]
pub struct RedisStore {
    /// A few multiplexed connections, used in turn, so that one connection's
    /// driver task is not the only path to Redis.
    conns: Arc<[ConnectionManager]>,
    next: Arc<AtomicUsize>,
    prefix: Arc<str>,
    reserve: Arc<Script>,
    settle: Arc<Script>,
    read: Arc<Script>,
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
        let conns = (0..config.connections.max(1))
            .map(|_| {
                ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(unavailable)?;
        Ok(RedisStore {
            conns: conns.into(),
            next: Arc::new(AtomicUsize::new(0)),
            prefix: config.prefix.as_str().into(),
            reserve: Arc::new(Script::new(include_str!("reserve.lua"))),
            settle: Arc::new(Script::new(include_str!("settle.lua"))),
            read: Arc::new(Script::new(include_str!("read.lua"))),
        })
    }

    /// Answers once Redis answers a PING.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn();
        ::redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    fn conn(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        self.conns[i].clone()
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
            let keys: Vec<String> = candidate
                .ops
                .iter()
                .map(|op| self.counter_key(&op.key))
                .collect();
            inv.arg(candidate.ops.len())
                .arg(reservation_record(candidate, &keys));
            for (op, key) in candidate.ops.iter().zip(keys) {
                inv.key(key);
                let flags = u8::from(op.enforced)
                    | u8::from(op.downgradable) << 1
                    | u8::from(op.release_on_settle) << 2;
                let expiry = match op.expiry {
                    Expiry::Never => 0,
                    Expiry::At(t) => t.max(1),
                    Expiry::AfterFirstUse(d) => -d.max(1),
                };
                inv.arg(op.amount).arg(op.limit).arg(flags).arg(expiry);
            }
        }
        let mut conn = self.conn();
        let reply: Vec<::redis::Value> = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        parse_outcome(&reply)
            .ok_or_else(|| StoreError::Unavailable(format!("unexpected reserve reply {reply:?}")))
    }

    async fn reservation(&self, id: &str, _now: Millis) -> Result<Option<Reservation>, StoreError> {
        let mut conn = self.conn();
        let text: Option<String> = ::redis::cmd("GET")
            .arg(self.reservation_key(id))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Some(text) = text else {
            return Ok(None);
        };
        parse_reservation(&text, &format!("{}c:", self.prefix))
            .map(Some)
            .ok_or_else(|| StoreError::Unavailable(format!("reservation {id} is malformed")))
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
        let mut conn = self.conn();
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
        if counters.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.read.prepare_invoke();
        for c in counters {
            inv.key(self.counter_key(&c.key));
        }
        inv.arg(now);
        let mut conn = self.conn();
        let values: Vec<i64> = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        Ok(values
            .chunks(2)
            .map(|pair| CounterState {
                used_before: pair[0],
                resets_at: pair.get(1).copied().filter(|t| *t >= 0),
            })
            .collect())
    }
}

/// What a candidate's reservation will hold if it is applied: the model,
/// then one line per counter with its kind (plain, rolling or gauge), unit,
/// reserved amount and key. Built here so that the script only stores it.
fn reservation_record(candidate: &Candidate, keys: &[String]) -> String {
    let mut record = candidate.model.clone().unwrap_or_default();
    for (op, key) in candidate.ops.iter().zip(keys) {
        let kind = match (op.release_on_settle, op.expiry) {
            (true, _) => 'g',
            (false, Expiry::AfterFirstUse(_)) => 'r',
            _ => 'p',
        };
        record.push_str(&format!(
            "\n{kind}\t{}\t{}\t{key}",
            op.unit.name(),
            op.amount
        ));
    }
    record
}

fn parse_reservation(text: &str, counter_prefix: &str) -> Option<Reservation> {
    let mut lines = text.split('\n');
    let (settled, expires) = lines.next()?.split_once(' ')?;
    let model = lines.next()?;
    let ops = lines
        .map(|line| {
            let mut parts = line.splitn(4, '\t');
            let kind = parts.next()?;
            let unit = Unit::parse(parts.next()?)?;
            let amount = parts.next()?.parse().ok()?;
            let key = parts.next()?.strip_prefix(counter_prefix)?.to_string();
            Some(ReservedOp {
                key,
                unit,
                amount,
                release_on_settle: kind == "g",
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Reservation {
        model: (!model.is_empty()).then(|| model.to_string()),
        ops,
        settled: settled == "1",
        expires_at: expires.parse().ok()?,
    })
}

fn parse_outcome(reply: &[::redis::Value]) -> Option<ReserveOutcome> {
    use ::redis::Value;
    let int = |v: &Value| match v {
        Value::Int(n) => Some(*n),
        _ => None,
    };
    let mut it = reply.iter();
    let replayed = int(it.next()?)? == 1;
    let rid = match it.next()? {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
        Value::SimpleString(s) => s.clone(),
        _ => return None,
    };
    let applied = int(it.next()?)?;
    let tried_count = usize::try_from(int(it.next()?)?).ok()?;
    let mut tried = Vec::with_capacity(tried_count);
    for _ in 0..tried_count {
        let n = usize::try_from(int(it.next()?)?).ok()?;
        let mut states = Vec::with_capacity(n);
        for _ in 0..n {
            let used = int(it.next()?)?;
            let reset = int(it.next()?)?;
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
        reservation_id: (rid != "-").then_some(rid),
        replayed,
    })
}
