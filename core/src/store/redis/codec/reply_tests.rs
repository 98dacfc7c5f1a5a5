//! The reserve reply, its replay record and counter values read back,
//! edge values included; anything malformed is an error rather than a
//! panic or a guess.

use super::*;

fn outcomes() -> Vec<ReserveOutcome> {
    let state = |used_before, resets_at, grant| CounterState {
        used_before,
        resets_at,
        grant,
        leased: 0,
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
    let values = [0, -1, 0, i64::MAX, 5, 0, 3, 0, 7];
    let want = vec![
        CounterState::default(),
        CounterState {
            used_before: i64::MAX,
            resets_at: Some(5),
            grant: None,
            leased: 0,
        },
        CounterState {
            used_before: 3,
            resets_at: Some(0),
            grant: None,
            leased: 7,
        },
    ];
    assert_eq!(decode_counters(&values, 3), Ok(want));
    assert_eq!(decode_counters(&[], 0), Ok(vec![]));
    for (values, n) in [
        (&values[..], 2),
        (&values[..8], 3),
        (&values[..6], 3),
        (&values[..], 4),
        (&[][..], 1),
    ] {
        assert!(decode_counters(values, n).is_err(), "{values:?} for {n}");
    }
}
