//! The bytes of the data directory: how a record is framed and checked,
//! and how each logged store call is written. Pure functions, no I/O;
//! anything that does not decode is a [`Damage`] with its offset, never a
//! guess.
//!
//! A file is an 8-byte magic, then records. A record is
//!
//! ```text
//! len: u32 LE | crc: u32 LE | seq: u64 LE | body (len - 8 bytes)
//! ```
//!
//! where `crc` is the CRC-32 (IEEE) of `seq` and the body, and `seq`
//! numbers every logged call from 1, one after another. The log's body is
//! one store call ([`Call`]); the snapshot holds one record whose body is
//! the embedded store's state and whose `seq` is the last call it covers.

use crate::clock::Millis;
use crate::policy::Unit;
use crate::store::{
    AlertMarker, Candidate, CounterKind, CounterOp, Expiry, Grant, GrantRef, ReserveRequest,
    SpendBounds, SpendDelta, SpendDims, SpendEntry,
};

pub(super) const LOG_MAGIC: &[u8; 8] = b"TGLOG001";
pub(super) const SNAPSHOT_MAGIC: &[u8; 8] = b"TGSNAP01";
/// `len` and `crc`.
pub(super) const HEADER: usize = 8;
/// A record longer than this is damage, not a record: the biggest real
/// call is a few kilobytes; a snapshot of a full store is a few hundred
/// megabytes.
pub(super) const MAX_RECORD: usize = 1 << 31;

/// Where a file stops making sense, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Byte offset in the file of the record (or field) that is wrong.
    pub offset: u64,
    pub what: String,
}

fn damage(offset: usize, what: impl Into<String>) -> Damage {
    Damage {
        offset: offset as u64,
        what: what.into(),
    }
}

/// A store call as the log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Call {
    Reserve(ReserveRequest),
    Settle {
        id: String,
        actual: Vec<i64>,
        now: Millis,
    },
    PutGrant {
        grant: Grant,
        now: Millis,
    },
    RemoveGrant {
        key: String,
        now: Millis,
    },
    Append {
        log: String,
        entry: String,
    },
    Withdraw {
        id: String,
        request_id: Option<String>,
        now: Millis,
    },
    MarkAlerts {
        markers: Vec<AlertMarker>,
        now: Millis,
    },
    RecordSpend {
        /// Replayed with its id, so that a batch sent twice is still
        /// added once.
        batch: String,
        deltas: Vec<SpendDelta>,
        bounds: SpendBounds,
        now: Millis,
    },
}

const RESERVE: u8 = 1;
const SETTLE: u8 = 2;
const PUT_GRANT: u8 = 3;
const REMOVE_GRANT: u8 = 4;
const APPEND: u8 = 5;
const WITHDRAW: u8 = 6;
const MARK_ALERTS: u8 = 7;
const RECORD_SPEND: u8 = 8;

// ---- framing ----

/// Appends one record to `buf` with `body` written by `write`, and its
/// checksum left at zero: [`seal`] fills it in, off the caller's path.
pub(super) fn frame(buf: &mut Vec<u8>, seq: u64, write: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    buf.extend_from_slice(&seq.to_le_bytes());
    write(buf);
    let len = (buf.len() - start - HEADER) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Fills in the checksum of every record in `buf`, which holds whole
/// records made by [`frame`].
pub(super) fn seal(buf: &mut [u8]) {
    let mut at = 0;
    while at + HEADER <= buf.len() {
        let len = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
        let end = (at + HEADER + len).min(buf.len());
        let crc = crc32(&buf[at + HEADER..end]);
        buf[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

/// A record's seq, its body, and where the next record starts.
pub(super) type Record<'a> = (u64, &'a [u8], usize);

/// One checked record of `data` at `at`; `None` at the end of the data.
pub(super) fn record(data: &[u8], at: usize) -> Result<Option<Record<'_>>, Damage> {
    if at == data.len() {
        return Ok(None);
    }
    let left = data.len() - at;
    if left < HEADER + 8 {
        return Err(damage(
            at,
            format!("cut short: a record header needs 16 bytes, {left} remain (a torn write?)"),
        ));
    }
    let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap_or_default()) as usize;
    if !(8..=MAX_RECORD).contains(&len) {
        return Err(damage(at, format!("not a record: length {len}")));
    }
    if len > left - HEADER {
        return Err(damage(
            at,
            format!(
                "cut short: a record of {} bytes, {left} remain (a torn write or a full disk?)",
                len + HEADER
            ),
        ));
    }
    let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap_or_default());
    let payload = &data[at + HEADER..at + HEADER + len];
    if crc32(payload) != crc {
        return Err(damage(at, "checksum mismatch: the record is damaged"));
    }
    let seq = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
    Ok(Some((seq, &payload[8..], at + HEADER + len)))
}

/// CRC-32 (IEEE 802.3, as zlib and gzip), table-driven.
pub(super) fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

// ---- calls ----

pub(super) fn put_reserve(buf: &mut Vec<u8>, req: &ReserveRequest) {
    buf.push(RESERVE);
    put_i64(buf, req.now);
    put_str(buf, &req.reservation_id);
    put_i64(buf, req.reservation_ttl);
    put_opt_str(buf, req.request_id.as_deref());
    put_u32(buf, req.candidates.len());
    for c in &req.candidates {
        put_opt_str(buf, c.model.as_deref());
        put_u32(buf, c.ops.len());
        for op in &c.ops {
            put_str(buf, &op.key);
            buf.push(unit_code(op.unit));
            put_i64(buf, op.amount);
            put_i64(buf, op.limit);
            buf.push(u8::from(op.enforced) | (u8::from(op.downgradable) << 1));
            match op.expiry {
                Expiry::At(t) => {
                    buf.push(0);
                    put_i64(buf, t);
                }
                Expiry::AfterFirstUse(d) => {
                    buf.push(1);
                    put_i64(buf, d);
                }
                Expiry::Never => buf.push(2),
            }
            buf.push(kind_code(op.kind));
            match &op.grant {
                None => buf.push(0),
                Some(g) => {
                    buf.push(1 + u8::from(g.required));
                    put_str(buf, &g.key);
                }
            }
        }
    }
    put_opt_str(buf, req.account.as_deref());
}

pub(super) fn put_settle(buf: &mut Vec<u8>, id: &str, actual: &[i64], now: Millis) {
    buf.push(SETTLE);
    put_str(buf, id);
    put_i64(buf, now);
    put_u32(buf, actual.len());
    for a in actual {
        put_i64(buf, *a);
    }
}

pub(super) fn put_grant(buf: &mut Vec<u8>, g: &Grant, now: Millis) {
    buf.push(PUT_GRANT);
    put_i64(buf, now);
    put_str(buf, &g.rule);
    put_str(buf, &g.scope);
    put_str(buf, &g.key);
    buf.push(unit_code(g.unit));
    put_i64(buf, g.extra);
    put_i64(buf, g.expires_at);
    put_str(buf, &g.approver);
    put_str(buf, &g.reason);
    put_i64(buf, g.created_at);
}

pub(super) fn put_remove_grant(buf: &mut Vec<u8>, key: &str, now: Millis) {
    buf.push(REMOVE_GRANT);
    put_str(buf, key);
    put_i64(buf, now);
}

pub(super) fn put_append(buf: &mut Vec<u8>, log: &str, entry: &str) {
    buf.push(APPEND);
    put_str(buf, log);
    put_str(buf, entry);
}

pub(super) fn put_withdraw(buf: &mut Vec<u8>, id: &str, request_id: Option<&str>, now: Millis) {
    buf.push(WITHDRAW);
    put_str(buf, id);
    put_opt_str(buf, request_id);
    put_i64(buf, now);
}

pub(super) fn put_mark_alerts(buf: &mut Vec<u8>, markers: &[AlertMarker], now: Millis) {
    buf.push(MARK_ALERTS);
    put_i64(buf, now);
    put_u32(buf, markers.len());
    for m in markers {
        put_str(buf, &m.key);
        match m.expires_at {
            None => buf.push(0),
            Some(t) => {
                buf.push(1);
                put_i64(buf, t);
            }
        }
        put_str(buf, &m.token);
    }
}

pub(super) fn put_record_spend(
    buf: &mut Vec<u8>,
    batch: &str,
    deltas: &[SpendDelta],
    bounds: SpendBounds,
    now: Millis,
) {
    buf.push(RECORD_SPEND);
    put_str(buf, batch);
    put_i64(buf, now);
    put_u32(buf, bounds.max_rows_per_day);
    put_i64(buf, bounds.retention);
    put_u32(buf, deltas.len());
    for d in deltas {
        put_i64(buf, d.day);
        for v in &d.dims.0 {
            put_str(buf, v);
        }
        buf.push(u8::from(d.settled));
        for v in d.entry.values() {
            buf.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// The call in a log record's `body`, which starts at byte `base` of the
/// file (for the offsets of errors).
pub(super) fn call(body: &[u8], base: usize) -> Result<Call, Damage> {
    let mut r = Reader {
        data: body,
        at: 0,
        base,
    };
    let call = match r.u8()? {
        RESERVE => {
            let now = r.i64()?;
            let reservation_id = r.str()?;
            let reservation_ttl = r.i64()?;
            let request_id = r.opt_str()?;
            let n = r.count()?;
            let mut candidates = Vec::with_capacity(n);
            for _ in 0..n {
                let model = r.opt_str()?;
                let m = r.count()?;
                let mut ops = Vec::with_capacity(m);
                for _ in 0..m {
                    let key = r.str()?;
                    let unit = r.unit()?;
                    let amount = r.i64()?;
                    let limit = r.i64()?;
                    let flags = r.u8()?;
                    if flags > 3 {
                        return Err(r.bad("op flags"));
                    }
                    let expiry = match r.u8()? {
                        0 => Expiry::At(r.i64()?),
                        1 => Expiry::AfterFirstUse(r.i64()?),
                        2 => Expiry::Never,
                        _ => return Err(r.bad("expiry")),
                    };
                    let kind = r.kind()?;
                    let grant = match r.u8()? {
                        0 => None,
                        g @ (1 | 2) => Some(GrantRef {
                            key: r.str()?,
                            required: g == 2,
                        }),
                        _ => return Err(r.bad("grant reference")),
                    };
                    ops.push(CounterOp {
                        key,
                        unit,
                        amount,
                        limit,
                        enforced: flags & 1 != 0,
                        downgradable: flags & 2 != 0,
                        expiry,
                        kind,
                        grant,
                        // Only a leasing store reads it.
                        alert_at: Vec::new(),
                    });
                }
                candidates.push(Candidate { model, ops });
            }
            let account = r.opt_str()?;
            Call::Reserve(ReserveRequest {
                now,
                candidates,
                reservation_id,
                reservation_ttl,
                request_id,
                account,
                // Not logged: it only spares a leasing store a record.
                final_estimate: false,
            })
        }
        SETTLE => {
            let id = r.str()?;
            let now = r.i64()?;
            let n = r.count()?;
            let mut actual = Vec::with_capacity(n);
            for _ in 0..n {
                actual.push(r.i64()?);
            }
            Call::Settle { id, actual, now }
        }
        PUT_GRANT => {
            let now = r.i64()?;
            let grant = Grant {
                rule: r.str()?,
                scope: r.str()?,
                key: r.str()?,
                unit: r.unit()?,
                extra: r.i64()?,
                expires_at: r.i64()?,
                approver: r.str()?,
                reason: r.str()?,
                created_at: r.i64()?,
            };
            Call::PutGrant { grant, now }
        }
        REMOVE_GRANT => Call::RemoveGrant {
            key: r.str()?,
            now: r.i64()?,
        },
        APPEND => Call::Append {
            log: r.str()?,
            entry: r.str()?,
        },
        WITHDRAW => Call::Withdraw {
            id: r.str()?,
            request_id: r.opt_str()?,
            now: r.i64()?,
        },
        MARK_ALERTS => {
            let now = r.i64()?;
            let n = r.count()?;
            let mut markers = Vec::with_capacity(n);
            for _ in 0..n {
                let key = r.str()?;
                let expires_at = match r.u8()? {
                    0 => None,
                    1 => Some(r.i64()?),
                    _ => return Err(r.bad("marker expiry")),
                };
                let token = r.str()?;
                markers.push(AlertMarker {
                    key,
                    expires_at,
                    token,
                });
            }
            Call::MarkAlerts { markers, now }
        }
        RECORD_SPEND => {
            let batch = r.str()?;
            let now = r.i64()?;
            let max_rows_per_day = r.u32()? as usize;
            let retention = r.i64()?;
            let n = r.count()?;
            let mut deltas = Vec::with_capacity(n);
            for _ in 0..n {
                let day = r.i64()?;
                let mut dims: [String; 8] = Default::default();
                for d in &mut dims {
                    *d = r.str()?;
                }
                let settled = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(r.bad("settled flag")),
                };
                let mut values = [0i128; 9];
                for v in &mut values {
                    let lo = r.i64()? as u64;
                    let hi = r.i64()?;
                    *v = (i128::from(hi) << 64) | i128::from(lo);
                }
                deltas.push(SpendDelta {
                    day,
                    dims: SpendDims(dims),
                    settled,
                    entry: SpendEntry::from_values(values),
                });
            }
            Call::RecordSpend {
                batch,
                deltas,
                bounds: SpendBounds {
                    max_rows_per_day,
                    retention,
                },
                now,
            }
        }
        other => return Err(damage(base, format!("unknown call type {other}"))),
    };
    if r.at != body.len() {
        return Err(r.bad("trailing bytes"));
    }
    Ok(call)
}

/// The one mapping of units to bytes; a new unit must be added here.
fn unit_code(u: Unit) -> u8 {
    match u {
        Unit::Requests => 0,
        Unit::InputTokens => 1,
        Unit::OutputTokens => 2,
        Unit::Tokens => 3,
        Unit::Images => 4,
        Unit::VideoJobs => 5,
        Unit::VideoSeconds => 6,
        Unit::AudioSeconds => 7,
        Unit::Spend => 8,
        Unit::Concurrent => 9,
    }
}

const UNITS: [Unit; 10] = [
    Unit::Requests,
    Unit::InputTokens,
    Unit::OutputTokens,
    Unit::Tokens,
    Unit::Images,
    Unit::VideoJobs,
    Unit::VideoSeconds,
    Unit::AudioSeconds,
    Unit::Spend,
    Unit::Concurrent,
];

fn kind_code(k: CounterKind) -> u8 {
    match k {
        CounterKind::Plain => 0,
        CounterKind::Rolling => 1,
        CounterKind::Gauge => 2,
    }
}

fn put_i64(buf: &mut Vec<u8>, v: i64) {
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(buf: &mut Vec<u8>, n: usize) {
    buf.extend_from_slice(&(n as u32).to_le_bytes());
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_u32(buf, s.len());
    buf.extend_from_slice(s.as_bytes());
}

fn put_opt_str(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => buf.push(0),
        Some(s) => {
            buf.push(1);
            put_str(buf, s);
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
    base: usize,
}

impl Reader<'_> {
    fn bad(&self, what: &str) -> Damage {
        damage(self.base + self.at, format!("malformed record: bad {what}"))
    }

    fn take(&mut self, n: usize) -> Result<&[u8], Damage> {
        if self.data.len() - self.at < n {
            return Err(self.bad("length (the record ends inside a field)"));
        }
        let s = &self.data[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, Damage> {
        Ok(self.take(1)?[0])
    }

    fn i64(&mut self) -> Result<i64, Damage> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }

    fn u32(&mut self) -> Result<u32, Damage> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }

    fn count(&mut self) -> Result<usize, Damage> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().unwrap_or_default()) as usize;
        // Every element takes at least a byte: a larger count is damage,
        // and must not become a huge allocation.
        if n > self.data.len() - self.at {
            return Err(self.bad("count"));
        }
        Ok(n)
    }

    fn str(&mut self) -> Result<String, Damage> {
        let n = self.count()?;
        let at = self.at;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| damage(self.base + at, "malformed record: a string is not UTF-8"))
    }

    fn opt_str(&mut self) -> Result<Option<String>, Damage> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.str()?)),
            _ => Err(self.bad("optional string")),
        }
    }

    fn unit(&mut self) -> Result<Unit, Damage> {
        let code = self.u8()?;
        UNITS
            .get(usize::from(code))
            .copied()
            .ok_or_else(|| self.bad("unit"))
    }

    fn kind(&mut self) -> Result<CounterKind, Damage> {
        match self.u8()? {
            0 => Ok(CounterKind::Plain),
            1 => Ok(CounterKind::Rolling),
            2 => Ok(CounterKind::Gauge),
            _ => Err(self.bad("counter kind")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ReserveRequest {
        ReserveRequest {
            now: 1_700_000_000_000,
            candidates: vec![
                Candidate {
                    model: Some("gpt-4o".into()),
                    ops: vec![CounterOp {
                        key: "r|spend|ab12|d20250101".into(),
                        unit: Unit::Spend,
                        amount: 1_500,
                        limit: 2_000_000,
                        enforced: true,
                        downgradable: true,
                        expiry: Expiry::At(1_700_086_400_000),
                        kind: CounterKind::Plain,
                        grant: Some(GrantRef {
                            key: "r|ab12".into(),
                            required: true,
                        }),
                        alert_at: Vec::new(),
                    }],
                },
                Candidate {
                    model: None,
                    ops: vec![CounterOp {
                        key: "c|concurrent|x".into(),
                        unit: Unit::Concurrent,
                        amount: 1,
                        limit: 4,
                        enforced: false,
                        downgradable: false,
                        expiry: Expiry::AfterFirstUse(60_000),
                        kind: CounterKind::Gauge,
                        grant: None,
                        alert_at: Vec::new(),
                    }],
                },
            ],
            reservation_id: "res-1".into(),
            reservation_ttl: 600_000,
            request_id: Some("req-é".into()),
            account: Some("20423\u{1e}\u{1f}growth".into()),
            final_estimate: false,
        }
    }

    fn grant() -> Grant {
        Grant {
            rule: "team-daily".into(),
            scope: "team=growth".into(),
            key: "team-daily|ab12".into(),
            unit: Unit::Spend,
            extra: 5_000_000,
            expires_at: 1_700_090_000_000,
            approver: "ana".into(),
            reason: "launch".into(),
            created_at: 1_700_000_000_000,
        }
    }

    /// A log of one of each call, sealed, after the magic.
    fn log() -> (Vec<u8>, Vec<Call>) {
        let calls = vec![
            Call::Reserve(request()),
            Call::Settle {
                id: "res-1".into(),
                actual: vec![1_200, 0],
                now: 1_700_000_001_000,
            },
            Call::PutGrant {
                grant: grant(),
                now: 5,
            },
            Call::RemoveGrant {
                key: "team-daily|ab12".into(),
                now: 6,
            },
            Call::Append {
                log: "approvals".into(),
                entry: "{\"a\":1}".into(),
            },
            Call::Withdraw {
                id: "res-2".into(),
                request_id: Some("req-2".into()),
                now: 7,
            },
            Call::MarkAlerts {
                markers: vec![
                    AlertMarker {
                        key: "k|80|-".into(),
                        expires_at: None,
                        token: "t1".into(),
                    },
                    AlertMarker {
                        key: "k|100|9".into(),
                        expires_at: Some(9),
                        token: "t2".into(),
                    },
                ],
                now: 8,
            },
            Call::RecordSpend {
                batch: "b-1".into(),
                deltas: vec![SpendDelta {
                    day: 20_423,
                    dims: SpendDims(std::array::from_fn(|i| format!("d{i}"))),
                    settled: true,
                    entry: SpendEntry::from_values(std::array::from_fn(|i| (i as i128 - 4) << 70)),
                }],
                // More than the record's bytes: a bound, not a count.
                bounds: SpendBounds {
                    max_rows_per_day: 100_000,
                    retention: 86_400_000,
                },
                now: 9,
            },
        ];
        let mut buf = LOG_MAGIC.to_vec();
        for (i, c) in calls.iter().enumerate() {
            frame(&mut buf, i as u64 + 1, |b| match c {
                Call::Reserve(r) => put_reserve(b, r),
                Call::Settle { id, actual, now } => put_settle(b, id, actual, *now),
                Call::PutGrant { grant, now } => put_grant(b, grant, *now),
                Call::RemoveGrant { key, now } => put_remove_grant(b, key, *now),
                Call::Append { log, entry } => put_append(b, log, entry),
                Call::Withdraw {
                    id,
                    request_id,
                    now,
                } => put_withdraw(b, id, request_id.as_deref(), *now),
                Call::MarkAlerts { markers, now } => put_mark_alerts(b, markers, *now),
                Call::RecordSpend {
                    batch,
                    deltas,
                    bounds,
                    now,
                } => put_record_spend(b, batch, deltas, *bounds, *now),
            });
        }
        seal(&mut buf[8..]);
        (buf, calls)
    }

    fn read_all(data: &[u8]) -> Result<Vec<(u64, Call)>, Damage> {
        let mut at = 8;
        let mut out = Vec::new();
        while let Some((seq, body, next)) = record(data, at)? {
            out.push((seq, call(body, at + HEADER + 8)?));
            at = next;
        }
        Ok(out)
    }

    #[test]
    fn every_call_round_trips() {
        let (buf, calls) = log();
        let read = read_all(&buf).unwrap();
        assert_eq!(read.len(), calls.len());
        for (i, ((seq, got), want)) in read.into_iter().zip(calls).enumerate() {
            assert_eq!(seq, i as u64 + 1);
            assert_eq!(got, want);
        }
    }

    #[test]
    fn the_crc_is_the_standard_one() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn a_torn_tail_is_damage_at_the_record_it_cuts() {
        let (buf, _) = log();
        // Where the last record starts.
        let mut at = 8;
        let mut last = at;
        while let Some((_, _, next)) = record(&buf, at).unwrap() {
            last = at;
            at = next;
        }
        for cut in [buf.len() - 1, last + 20, last + 3] {
            let err = read_all(&buf[..cut]).unwrap_err();
            assert_eq!(err.offset, last as u64, "cut at {cut}: {err:?}");
            assert!(err.what.contains("cut short"), "{err:?}");
        }
        // Cut exactly between records: the records before are whole.
        assert_eq!(read_all(&buf[..last]).unwrap().len(), 7);
    }

    #[test]
    fn a_flipped_bit_is_a_checksum_mismatch() {
        let (mut buf, _) = log();
        let (_, _, second) = record(&buf, 8).unwrap().unwrap();
        buf[second + 30] ^= 0x10;
        let err = read_all(&buf).unwrap_err();
        assert_eq!(err.offset, second as u64);
        assert!(err.what.contains("checksum mismatch"), "{err:?}");
    }

    #[test]
    fn a_bad_length_or_a_bad_field_is_named_not_guessed() {
        let (mut buf, _) = log();
        buf[8..12].copy_from_slice(&3u32.to_le_bytes());
        let err = read_all(&buf).unwrap_err();
        assert_eq!(
            (err.offset, err.what.as_str()),
            (8, "not a record: length 3")
        );

        // A well-checksummed record with a call type nobody wrote.
        let mut buf = LOG_MAGIC.to_vec();
        frame(&mut buf, 1, |b| b.push(99));
        seal(&mut buf[8..]);
        let err = read_all(&buf).unwrap_err();
        assert!(err.what.contains("unknown call type 99"), "{err:?}");

        // A count larger than the record cannot become an allocation.
        let mut buf = LOG_MAGIC.to_vec();
        frame(&mut buf, 1, |b| {
            b.push(SETTLE);
            put_str(b, "id");
            put_i64(b, 0);
            b.extend_from_slice(&u32::MAX.to_le_bytes());
        });
        seal(&mut buf[8..]);
        let err = read_all(&buf).unwrap_err();
        assert!(err.what.contains("bad count"), "{err:?}");
    }
}
