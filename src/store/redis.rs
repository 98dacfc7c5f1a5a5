//! The Redis store: counters shared by every replica.
//!
//! A decision is one `EVALSHA` of `reserve.lua`, which checks and reserves
//! every counter of every candidate atomically, so concurrent requests on
//! any number of replicas can never push a counter past its cap. Amounts are
//! integers (spend in micro-USD); time is the caller's, passed in, so that
//! window edges do not depend on Redis's clock.
//!
//! Keys: `<prefix>c:{<scope>}<rule>|<unit>|<scope>|<window>` for counters (a
//! plain integer; a hash of value `v` and logical end `e` for rolling
//! windows; a sorted set of reservation ids for concurrency gauges),
//! `<prefix>r:{..}<id>` for reservations, `<prefix>q:{..}<hash>` for
//! request-id replays and `<prefix>g:{<scope>}<rule>|<scope>` for approval
//! grants (in the slot of the counters they open). Every one of those keys
//! carries a TTL, so counters of removed rules and old windows disappear by
//! themselves. `<prefix>grants` (a hash) lists the grants, and
//! `<prefix>log:<name>` are append-only streams (the approvals audit trail,
//! the alert feed), capped at about `MAX_LOG_ENTRIES` entries.
//!
//! On Redis Cluster the `{scope}` hash tag puts counters that share a scope
//! in one slot. A decision whose keys all share a slot is still one script;
//! otherwise it runs one script per slot, in order, and undoes the slots
//! already reserved when a later one does not fit. Each slot's check and
//! reserve is atomic, so no counter ever ends above its cap; the price is
//! that a request undone this way may briefly have held budget that a
//! concurrent request was then denied.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{FromRedisValue, Script, ScriptInvocation, Value};
use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::*;
use crate::policy::{hex, Unit};

/// Extra lifetime on every key beyond its logical end, so that a settle
/// arriving just after still finds it.
const CLEANUP_GRACE: Millis = 60_000;

/// Entries kept per append-only log stream (trimmed approximately).
pub const MAX_LOG_ENTRIES: usize = 1_000_000;

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
    reserve: Arc<Script>,
    settle: Arc<Script>,
    read: Arc<Script>,
    adjust: Arc<Script>,
    claim: Arc<Script>,
    forget_grant: Arc<Script>,
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
            // Drops a listing only if it is still the one read, so a grant
            // made meanwhile is never dropped with the lapsed one.
            forget_grant: Arc::new(Script::new(
                "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then \
                 return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0",
            )),
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

    fn counter_key(&self, key: &str) -> String {
        format!("{}c:{{{}}}{key}", self.prefix, slot_tag(key))
    }

    /// A grant's key (`rule|scope`) shares the slot of the counters of its
    /// scope, so the reserve script can read it.
    fn grant_key(&self, key: &str) -> String {
        let tag = key.rsplit('|').next().unwrap_or(key);
        format!("{}g:{{{tag}}}{key}", self.prefix)
    }

    /// Every grant's full record, in one hash for listing.
    fn grant_index_key(&self) -> String {
        format!("{}grants", self.prefix)
    }

    fn log_key(&self, log: &str) -> String {
        format!("{}log:{log}", self.prefix)
    }

    /// Reservation ids are `<random>` or `<random>.<tag>`; the tag puts the
    /// reservation in the slot of the counters it holds.
    fn reservation_key(&self, id: &str) -> String {
        match id.split_once('.') {
            Some((random, tag)) => format!("{}r:{{{tag}}}{random}", self.prefix),
            None => format!("{}r:{{{id}}}", self.prefix),
        }
    }

    fn replay_key(&self, tag: &str, request_id: Option<&str>) -> String {
        let hash = request_id
            .map(|r| hex(&Sha256::digest(r.as_bytes())[..16]))
            .unwrap_or_default();
        format!("{}q:{{{tag}}}{hash}", self.prefix)
    }

    /// Runs `reserve.lua` for `candidates` whose keys all share `tag`'s
    /// slot. `key_id` places the reservation key; `reservation_id` is what
    /// the reservation is known by (and what holds concurrency slots).
    async fn reserve_in_slot(
        &self,
        req: &ReserveRequest,
        candidates: &[&Candidate],
        tag: &str,
        key_id: &str,
        reservation_id: &str,
        record: bool,
    ) -> Result<ReserveOutcome, StoreError> {
        let mut inv = self.reserve.prepare_invoke();
        inv.key(self.reservation_key(key_id));
        inv.key(self.replay_key(tag, req.request_id.as_deref()));
        let replay = if record && req.request_id.is_some() {
            memory::REPLAY_WINDOW
        } else {
            0
        };
        inv.arg(req.now)
            .arg(req.reservation_ttl + CLEANUP_GRACE)
            .arg(reservation_id)
            .arg(replay)
            .arg(CLEANUP_GRACE)
            .arg(candidates.len());
        for candidate in candidates {
            let keys: Vec<String> = candidate
                .ops
                .iter()
                .map(|op| self.counter_key(&op.key))
                .collect();
            let text = if record {
                reservation_text(req.now + req.reservation_ttl, candidate, &keys)
            } else {
                String::new()
            };
            inv.arg(candidate.ops.len()).arg(text);
            for (op, key) in candidate.ops.iter().zip(keys) {
                inv.key(key);
                inv.arg(op.amount)
                    .arg(op.limit)
                    .arg(&script_mode(op)[..])
                    .arg(script_expiry(op, req));
            }
            for grant in candidate.ops.iter().filter_map(|op| op.grant.as_ref()) {
                inv.key(self.grant_key(&grant.key));
            }
        }
        let reply: Vec<Value> = self.invoke(&inv).await?;
        parse_outcome(&reply)
            .ok_or_else(|| StoreError::Unavailable(format!("unexpected reserve reply {reply:?}")))
    }

    /// Moves each `(key, kind, delta)` in one slot; see `adjust.lua`.
    async fn adjust(
        &self,
        now: Millis,
        rid: &str,
        moves: &[(String, char, i64)],
    ) -> Result<(), StoreError> {
        for group in by_tag(moves.iter().map(|(k, _, _)| k.as_str())).values() {
            let mut inv = self.adjust.prepare_invoke();
            inv.arg(now).arg(rid);
            for &i in group {
                let (key, kind, delta) = &moves[i];
                inv.key(self.counter_key(key))
                    .arg(kind.to_string())
                    .arg(*delta);
            }
            self.invoke::<String>(&inv).await?;
        }
        Ok(())
    }

    /// Gives back what `candidate`'s ops at `indices` reserved. Best
    /// effort: if it fails, those counters stay charged, on the side of
    /// denying rather than overspending.
    async fn undo(&self, now: Millis, rid: &str, candidate: &Candidate, indices: &[usize]) {
        if indices.is_empty() {
            return;
        }
        let moves: Vec<(String, char, i64)> = indices
            .iter()
            .map(|&i| {
                let op = &candidate.ops[i];
                (op.key.clone(), kind_of(op), -op.amount)
            })
            .collect();
        if let Err(e) = self.adjust(now, rid, &moves).await {
            tracing::error!(error = %e, "could not undo a partial reservation across slots; its counters stay charged");
        }
    }

    /// A decision whose keys span several cluster slots: one script per
    /// slot, undoing earlier slots when a later one does not fit or fails.
    async fn reserve_across_slots(
        &self,
        req: &ReserveRequest,
    ) -> Result<ReserveOutcome, StoreError> {
        let replay_key = self.replay_key(
            &format!("q{}", req.request_id.as_deref().unwrap_or("")),
            req.request_id.as_deref(),
        );
        if req.request_id.is_some() {
            let prev: Option<String> = self.query(::redis::cmd("GET").arg(&replay_key)).await?;
            if let Some(outcome) = prev.as_deref().and_then(|p| parse_replay(p, req.now)) {
                return Ok(outcome);
            }
        }
        let rid = req.reservation_id.clone();
        let mut tried = Vec::new();
        let mut applied = None;
        for (ci, candidate) in req.candidates.iter().enumerate() {
            let groups = by_tag(candidate.ops.iter().map(|op| op.key.as_str()));
            let mut states: Vec<Option<CounterState>> = vec![None; candidate.ops.len()];
            let mut done: Vec<usize> = Vec::new();
            let mut fit_result = Fit::Fits;
            for (tag, indices) in &groups {
                let part = Candidate {
                    model: candidate.model.clone(),
                    ops: indices.iter().map(|&i| candidate.ops[i].clone()).collect(),
                };
                let out = match self
                    .reserve_in_slot(req, &[&part], tag, &format!("{rid}.{tag}"), &rid, false)
                    .await
                {
                    Ok(out) => out,
                    Err(e) => {
                        self.undo(req.now, &rid, candidate, &done).await;
                        return Err(e);
                    }
                };
                for (&i, s) in indices.iter().zip(&out.tried[0]) {
                    states[i] = Some(*s);
                }
                if out.applied.is_some() {
                    done.extend(indices);
                    continue;
                }
                fit_result = fit(&part.ops, |j| out.tried[0][j]);
                break;
            }
            if fit_result != Fit::Fits {
                self.undo(req.now, &rid, candidate, &done).await;
                let missing: Vec<usize> =
                    (0..states.len()).filter(|&i| states[i].is_none()).collect();
                if !missing.is_empty() {
                    let refs: Vec<CounterRef> = missing
                        .iter()
                        .map(|&i| CounterRef {
                            key: candidate.ops[i].key.clone(),
                            gauge: candidate.ops[i].release_on_settle,
                        })
                        .collect();
                    for (&i, mut s) in missing.iter().zip(self.read(&refs, req.now).await?) {
                        // Not reached, so not what blocked: an approval gate
                        // there reads as open rather than be named the cause.
                        if candidate.ops[i].grant.is_some() {
                            s.grant = Some(0);
                        }
                        states[i] = Some(s);
                    }
                }
            }
            tried.push(states.into_iter().map(Option::unwrap_or_default).collect());
            match fit_result {
                Fit::Fits => {
                    applied = Some(ci);
                    break;
                }
                Fit::TryNext => continue,
                Fit::Blocked => break,
            }
        }
        if let Some(ci) = applied {
            let candidate = &req.candidates[ci];
            let keys: Vec<String> = candidate
                .ops
                .iter()
                .map(|op| self.counter_key(&op.key))
                .collect();
            let text = reservation_text(req.now + req.reservation_ttl, candidate, &keys);
            let stored = self
                .query::<()>(
                    ::redis::cmd("SET")
                        .arg(self.reservation_key(&rid))
                        .arg(text)
                        .arg("PX")
                        .arg(req.reservation_ttl + CLEANUP_GRACE),
                )
                .await;
            if let Err(e) = stored {
                let all: Vec<usize> = (0..candidate.ops.len()).collect();
                self.undo(req.now, &rid, candidate, &all).await;
                return Err(e);
            }
        }
        let outcome = ReserveOutcome {
            applied,
            tried,
            reservation_id: applied.map(|_| rid),
            replayed: false,
        };
        if req.request_id.is_some() {
            let text = format!(
                "{} {}",
                req.now + memory::REPLAY_WINDOW,
                replay_text(&outcome)
            );
            // The decision stands without it; only a repeat would be
            // decided again.
            if let Err(e) = self
                .query::<()>(
                    ::redis::cmd("SET")
                        .arg(&replay_key)
                        .arg(text)
                        .arg("PX")
                        .arg(memory::REPLAY_WINDOW + CLEANUP_GRACE),
                )
                .await
            {
                tracing::warn!(error = %e, "could not record a request id for replays");
            }
        }
        Ok(outcome)
    }
}

#[async_trait]
impl CounterStore for RedisStore {
    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, StoreError> {
        let candidates: Vec<&Candidate> = req.candidates.iter().collect();
        if !self.cluster() {
            return self
                .reserve_in_slot(
                    req,
                    &candidates,
                    "",
                    &req.reservation_id,
                    &req.reservation_id,
                    true,
                )
                .await;
        }
        let tags = by_tag(
            req.candidates
                .iter()
                .flat_map(|c| c.ops.iter().map(|op| op.key.as_str())),
        );
        match tags.keys().next() {
            Some(tag) if tags.len() == 1 => {
                let id = format!("{}.{tag}", req.reservation_id);
                self.reserve_in_slot(req, &candidates, tag, &id, &id, true)
                    .await
            }
            _ => self.reserve_across_slots(req).await,
        }
    }

    async fn reservation(&self, id: &str, _now: Millis) -> Result<Option<Reservation>, StoreError> {
        let text: Option<String> = self
            .query(::redis::cmd("GET").arg(self.reservation_key(id)))
            .await?;
        let Some(text) = text else {
            return Ok(None);
        };
        parse_reservation(&text, &self.prefix)
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
        let record_tag = id.split_once('.').map(|(_, t)| t);
        let one_slot = !self.cluster()
            || reservation
                .ops
                .iter()
                .all(|op| Some(slot_tag(&op.key)) == record_tag);
        if one_slot {
            let mut inv = self.settle.prepare_invoke();
            inv.key(self.reservation_key(id));
            inv.arg(now).arg(id);
            for (i, op) in reservation.ops.iter().enumerate() {
                inv.key(self.counter_key(&op.key));
                inv.arg(actual.get(i).copied().unwrap_or(0));
            }
            let outcome: String = self.invoke(&inv).await?;
            return Ok(match outcome.as_str() {
                "settled" => SettleOutcome::Settled,
                "already_settled" => SettleOutcome::AlreadySettled,
                _ => SettleOutcome::Unknown,
            });
        }
        // Across slots: claim the reservation once, then move each slot.
        let mut inv = self.claim.prepare_invoke();
        inv.key(self.reservation_key(id)).arg(now);
        let claimed: String = self.invoke(&inv).await?;
        match claimed.as_str() {
            "unknown" => return Ok(SettleOutcome::Unknown),
            "already_settled" => return Ok(SettleOutcome::AlreadySettled),
            _ => {}
        }
        let moves: Vec<(String, char, i64)> = reservation
            .ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                (
                    op.key.clone(),
                    kind_of_reserved(op),
                    actual.get(i).copied().unwrap_or(0) - op.amount,
                )
            })
            .collect();
        self.adjust(now, id, &moves).await?;
        Ok(SettleOutcome::Settled)
    }

    async fn read(
        &self,
        counters: &[CounterRef],
        now: Millis,
    ) -> Result<Vec<CounterState>, StoreError> {
        let mut out = vec![CounterState::default(); counters.len()];
        for group in by_tag(counters.iter().map(|c| c.key.as_str())).values() {
            let mut inv = self.read.prepare_invoke();
            for &i in group {
                inv.key(self.counter_key(&counters[i].key));
            }
            inv.arg(now);
            let values: Vec<i64> = self.invoke(&inv).await?;
            for (&i, pair) in group.iter().zip(values.chunks(2)) {
                out[i] = CounterState {
                    used_before: pair[0],
                    resets_at: pair.get(1).copied().filter(|t| *t >= 0),
                    grant: None,
                };
            }
        }
        Ok(out)
    }

    async fn put_grant(&self, grant: &Grant, now: Millis) -> Result<(), StoreError> {
        let record = serde_json::to_string(grant)
            .map_err(|e| StoreError::Unavailable(format!("cannot encode a grant: {e}")))?;
        // The index first: a grant that is listed but not yet in force is
        // visible to the approver; one in force but unlisted would not be.
        self.query::<()>(
            ::redis::cmd("HSET")
                .arg(self.grant_index_key())
                .arg(&grant.key)
                .arg(record),
        )
        .await?;
        let ttl = (grant.expires_at - now).max(1) + CLEANUP_GRACE;
        let in_force = self
            .query::<()>(
                ::redis::cmd("SET")
                    .arg(self.grant_key(&grant.key))
                    .arg(format!("{} {}", grant.extra, grant.expires_at))
                    .arg("PX")
                    .arg(ttl),
            )
            .await;
        if in_force.is_err() {
            // Listed but not in force would mislead; best effort.
            let _ = self
                .query::<()>(
                    ::redis::cmd("HDEL")
                        .arg(self.grant_index_key())
                        .arg(&grant.key),
                )
                .await;
        }
        in_force
    }

    async fn remove_grant(&self, key: &str, now: Millis) -> Result<Option<Grant>, StoreError> {
        // Out of force first, then out of the listing.
        self.query::<()>(::redis::cmd("DEL").arg(self.grant_key(key)))
            .await?;
        let record: Option<String> = self
            .query(::redis::cmd("HGET").arg(self.grant_index_key()).arg(key))
            .await?;
        self.query::<()>(::redis::cmd("HDEL").arg(self.grant_index_key()).arg(key))
            .await?;
        Ok(record
            .and_then(|r| serde_json::from_str::<Grant>(&r).ok())
            .filter(|g| g.active(now)))
    }

    async fn grants(&self, now: Millis) -> Result<Vec<Grant>, StoreError> {
        let records: Vec<(String, String)> = self
            .query(::redis::cmd("HGETALL").arg(self.grant_index_key()))
            .await?;
        let mut grants = Vec::new();
        for (key, record) in records {
            match serde_json::from_str::<Grant>(&record) {
                Ok(g) if g.active(now) => grants.push(g),
                _ => {
                    let mut inv = self.forget_grant.prepare_invoke();
                    inv.key(self.grant_index_key()).arg(&key).arg(&record);
                    self.invoke::<i64>(&inv).await?;
                }
            }
        }
        grants.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(grants)
    }

    async fn append(&self, log: &str, entry: &str) -> Result<(), StoreError> {
        self.query::<String>(
            ::redis::cmd("XADD")
                .arg(self.log_key(log))
                .arg("MAXLEN")
                .arg("~")
                .arg(MAX_LOG_ENTRIES)
                .arg("*")
                .arg("entry")
                .arg(entry),
        )
        .await
        .map(|_| ())
    }

    async fn entries(&self, log: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        let reply: Vec<(String, Vec<(String, String)>)> = self
            .query(
                ::redis::cmd("XREVRANGE")
                    .arg(self.log_key(log))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(limit),
            )
            .await?;
        Ok(reply
            .into_iter()
            .rev()
            .filter_map(|(_, fields)| {
                fields
                    .into_iter()
                    .find(|(name, _)| name == "entry")
                    .map(|(_, v)| v)
            })
            .collect())
    }
}

/// The hash tag of a counter: its scope hash (`rule|unit|scope|window`), so
/// that counters of one scope share a cluster slot.
fn slot_tag(key: &str) -> &str {
    key.split('|').nth(2).unwrap_or(key)
}

/// Indices of `keys` grouped by hash tag, in a stable order.
fn by_tag<'a>(keys: impl Iterator<Item = &'a str>) -> BTreeMap<String, Vec<usize>> {
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, key) in keys.enumerate() {
        groups.entry(slot_tag(key).to_string()).or_default().push(i);
    }
    groups
}

/// An op's `mode` for `reserve.lua`: its flags as one character.
fn script_mode(op: &CounterOp) -> [u8; 1] {
    let grant = match &op.grant {
        None => 0,
        Some(g) if g.required => 16 | 32,
        Some(_) => 16,
    };
    let kind = kind_of(op);
    let mode = u8::from(op.enforced)
        | u8::from(op.downgradable) << 1
        | u8::from(kind == 'g') << 2
        | u8::from(kind == 'r') << 3
        | grant;
    [b'0' + mode]
}

/// An op's `expiry` for `reserve.lua`, relative to the caller's clock.
fn script_expiry(op: &CounterOp, req: &ReserveRequest) -> Millis {
    match (kind_of(op), op.expiry) {
        ('g', _) => req.reservation_ttl,
        (_, Expiry::Never) => 0,
        (_, Expiry::At(t)) => (t - req.now).max(1) + CLEANUP_GRACE,
        (_, Expiry::AfterFirstUse(d)) => d.max(1),
    }
}

fn kind_of(op: &CounterOp) -> char {
    match (op.release_on_settle, op.expiry) {
        (true, _) => 'g',
        (false, Expiry::AfterFirstUse(_)) => 'r',
        _ => 'p',
    }
}

fn kind_of_reserved(op: &ReservedOp) -> char {
    if op.release_on_settle {
        'g'
    } else if op.rolling {
        'r'
    } else {
        'p'
    }
}

/// What a candidate's reservation will hold if it is applied: unsettled
/// and when it lapses, the model, then one line per counter with its kind
/// (plain, rolling or gauge), unit, reserved amount and key. Built here so
/// that the script only stores it.
fn reservation_text(expires_at: Millis, candidate: &Candidate, keys: &[String]) -> String {
    use std::fmt::Write;
    let model = candidate.model.as_deref().unwrap_or_default();
    let mut record =
        String::with_capacity(24 + model.len() + keys.iter().map(|k| k.len() + 32).sum::<usize>());
    let _ = write!(record, "0 {expires_at}\n{model}");
    for (op, key) in candidate.ops.iter().zip(keys) {
        let _ = write!(
            record,
            "\n{}\t{}\t{}\t{key}",
            kind_of(op),
            op.unit.name(),
            op.amount
        );
    }
    record
}

fn parse_reservation(text: &str, prefix: &str) -> Option<Reservation> {
    let counter_prefix = format!("{prefix}c:");
    let mut lines = text.split('\n');
    let (settled, expires) = lines.next()?.split_once(' ')?;
    let model = lines.next()?;
    let ops = lines
        .map(|line| {
            let mut parts = line.splitn(4, '\t');
            let kind = parts.next()?;
            let unit = Unit::parse(parts.next()?)?;
            let amount = parts.next()?.parse().ok()?;
            let tagged = parts.next()?.strip_prefix(&counter_prefix)?;
            let key = tagged
                .split_once('}')
                .map(|(_, k)| k)
                .unwrap_or(tagged)
                .to_string();
            Some(ReservedOp {
                key,
                unit,
                amount,
                release_on_settle: kind == "g",
                rolling: kind == "r",
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

fn parse_outcome(reply: &[Value]) -> Option<ReserveOutcome> {
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
    let mut rest = Vec::new();
    for v in it {
        rest.push(int(v)?);
    }
    outcome_from(&rid, &rest, replayed)
}

/// `<rid or -> <applied or -1> <tried> (<n> (<used> <reset or -1> <grant or -1>)*)*`
fn outcome_from(rid: &str, numbers: &[i64], replayed: bool) -> Option<ReserveOutcome> {
    let mut it = numbers.iter().copied();
    let applied = it.next()?;
    let tried_count = usize::try_from(it.next()?).ok()?;
    let mut tried = Vec::with_capacity(tried_count);
    for _ in 0..tried_count {
        let n = usize::try_from(it.next()?).ok()?;
        let mut states = Vec::with_capacity(n);
        for _ in 0..n {
            let used = it.next()?;
            let reset = it.next()?;
            let grant = it.next()?;
            states.push(CounterState {
                used_before: used,
                resets_at: (reset >= 0).then_some(reset),
                grant: (grant >= 0).then_some(grant),
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

fn replay_text(o: &ReserveOutcome) -> String {
    let mut parts = vec![
        o.reservation_id.clone().unwrap_or_else(|| "-".to_string()),
        o.applied.map(|a| a as i64).unwrap_or(-1).to_string(),
        o.tried.len().to_string(),
    ];
    for states in &o.tried {
        parts.push(states.len().to_string());
        for s in states {
            parts.push(s.used_before.to_string());
            parts.push(s.resets_at.unwrap_or(-1).to_string());
            parts.push(s.grant.unwrap_or(-1).to_string());
        }
    }
    parts.join(" ")
}

fn parse_replay(text: &str, now: Millis) -> Option<ReserveOutcome> {
    let (until, rest) = text.split_once(' ')?;
    if until.parse::<Millis>().ok()? <= now {
        return None;
    }
    let (rid, numbers) = rest.split_once(' ')?;
    let numbers: Vec<i64> = numbers
        .split(' ')
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    outcome_from(rid, &numbers, true)
}
