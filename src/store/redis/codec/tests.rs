//! Every record encodes and decodes back to itself, edge values included,
//! and anything malformed is an error rather than a panic or a guess.

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
        for model in [None, Some("gpt-4o-mini".to_string())] {
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
                    let text = encode_reservation(expires_at, &candidate, &keys);
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

fn outcomes() -> Vec<ReserveOutcome> {
    let state = |used_before, resets_at, grant| CounterState {
        used_before,
        resets_at,
        grant,
    };
    vec![
        ReserveOutcome {
            applied: None,
            tried: vec![],
            reservation_id: None,
            replayed: false,
        },
        ReserveOutcome {
            applied: Some(0),
            tried: vec![vec![]],
            reservation_id: Some("abc.h1".into()),
            replayed: false,
        },
        ReserveOutcome {
            applied: Some(2),
            tried: vec![
                vec![state(0, None, None), state(i64::MAX, Some(0), Some(0))],
                vec![state(7, Some(i64::MAX), Some(i64::MAX))],
                vec![state(1, Some(1_700_000_000_000), None); 3],
            ],
            // Looks like a number, stays text.
            reservation_id: Some("12345".into()),
            replayed: false,
        },
        ReserveOutcome {
            applied: None,
            tried: vec![vec![state(10, None, Some(5))]],
            reservation_id: None,
            replayed: false,
        },
    ]
}

/// The reserve reply as `reserve.lua` returns it: the replay record's
/// tokens after its deadline, the id as text and the rest as integers.
fn reply_of(o: &ReserveOutcome, replayed: bool) -> Vec<Value> {
    let text = encode_replay(0, o);
    let mut tokens = text.split(' ').skip(1);
    let rid = tokens.next().unwrap();
    let mut reply = vec![
        Value::Int(replayed.into()),
        Value::BulkString(rid.as_bytes().to_vec()),
    ];
    reply.extend(tokens.map(|t| Value::Int(t.parse().unwrap())));
    reply
}

#[test]
fn a_reserve_reply_and_a_replay_record_read_back() {
    for o in outcomes() {
        for replayed in [false, true] {
            let want = ReserveOutcome {
                replayed,
                ..o.clone()
            };
            assert_eq!(decode_outcome(&reply_of(&o, replayed)), Ok(want));
        }
        for until in [1, 1_700_000_000_000, i64::MAX] {
            let text = encode_replay(until, &o);
            let want = ReserveOutcome {
                replayed: true,
                ..o.clone()
            };
            assert_eq!(decode_replay(&text, until - 1), Ok(Some(want)));
            assert_eq!(decode_replay(&text, until), Ok(None), "lapsed");
        }
    }
    let simple = vec![
        Value::Int(0),
        Value::SimpleString("-".into()),
        Value::Int(-1),
    ];
    let simple = [simple, vec![Value::Int(0)]].concat();
    assert_eq!(decode_outcome(&simple), Ok(outcomes()[0].clone()));
}

#[test]
fn a_malformed_reserve_reply_or_replay_record_is_an_error() {
    let int = Value::Int;
    let rid = || Value::BulkString(b"r".to_vec());
    for bad in [
        vec![],
        vec![int(0)],
        vec![int(0), rid()],
        vec![int(0), rid(), int(-1)],
        vec![rid(), rid(), int(-1), int(0)],
        vec![int(0), int(5), int(-1), int(0)],
        vec![int(0), Value::BulkString(vec![0xff]), int(-1), int(0)],
        vec![int(0), rid(), int(-1), int(0), int(9)],
        vec![
            int(0),
            rid(),
            int(-1),
            int(1),
            int(2),
            int(0),
            int(0),
            int(0),
        ],
        vec![int(0), rid(), int(-1), int(-1)],
        vec![int(0), rid(), int(-1), int(i64::MAX)],
        vec![int(0), rid(), int(-1), int(1), int(i64::MAX)],
        vec![int(0), rid(), int(-1), int(1), rid()],
        vec![
            int(0),
            rid(),
            int(0),
            int(1),
            int(1),
            int(0),
            int(0),
            Value::Nil,
        ],
    ] {
        let got = decode_outcome(&bad);
        assert!(got.is_err(), "{bad:?} read as {got:?}");
    }
    for bad in [
        "",
        "100",
        "100 r",
        "x r -1 0",
        "100 r -1 x",
        "100 r -1 1",
        "100 r -1 1 1 0 0",
        "100 r -1 0 7",
        "100 r -1  0",
        "100 r -1 9223372036854775807",
    ] {
        let got = decode_replay(bad, 0);
        assert!(got.is_err(), "{bad:?} read as {got:?}");
    }
}

#[test]
fn counter_values_read_back() {
    let values = [0, -1, i64::MAX, 5, 3, 0];
    let want = vec![
        CounterState::default(),
        CounterState {
            used_before: i64::MAX,
            resets_at: Some(5),
            grant: None,
        },
        CounterState {
            used_before: 3,
            resets_at: Some(0),
            grant: None,
        },
    ];
    assert_eq!(decode_counters(&values, 3), Ok(want));
    assert_eq!(decode_counters(&[], 0), Ok(vec![]));
    for (values, n) in [
        (&values[..], 2),
        (&values[..5], 3),
        (&values[..], 4),
        (&[][..], 1),
    ] {
        assert!(decode_counters(values, n).is_err(), "{values:?} for {n}");
    }
}

fn grant(unit: Unit, extra: i64) -> Grant {
    Grant {
        rule: "launch-budget".into(),
        scope: "team=growth,key=checkout-prod".into(),
        key: "launch-budget|9f86d081884c7d65".into(),
        unit,
        extra,
        expires_at: 1_700_000_060_000,
        approver: "ana".into(),
        reason: "launch \"day\"\n\u{e9}t\u{e9} \\ \t".into(),
        created_at: 1_700_000_000_000,
    }
}

/// What `reserve.lua`'s `granted` reads: extra, then expiry, at the space.
fn read_in_force(text: &str) -> Option<(i64, Millis)> {
    let (extra, expires) = text.split_once(' ')?;
    Some((extra.parse().ok()?, expires.parse().ok()?))
}

#[test]
fn a_grant_reads_back_for_every_unit_and_extra() {
    for unit in Unit::ALL {
        for extra in AMOUNTS {
            let g = grant(unit, extra);
            assert_eq!(decode_grant(&encode_grant(&g).unwrap()), Ok(g.clone()));
            let in_force = encode_grant_in_force(&g);
            assert_eq!(read_in_force(&in_force), Some((extra, g.expires_at)));
        }
    }
    let empty = Grant {
        rule: String::new(),
        scope: String::new(),
        key: String::new(),
        unit: Unit::Requests,
        extra: 0,
        expires_at: 0,
        approver: String::new(),
        reason: String::new(),
        created_at: 0,
    };
    assert_eq!(decode_grant(&encode_grant(&empty).unwrap()), Ok(empty));
}

/// Records stored before the unit became a `Unit` read the same, and new
/// ones are written the same.
#[test]
fn the_grant_record_format_is_unchanged() {
    let stored = r#"{"rule":"r","scope":"team=a","key":"r|h","unit":"spend","extra":5000000,"expires_at":10,"approver":"ana","reason":"x","created_at":1}"#;
    let g = decode_grant(stored).unwrap();
    assert_eq!(g.unit, Unit::Spend);
    assert_eq!(g.extra, 5_000_000);
    assert_eq!(encode_grant(&g).unwrap(), stored);
}

#[test]
fn a_malformed_grant_is_an_error() {
    let good = encode_grant(&grant(Unit::Spend, 1)).unwrap();
    for bad in [
        String::new(),
        "null".to_string(),
        "{}".to_string(),
        "[1,2]".to_string(),
        good.replace("\"spend\"", "\"furlongs\""),
        good.replace("\"spend\"", "\"Spend\""),
        good.replace("\"spend\"", "\"\""),
        good.replace("\"spend\"", "null"),
        good.replace("\"extra\":1", "\"extra\":1.5"),
        good.replace("\"extra\":1", "\"extra\":\"1\""),
        good.replace("\"extra\":1", "\"extra\":99999999999999999999"),
        good.replace(",\"approver\":\"ana\"", ""),
        good[..good.len() - 1].to_string(),
    ] {
        let got = decode_grant(&bad);
        assert!(got.is_err(), "{bad:?} read as {got:?}");
    }
    let err = decode_grant(&good.replace("\"spend\"", "\"furlongs\"")).unwrap_err();
    assert!(err.to_string().contains("furlongs"), "{err}");
}
