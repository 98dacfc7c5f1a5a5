//! The reservation record, op modes and kind flags read back for every
//! kind, unit and edge amount; anything malformed is an error rather than
//! a panic or a guess.

use super::*;
use crate::store::redis::keys::full_counter_key;

const AMOUNTS: [i64; 5] = [0, 1, -5, i64::MAX, i64::MIN];

fn op(key: &str, unit: Unit, kind: CounterKind, amount: i64) -> CounterOp {
    CounterOp {
        key: key.to_string(),
        unit,
        amount,
        limit: 10,
        enforced: true,
        downgradable: false,
        expiry: Expiry::Never,
        kind,
        grant: None,
        alert_at: Vec::new(),
    }
}

#[test]
fn every_kind_has_its_own_flag_and_reads_back() {
    let flags: Vec<char> = CounterKind::ALL.iter().map(|&k| flag(k)).collect();
    assert_eq!(flags, ['p', 'r', 'g']);
    for kind in CounterKind::ALL {
        assert_eq!(kind_of_flag(&flag(kind).to_string()), Some(kind));
    }
    for bad in ["", "x", "P", "pp", "gr", "é"] {
        assert_eq!(kind_of_flag(bad), None, "{bad:?}");
    }
}

/// The mode character, read back as `reserve.lua` reads it.
#[test]
fn an_ops_mode_carries_each_flag() {
    let grants = [
        None,
        Some(GrantRef {
            key: "r|s".into(),
            required: false,
        }),
        Some(GrantRef {
            key: "r|s".into(),
            required: true,
        }),
    ];
    for kind in CounterKind::ALL {
        for enforced in [false, true] {
            for downgradable in [false, true] {
                for grant in &grants {
                    let mut o = op("r|requests|s|w", Unit::Requests, kind, 1);
                    o.enforced = enforced;
                    o.downgradable = downgradable;
                    o.grant = grant.clone();
                    let [byte] = op_mode(&o);
                    let mode = i32::from(byte) - 48;
                    assert!((0..64).contains(&mode), "{mode}");
                    assert_eq!(mode % 2 == 1, enforced);
                    assert_eq!(mode % 4 >= 2, downgradable);
                    assert_eq!(mode % 8 >= 4, kind == CounterKind::Gauge);
                    assert_eq!(mode % 16 >= 8, kind == CounterKind::Rolling);
                    assert_eq!(mode % 32 >= 16, grant.is_some());
                    assert_eq!(mode >= 32, grant.as_ref().is_some_and(|g| g.required));
                }
            }
        }
    }
}

#[test]
fn a_reservation_reads_back_for_every_kind_unit_and_amount() {
    for prefix in ["tollgate:", "", "a:b:"] {
        for (model, account) in [
            (None, None),
            (Some("gpt-4o-mini".to_string()), None),
            (
                None,
                Some("gpt-4o\u{1f}\u{1f}growth\u{1e}1 2 3".to_string()),
            ),
        ] {
            let mut ops = Vec::new();
            for (i, unit) in Unit::ALL.into_iter().enumerate() {
                for kind in CounterKind::ALL {
                    let amount = AMOUNTS[i % AMOUNTS.len()];
                    ops.push(op(&format!("rule{i}|{unit}|h{i}|w"), unit, kind, amount));
                }
            }
            for amount in AMOUNTS {
                ops.push(op("big|spend|h|-", Unit::Spend, CounterKind::Plain, amount));
            }
            for expires_at in [0, 1_700_000_000_000, i64::MAX] {
                for n in [0, 1, ops.len()] {
                    let candidate = Candidate {
                        model: model.clone(),
                        ops: ops[..n].to_vec(),
                    };
                    let keys: Vec<String> = candidate
                        .ops
                        .iter()
                        .map(|o| full_counter_key(prefix, &o.key))
                        .collect();
                    let text =
                        encode_reservation(expires_at, &candidate, &keys, account.as_deref());
                    let want = Reservation {
                        model: model.clone(),
                        ops: candidate
                            .ops
                            .iter()
                            .map(|o| ReservedOp {
                                key: o.key.clone(),
                                unit: o.unit,
                                amount: o.amount,
                                kind: o.kind,
                            })
                            .collect(),
                        settled: false,
                        expires_at,
                        account: account.clone(),
                    };
                    assert_eq!(decode_reservation(&text, prefix), Ok(want.clone()));
                    // What settle.lua and claim.lua do to mark it settled.
                    let settled = format!("1{}", &text[1..]);
                    let want = Reservation {
                        settled: true,
                        ..want
                    };
                    assert_eq!(decode_reservation(&settled, prefix), Ok(want));
                }
            }
        }
    }
}

#[test]
fn a_malformed_reservation_is_an_error() {
    let line = "p\trequests\t1\ttollgate:c:{h}r|requests|h|w";
    for bad in [
        String::new(),
        "0".to_string(),
        "0 5".to_string(),
        "0 x\n".to_string(),
        "2 5\n".to_string(),
        " 5\n".to_string(),
        format!("0 5\n\n{}", line.replace("p\t", "q\t")),
        format!("0 5\n\n{}", line.replace("requests\t", "furlongs\t")),
        format!("0 5\n\n{}", line.replace("\t1\t", "\t1.5\t")),
        format!(
            "0 5\n\n{}",
            line.replace("\t1\t", "\t99999999999999999999\t")
        ),
        format!("0 5\n\n{}", line.replace("tollgate:", "other:")),
        format!("0 5\n\n{line}\np\trequests"),
        format!("0 5\n\n{line}\n"),
        "0 5\n\n\u{0}\u{ffff}".to_string(),
    ] {
        let got = decode_reservation(&bad, "tollgate:");
        assert!(got.is_err(), "{bad:?} read as {got:?}");
    }
}
