//! Grants, in force and listed, read back for every unit and extra; an
//! unknown unit or a malformed record is an error.

use super::*;

const EXTRAS: [i64; 5] = [0, 1, -5, i64::MAX, i64::MIN];

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
        for extra in EXTRAS {
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
