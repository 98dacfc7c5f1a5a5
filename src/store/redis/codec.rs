//! The text forms Redis holds and the scripts return: the reservation
//! record, the reserve reply, the replay record, and each counter kind's
//! one-character flag. Pure functions; no I/O.

use ::redis::Value;

use crate::policy::Unit;
use crate::store::*;

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

/// What a candidate's reservation will hold if it is applied: unsettled
/// and when it lapses, the model, then one line per counter with its kind
/// (plain, rolling or gauge), unit, reserved amount and key. Built here so
/// that the script only stores it.
pub(super) fn reservation_text(
    expires_at: Millis,
    candidate: &Candidate,
    keys: &[String],
) -> String {
    use std::fmt::Write;
    let model = candidate.model.as_deref().unwrap_or_default();
    let mut record =
        String::with_capacity(24 + model.len() + keys.iter().map(|k| k.len() + 32).sum::<usize>());
    let _ = write!(record, "0 {expires_at}\n{model}");
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

pub(super) fn parse_reservation(text: &str, prefix: &str) -> Option<Reservation> {
    let counter_prefix = format!("{prefix}c:");
    let mut lines = text.split('\n');
    let (settled, expires) = lines.next()?.split_once(' ')?;
    let model = lines.next()?;
    let ops = lines
        .map(|line| {
            let mut parts = line.splitn(4, '\t');
            let kind = kind_of_flag(parts.next()?)?;
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
                kind,
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

pub(super) fn parse_outcome(reply: &[Value]) -> Option<ReserveOutcome> {
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

pub(super) fn replay_text(o: &ReserveOutcome) -> String {
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

pub(super) fn parse_replay(text: &str, now: Millis) -> Option<ReserveOutcome> {
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
