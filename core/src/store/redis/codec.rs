//! The text forms Redis holds and the scripts exchange: the reservation
//! record, each op's mode and kind flag, the reserve reply and its replay
//! record, counter values read back, and grants (in force and listed).
//! Pure functions, no I/O; anything that does not decode is a
//! [`Malformed`] error, never a guess.

use std::fmt::Write;

use ::redis::Value;

use super::keys::counter_name;
use crate::policy::Unit;
use crate::store::*;

/// A record or reply that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {why}")]
pub(super) struct Malformed {
    what: &'static str,
    why: String,
}

fn malformed(what: &'static str, why: impl Into<String>) -> Malformed {
    Malformed {
        what,
        why: why.into(),
    }
}

impl From<Malformed> for StoreError {
    fn from(e: Malformed) -> StoreError {
        StoreError::Unavailable(e.to_string())
    }
}

/// A counter kind as scripts and reservation records know it: `p` plain,
/// `r` rolling, `g` gauge. Kinds become characters here and nowhere else.
pub(super) fn flag(kind: CounterKind) -> char {
    match kind {
        CounterKind::Plain => 'p',
        CounterKind::Rolling => 'r',
        CounterKind::Gauge => 'g',
    }
}

fn kind_of_flag(text: &str) -> Option<CounterKind> {
    CounterKind::ALL
        .into_iter()
        .find(|&k| text.len() == 1 && text.starts_with(flag(k)))
}

/// An op's `mode` for `reserve.lua`: its flags as one character, `'0'`
/// plus the sum of 1 enforced, 2 downgradable, 4 gauge, 8 rolling, 16 an
/// active grant adds its extra, 32 the op blocks without one.
pub(super) fn op_mode(op: &CounterOp) -> [u8; 1] {
    let grant = match &op.grant {
        None => 0,
        Some(g) if g.required => 16 | 32,
        Some(_) => 16,
    };
    let kind = match op.kind {
        CounterKind::Plain => 0,
        CounterKind::Gauge => 4,
        CounterKind::Rolling => 8,
    };
    [b'0' + (u8::from(op.enforced) | u8::from(op.downgradable) << 1 | kind | grant)]
}

/// What a candidate's reservation will hold if it is applied: unsettled
/// and when it lapses, the model, then one line per counter with its kind
/// (plain, rolling or gauge), unit, reserved amount and full Redis key.
/// Built here so that the script only stores it; `settle.lua` and
/// `claim.lua` read it too.
pub(super) fn encode_reservation(
    expires_at: Millis,
    candidate: &Candidate,
    keys: &[String],
    account: Option<&str>,
) -> String {
    let model = candidate.model.as_deref().unwrap_or_default();
    let account_len = account.map_or(0, |a| a.len() + 3);
    let mut record = String::with_capacity(
        24 + model.len() + account_len + keys.iter().map(|k| k.len() + 32).sum::<usize>(),
    );
    let _ = write!(record, "0 {expires_at}\n{model}");
    // The scripts read only the header and the counter lines (`p`, `r`,
    // `g`); an account line is for the settling replica.
    if let Some(account) = account {
        let _ = write!(record, "\na\t{account}");
    }
    for (op, key) in candidate.ops.iter().zip(keys) {
        let _ = write!(
            record,
            "\n{}\t{}\t{}\t{key}",
            flag(op.kind),
            op.unit.name(),
            op.amount
        );
    }
    record
}

/// A reservation record as stored (`settled` is `1` once settled).
pub(super) fn decode_reservation(text: &str, prefix: &str) -> Result<Reservation, Malformed> {
    let bad = |why: &str| malformed("reservation", why);
    let mut lines = text.split('\n');
    let (settled, expires) = lines
        .next()
        .and_then(|l| l.split_once(' '))
        .ok_or_else(|| bad("no header"))?;
    let settled = match settled {
        "0" => false,
        "1" => true,
        _ => return Err(bad("settled is neither 0 nor 1")),
    };
    let expires_at = expires.parse().map_err(|_| bad("bad expiry"))?;
    let model = lines.next().ok_or_else(|| bad("no model line"))?;
    let mut account = None;
    let ops = lines
        .filter(|line| match line.strip_prefix("a\t") {
            Some(a) => {
                account = Some(a.to_string());
                false
            }
            None => true,
        })
        .map(|line| {
            let mut parts = line.splitn(4, '\t');
            let mut part = || parts.next().ok_or_else(|| bad("short counter line"));
            let kind = kind_of_flag(part()?).ok_or_else(|| bad("unknown counter kind"))?;
            let unit = Unit::parse(part()?).ok_or_else(|| bad("unknown unit"))?;
            let amount = part()?.parse().map_err(|_| bad("bad amount"))?;
            let key = counter_name(prefix, part()?).ok_or_else(|| bad("foreign key"))?;
            Ok(ReservedOp {
                key: key.to_string(),
                unit,
                amount,
                kind,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Reservation {
        model: (!model.is_empty()).then(|| model.to_string()),
        ops,
        settled,
        expires_at,
        account,
    })
}

/// `reserve.lua`'s reply: replayed, reservation id, then the numbers of
/// [`decode_numbers`].
pub(super) fn decode_outcome(reply: &[Value]) -> Result<ReserveOutcome, Malformed> {
    let bad = || malformed("reserve reply", format!("{reply:?}"));
    let int = |v: &Value| match v {
        Value::Int(n) => Some(*n),
        _ => None,
    };
    let mut it = reply.iter();
    let replayed = int(it.next().ok_or_else(bad)?).ok_or_else(bad)? == 1;
    let rid = match it.next().ok_or_else(bad)? {
        Value::BulkString(b) => String::from_utf8(b.clone()).map_err(|_| bad())?,
        Value::SimpleString(s) => s.clone(),
        _ => return Err(bad()),
    };
    let numbers = it.map(int).collect::<Option<Vec<_>>>().ok_or_else(bad)?;
    decode_numbers(&rid, &numbers, replayed).ok_or_else(bad)
}

/// What a reserve that refills leases answers beyond the outcome.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct LeaseAnswer {
    /// The lease granted on each op of the last candidate tried.
    pub granted: Vec<i64>,
    /// Enforced ops that blocked only because other replicas hold unused
    /// leases on them.
    pub early_denials: i64,
    /// Enforced ops that blocked only because of this replica's own lease,
    /// from a refill whose answer is still on its way.
    pub own_blocked: i64,
}

/// `reserve.lua`'s reply when it refilled the leases of `ops` ops: the
/// outcome, then a lease per op and the early denials.
pub(super) fn decode_leasing_outcome(
    reply: &[Value],
    ops: usize,
) -> Result<(ReserveOutcome, LeaseAnswer), Malformed> {
    let bad = || malformed("leasing reserve reply", format!("{reply:?}"));
    // A replay answers as it answered first, with no lease part.
    if reply.first() == Some(&Value::Int(1)) {
        return Ok((
            decode_outcome(reply)?,
            LeaseAnswer {
                granted: vec![0; ops],
                ..LeaseAnswer::default()
            },
        ));
    }
    let split = reply.len().checked_sub(ops + 2).ok_or_else(bad)?;
    let tail = reply[split..]
        .iter()
        .map(|v| match v {
            Value::Int(n) => Some(*n),
            _ => None,
        })
        .collect::<Option<Vec<i64>>>()
        .ok_or_else(bad)?;
    let outcome = decode_outcome(&reply[..split])?;
    Ok((
        outcome,
        LeaseAnswer {
            granted: tail[..ops].to_vec(),
            early_denials: tail[ops],
            own_blocked: tail[ops + 1],
        },
    ))
}

/// `<applied or -1> <tried> (<n> (<used> <reset or -1> <grant or -1>)*)*`;
/// a negative reset or grant reads as none.
fn decode_numbers(rid: &str, numbers: &[i64], replayed: bool) -> Option<ReserveOutcome> {
    let mut it = numbers.iter().copied();
    let applied = it.next()?;
    let tried_count = usize::try_from(it.next()?).ok()?;
    let mut tried = Vec::with_capacity(tried_count.min(numbers.len()));
    for _ in 0..tried_count {
        let n = usize::try_from(it.next()?).ok()?;
        let mut states = Vec::with_capacity(n.min(numbers.len()));
        for _ in 0..n {
            let used = it.next()?;
            let reset = it.next()?;
            let grant = it.next()?;
            states.push(CounterState {
                used_before: used,
                resets_at: (reset >= 0).then_some(reset),
                grant: (grant >= 0).then_some(grant),
                leased: 0,
            });
        }
        tried.push(states);
    }
    if it.next().is_some() {
        return None;
    }
    Some(ReserveOutcome {
        applied: usize::try_from(applied).ok(),
        tried,
        reservation_id: (rid != "-").then(|| rid.to_string()),
        replayed,
    })
}

/// A request id's outcome, remembered until `until`: the form
/// `reserve.lua` writes, so that both read each other's.
pub(super) fn encode_replay(until: Millis, o: &ReserveOutcome) -> String {
    let ops: usize = o.tried.iter().map(Vec::len).sum();
    let mut text = String::with_capacity(48 + 8 * o.tried.len() + 40 * ops);
    let mut numbers = itoa::Buffer::new();
    let mut number = |text: &mut String, n: i64| {
        text.push(' ');
        text.push_str(numbers.format(n));
    };
    text.push_str(itoa::Buffer::new().format(until));
    text.push(' ');
    text.push_str(o.reservation_id.as_deref().unwrap_or("-"));
    number(&mut text, o.applied.map_or(-1, |a| a as i64));
    number(&mut text, o.tried.len() as i64);
    for states in &o.tried {
        number(&mut text, states.len() as i64);
        for s in states {
            number(&mut text, s.used_before);
            number(&mut text, s.resets_at.unwrap_or(-1));
            number(&mut text, s.grant.unwrap_or(-1));
        }
    }
    text
}

/// The outcome of a replay record, or none once it has lapsed at `now`.
pub(super) fn decode_replay(text: &str, now: Millis) -> Result<Option<ReserveOutcome>, Malformed> {
    let bad = || malformed("replay record", text.to_string());
    let (until, rest) = text.split_once(' ').ok_or_else(bad)?;
    if until.parse::<Millis>().map_err(|_| bad())? <= now {
        return Ok(None);
    }
    let (rid, numbers) = rest.split_once(' ').ok_or_else(bad)?;
    let numbers: Vec<i64> = numbers
        .split(' ')
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    decode_numbers(rid, &numbers, true)
        .map(Some)
        .ok_or_else(bad)
}

/// `read.lua`'s reply for `n` counters: usage, then resets_at or -1, then
/// what leases hold, each.
pub(super) fn decode_counters(values: &[i64], n: usize) -> Result<Vec<CounterState>, Malformed> {
    if values.len() != 3 * n {
        return Err(malformed(
            "read reply",
            format!("{} numbers for {n} counters", values.len()),
        ));
    }
    Ok(values
        .chunks(3)
        .map(|v| CounterState {
            used_before: v[0],
            resets_at: (v[1] >= 0).then_some(v[1]),
            grant: None,
            leased: v[2],
        })
        .collect())
}

/// A grant in force, as `reserve.lua` reads it: `<extra> <expires at>`.
pub(super) fn encode_grant_in_force(grant: &Grant) -> String {
    format!("{} {}", grant.extra, grant.expires_at)
}

/// The extra of a grant in force read back as `reserve.lua` reads it: none
/// once expired at `now`, or when the record does not read; a negative
/// extra reads as none, as it does coming out of the script.
pub(super) fn decode_grant_in_force(text: &str, now: Millis) -> Option<i64> {
    let (extra, expires_at) = text.split_once(' ')?;
    let expires_at: Millis = expires_at.trim().parse().ok()?;
    let extra: i64 = extra.parse().ok()?;
    (expires_at > now && extra >= 0).then_some(extra)
}

/// A grant's full record in the listing: JSON, with the unit by name.
#[derive(serde::Serialize, serde::Deserialize)]
struct GrantRecord {
    rule: String,
    scope: String,
    key: String,
    unit: String,
    extra: i64,
    expires_at: Millis,
    approver: String,
    reason: String,
    created_at: Millis,
}

pub(super) fn encode_grant(g: &Grant) -> Result<String, serde_json::Error> {
    serde_json::to_string(&GrantRecord {
        rule: g.rule.clone(),
        scope: g.scope.clone(),
        key: g.key.clone(),
        unit: g.unit.name().to_string(),
        extra: g.extra,
        expires_at: g.expires_at,
        approver: g.approver.clone(),
        reason: g.reason.clone(),
        created_at: g.created_at,
    })
}

/// A listed grant; an unknown unit is an error, not a guess, so that an
/// extra is never read in the wrong unit.
pub(super) fn decode_grant(text: &str) -> Result<Grant, Malformed> {
    let r: GrantRecord =
        serde_json::from_str(text).map_err(|e| malformed("grant", e.to_string()))?;
    let unit = Unit::parse(&r.unit)
        .ok_or_else(|| malformed("grant", format!("unknown unit {:?}", r.unit)))?;
    Ok(Grant {
        rule: r.rule,
        scope: r.scope,
        key: r.key,
        unit,
        extra: r.extra,
        expires_at: r.expires_at,
        approver: r.approver,
        reason: r.reason,
        created_at: r.created_at,
    })
}

#[cfg(test)]
mod grant_tests;
#[cfg(test)]
mod reply_tests;
#[cfg(test)]
mod reservation_tests;
