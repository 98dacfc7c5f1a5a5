use super::*;
use crate::policy::Unit;
use crate::store::GrantRef;

fn op(key: &str, amount: i64, limit: i64) -> CounterOp {
    CounterOp {
        key: key.to_string(),
        unit: Unit::Tokens,
        amount,
        limit,
        enforced: true,
        downgradable: false,
        expiry: Expiry::Never,
        kind: CounterKind::Plain,
        grant: None,
        alert_at: Vec::new(),
    }
}

fn state(used: i64) -> CounterState {
    CounterState {
        used_before: used,
        ..CounterState::default()
    }
}

fn book() -> LeaseBook {
    LeaseBook::new(LeaseConfig::default())
}

/// Grants `lease` on each op as a store would after adding the op's amount
/// to a counter at `used`.
fn refill(book: &mut LeaseBook, ops: &[CounterOp], used: i64, lease: i64, now: Millis) {
    let asks = book.ask(ops, now);
    let states: Vec<_> = ops.iter().map(|_| state(used)).collect();
    let granted: Vec<_> = ops.iter().map(|_| lease).collect();
    book.refilled(ops, &asks, &states, &granted, true, now);
}

#[test]
fn a_decision_spends_from_its_leases_all_or_nothing() {
    let mut book = book();
    let a = op("a", 10, 1000);
    let b = op("b", 10, 1000);
    assert_eq!(
        book.spend(std::slice::from_ref(&a), 0),
        None,
        "no lease yet"
    );
    refill(&mut book, std::slice::from_ref(&a), 100, 25, 0);
    let got = book.spend(std::slice::from_ref(&a), 1).expect("leased");
    // The counter stood at 100, then this replica added 10 and a lease of
    // 25: used as this replica knows it is 110, then 120 after.
    assert_eq!(got[0].used_before, 110);
    assert_eq!(book.unused("a"), 15);
    // b has no lease: a decision on a and b spends nothing at all.
    assert_eq!(book.spend(&[a.clone(), b], 1), None);
    assert_eq!(book.unused("a"), 15);
    assert!(book.spend(std::slice::from_ref(&a), 2).is_some());
    assert_eq!(book.unused("a"), 5, "5 left, less than a request");
    assert_eq!(book.spend(&[a], 3), None);
}

#[test]
fn a_lease_is_not_used_past_its_life_nor_under_another_limit() {
    let mut book = book();
    let config = LeaseConfig::default();
    let a = op("a", 1, 1000);
    refill(&mut book, std::slice::from_ref(&a), 0, 100, 0);
    let last = config.lifetime - config.margin;
    assert!(book.spend(std::slice::from_ref(&a), last - 1).is_some());
    assert_eq!(
        book.spend(std::slice::from_ref(&a), last),
        None,
        "a margin before the record lapses"
    );
    refill(&mut book, std::slice::from_ref(&a), 0, 100, last);
    let lowered = op("a", 1, 500);
    assert_eq!(
        book.spend(&[lowered], last + 1),
        None,
        "a reloaded limit asks the store"
    );
}

#[test]
fn asking_hands_back_everything_once_and_one_refill_at_a_time() {
    let mut book = book();
    let a = op("a", 10, 1000);
    let big = op("a", 50, 1000);
    refill(&mut book, std::slice::from_ref(&a), 0, 40, 0);
    assert_eq!(
        book.ask(std::slice::from_ref(&a), 5),
        vec![Ask::default()],
        "a lease that can serve the op is left alone"
    );
    let first = book.ask(std::slice::from_ref(&big), 5);
    assert_eq!(first[0].unused, 40, "the whole unused lease goes back");
    assert!(first[0].want >= 50 * LeaseConfig::default().min_requests);
    let second = book.ask(std::slice::from_ref(&big), 6);
    assert_eq!(second[0], Ask::default(), "nothing twice; no second refill");
    assert_eq!(
        book.spend(std::slice::from_ref(&a), 6),
        None,
        "nothing spendable while refilling"
    );
    book.refilled(
        std::slice::from_ref(&big),
        &first,
        &[state(0)],
        &[30],
        true,
        5,
    );
    assert_eq!(book.unused("a"), 30);
}

#[test]
fn a_refill_for_one_counter_leaves_the_others_leases_alone() {
    let mut book = book();
    let shared = op("shared", 1, 1_000_000);
    let key = op("key", 1, 1_000_000);
    refill(&mut book, std::slice::from_ref(&shared), 0, 500, 0);
    let asks = book.ask(&[shared.clone(), key.clone()], 1);
    assert_eq!(asks[0], Ask::default(), "the shared lease serves");
    assert!(asks[1].want > 0);
    assert_eq!(book.unused("shared"), 500);
    assert!(
        book.spend(std::slice::from_ref(&shared), 2).is_some(),
        "still spendable while the other counter refills"
    );
}

#[test]
fn a_failed_refill_keeps_what_was_sent_counted_and_frees_the_lease() {
    let mut book = book();
    let a = op("a", 50, 1000);
    refill(&mut book, std::slice::from_ref(&a), 0, 40, 0);
    let asks = book.ask(std::slice::from_ref(&a), 5);
    assert_eq!(asks[0].unused, 40);
    book.refill_failed(std::slice::from_ref(&a), &asks);
    assert_eq!(book.unused("a"), 0, "never spent here again");
    assert!(
        book.ask(std::slice::from_ref(&a), 6)[0].want > 0,
        "refillable again"
    );
}

#[test]
fn the_lease_asked_for_follows_demand() {
    let mut book = book();
    let a = op("a", 1, 1_000_000);
    refill(&mut book, std::slice::from_ref(&a), 0, 1000, 0);
    // 1,000 units a second until the lease runs out.
    for t in 0..1000 {
        assert!(book.spend(std::slice::from_ref(&a), t).is_some());
    }
    let want = book.ask(std::slice::from_ref(&a), 1000)[0].want;
    // Smoothed from nothing towards 1,000/s, over 90% of the 1.75 s a
    // lease is used.
    assert!((700..=1600).contains(&want), "want {want}");
    book.refilled(
        std::slice::from_ref(&a),
        &[Ask {
            unused: 0,
            want,
            life: 2_000,
        }],
        &[state(1000)],
        &[want],
        true,
        1000,
    );
    // Ten times less demand: the next lease asked for shrinks.
    for t in 0..want / 10 {
        assert!(book
            .spend(std::slice::from_ref(&a), 1000 + t * 10)
            .is_some());
    }
    let later = 1000 + (want / 10) * 10;
    let expired = book.expired(later + 1750);
    assert_eq!(expired.len(), 1);
    let smaller = book.ask(std::slice::from_ref(&a), later + 1751)[0].want;
    assert!(smaller < want, "want {smaller} after {want}");
}

#[test]
fn credits_go_to_a_live_lease_and_are_refused_otherwise() {
    let mut book = book();
    let a = op("a", 10, 1000);
    refill(&mut book, std::slice::from_ref(&a), 0, 40, 0);
    assert!(book.credit("a", 7, 1));
    assert_eq!(book.unused("a"), 47);
    assert!(book.credit("a", -47, 1), "a top-up the lease can pay");
    assert!(!book.credit("a", -1, 1), "a top-up it cannot");
    assert!(!book.credit("b", 5, 1), "no lease");
    assert!(
        !book.credit("a", 5, LeaseConfig::default().lifetime),
        "lapsed"
    );
}

#[test]
fn expired_and_drained_leases_are_handed_back_once() {
    let mut book = book();
    let a = op("a", 10, 1000);
    let b = op("b", 10, 1000);
    refill(&mut book, std::slice::from_ref(&a), 0, 40, 0);
    refill(&mut book, std::slice::from_ref(&b), 0, 30, 1000);
    let life = LeaseConfig::default().lifetime - LeaseConfig::default().margin;
    // b is in use, so not idle.
    assert!(book.spend(std::slice::from_ref(&b), life - 50).is_some());
    assert_eq!(
        book.expired(life),
        vec![Return {
            key: "a".into(),
            unused: 40,
            until: LeaseConfig::default().lifetime,
        }]
    );
    assert_eq!(book.expired(life + 1), vec![], "once");
    let mut drained = book.drain();
    drained.sort_by(|x, y| x.key.cmp(&y.key));
    assert_eq!(
        drained,
        vec![Return {
            key: "b".into(),
            unused: 20,
            until: 1000 + LeaseConfig::default().lifetime,
        }]
    );
    assert_eq!(book.spend(&[b], 1001), None, "nothing after a drain");
    assert!(book.drain().is_empty());
}

#[test]
fn gauges_rolling_windows_and_shut_gates_are_never_spent_here() {
    let mut book = book();
    let mut gauge = op("g", 1, 10);
    gauge.kind = CounterKind::Gauge;
    let mut rolling = op("r", 1, 10);
    rolling.kind = CounterKind::Rolling;
    rolling.expiry = Expiry::AfterFirstUse(60_000);
    assert_eq!(
        book.ask(&[gauge.clone(), rolling.clone()], 0),
        vec![Ask::default(); 2]
    );
    assert!(book.is_empty());
    let mut gate = op("gate", 0, 10);
    gate.grant = Some(GrantRef {
        key: "gate|x".into(),
        required: true,
    });
    // Leased while the gate was shut: no grant was seen.
    refill(&mut book, std::slice::from_ref(&gate), 0, 5, 0);
    assert_eq!(book.spend(&[gate], 1), None);
}

#[test]
fn a_lease_nothing_spends_from_goes_back_idle_before_its_life_ends() {
    let mut book = book();
    let idle = LeaseConfig::default().idle;
    let a = op("a", 10, 1000);
    refill(&mut book, std::slice::from_ref(&a), 0, 40, 0);
    assert!(book.spend(std::slice::from_ref(&a), 10).is_some());
    assert_eq!(book.expired(10 + idle - 1), vec![], "still in use");
    assert_eq!(
        book.expired(10 + idle),
        vec![Return {
            key: "a".into(),
            unused: 30,
            until: LeaseConfig::default().lifetime,
        }]
    );
    assert_eq!(book.spend(&[a], 10 + idle), None, "no longer spendable");
}

/// A lease spent from every 50 ms is not idle after a pause of four such
/// gaps, which steady random demand often has, only after six.
#[test]
fn a_lease_goes_back_idle_only_after_several_of_its_usual_gaps() {
    // On the real clock: a new lease's first gap is not timed from 0.
    let t0: Millis = 1_764_547_200_000;
    let mut book = book();
    let a = op("a", 1, 1_000_000);
    refill(&mut book, std::slice::from_ref(&a), 0, 1000, t0);
    for i in 1..=12 {
        assert!(book.spend(std::slice::from_ref(&a), t0 + i * 50).is_some());
    }
    let last = t0 + 600;
    assert_eq!(
        book.expired(last + 4 * 50),
        vec![],
        "four gaps: still in use"
    );
    let gaps = IDLE_GAPS as Millis;
    assert_eq!(book.expired(last + (gaps - 1) * 50), vec![]);
    assert_eq!(
        book.expired(last + gaps * 50),
        vec![Return {
            key: "a".into(),
            unused: 988,
            until: t0 + LeaseConfig::default().lifetime,
        }]
    );
}

/// A counter spent from twice a second is far too slow for a lease of the
/// smallest size (eight requests) to be spent within one lifetime: far
/// from its cap it is asked to live longer, at most `LONGEST_LIFE`
/// lifetimes, and is usable that long. Near the cap, or on an approval
/// gate, it keeps the one lifetime.
#[test]
fn a_slow_counter_far_from_its_cap_gets_a_longer_lease() {
    let config = LeaseConfig::default();
    let slow = |limit: i64, gated: bool| {
        let mut book = book();
        let mut a = op("a", 10, limit);
        if gated {
            a.grant = Some(GrantRef {
                key: "g".into(),
                required: false,
            });
        }
        refill(&mut book, std::slice::from_ref(&a), 0, 100, 0);
        // Two requests a second, for the life of the lease.
        for t in 1..=3 {
            assert!(book.spend(std::slice::from_ref(&a), t * 500).is_some());
        }
        let now = config.lifetime;
        let ask = book.ask(std::slice::from_ref(&a), now)[0];
        (book, a, ask, now)
    };
    let (mut book, a, ask, now) = slow(1_000_000_000, false);
    assert!(ask.want >= 8 * 10, "{ask:?}");
    assert!(
        ask.life > config.lifetime && ask.life <= config.lifetime * LONGEST_LIFE,
        "{ask:?}"
    );
    book.refilled(
        std::slice::from_ref(&a),
        &[ask],
        &[state(20)],
        &[ask.want],
        true,
        now,
    );
    let until = now + ask.life - config.margin;
    assert!(book.spend(std::slice::from_ref(&a), until - 1).is_some());
    assert_eq!(book.spend(std::slice::from_ref(&a), until), None);
    // 1,000 requests below the cap is not far: the one lifetime.
    assert_eq!(slow(10_000, false).2.life, config.lifetime);
    assert_eq!(slow(1_000_000_000, true).2.life, config.lifetime);
}

/// A decision that goes to the store for one counter also refills the
/// lease of another of its counters once that lease is half spent, so
/// that the two run out together next time; a fresh one is left alone.
#[test]
fn a_half_spent_lease_is_refilled_with_the_counter_that_ran_out() {
    let mut book = book();
    let shared = op("shared", 1, 1_000_000);
    let key = op("key", 1, 1_000_000);
    let both = [shared.clone(), key.clone()];
    refill(&mut book, std::slice::from_ref(&shared), 0, 100, 0);
    refill(&mut book, std::slice::from_ref(&key), 0, 20, 0);
    for t in 1..=20 {
        assert!(book.spend(&both, t).is_some());
    }
    // The key's lease is spent; the shared one holds 80 of 100.
    let asks = book.ask(&both, 21);
    assert_eq!(asks[0], Ask::default(), "more than half left: alone");
    assert!(asks[1].want > 0);
    book.refilled(&both, &asks, &[state(20), state(20)], &[0, 40], true, 21);
    for t in 22..62 {
        assert!(book.spend(&both, t).is_some());
    }
    // The key's lease ran out again; the shared one holds 40 of 100: it
    // is topped up with the key's, giving nothing back, and stays
    // spendable until the answer lands.
    let asks = book.ask(&both, 62);
    assert_eq!(asks[0].unused, 0, "{asks:?}");
    assert!(asks[0].want > 0 && asks[1].want > 0, "{asks:?}");
    assert!(book.spend(std::slice::from_ref(&shared), 63).is_some());
    assert!(
        !book.refilling(std::slice::from_ref(&shared), 63),
        "a decision on the shared counter alone does not wait"
    );
    assert!(book.refilling(&both, 63), "one on both waits for the key's");
    // The store added this decision's 1 to both (shared at 61 then, 40 of
    // it this replica's lease) and granted 50 more of the shared one.
    book.refilled(&both, &asks, &[state(61), state(61)], &[50, 40], true, 62);
    assert_eq!(book.unused("shared"), 39 + 50);
    let got = book.spend(std::slice::from_ref(&shared), 64).unwrap();
    assert_eq!(
        got[0].used_before,
        61 + 1 + 50 - (39 + 50),
        "used: the shared counter (61, this decision's 1 and the 50 granted) less what this \
         replica holds"
    );
}

/// A top-up that the store answers with nothing (near a cap) leaves the
/// lease what it holds, under its old life; one that fails leaves it too,
/// free to be topped up again.
#[test]
fn a_lease_topped_up_with_nothing_or_not_at_all_keeps_what_it_holds() {
    let mut book = book();
    let shared = op("shared", 1, 1_000_000);
    let key = op("key", 1, 1_000_000);
    let both = [shared.clone(), key.clone()];
    refill(&mut book, std::slice::from_ref(&shared), 0, 100, 0);
    refill(&mut book, std::slice::from_ref(&key), 0, 60, 0);
    for t in 1..=60 {
        assert!(book.spend(&both, t).is_some());
    }
    let asks = book.ask(&both, 61);
    assert!(asks[0].want > 0 && asks[0].unused == 0, "{asks:?}");
    book.refill_failed(&both, &asks);
    assert_eq!(book.unused("shared"), 40);
    let asks = book.ask(&both, 62);
    assert!(asks[0].want > 0, "asked again after a failure: {asks:?}");
    book.refilled(&both, &asks, &[state(61), state(61)], &[0, 0], true, 62);
    assert_eq!(book.unused("shared"), 40);
    assert!(book.spend(std::slice::from_ref(&shared), 63).is_some());
    assert!(
        book.spend(std::slice::from_ref(&shared), 1_800).is_none(),
        "still under its old life"
    );
}

/// A counter this replica decides on about once a second at random (ten
/// replicas sharing 1,000 keys), over 200 s with the batch's upkeep every
/// 20 ms: most decisions are made from its lease (with the one lifetime,
/// about two in five went to the store).
#[test]
fn a_counter_decided_on_once_a_second_is_mostly_decided_from_its_lease() {
    let mut book = book();
    let a = op("a", 235, 1_000_000_000);
    let (mut hits, mut misses, mut seen) = (0, 0, 0);
    let mut next = 0;
    let mut x: u64 = 12345;
    for now in (0..200_000).step_by(20) {
        let _ = book.expired(now);
        if now < next {
            continue;
        }
        if book.spend(std::slice::from_ref(&a), now).is_some() {
            hits += 1;
        } else {
            misses += 1;
            let asks = book.ask(std::slice::from_ref(&a), now);
            // Applied in the store: demand all the same, as the leasing
            // store reports it.
            book.demanded(std::slice::from_ref(&a));
            let got = asks[0].want;
            book.refilled(
                std::slice::from_ref(&a),
                &asks,
                &[state(seen)],
                &[got],
                true,
                now,
            );
            seen += 235 + got;
        }
        // Exponential gaps with a mean of 1.136 s.
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let u = ((x >> 11) as f64) / ((1u64 << 53) as f64);
        next = now + (-(1.0 - u).ln() * 1136.0) as i64;
    }
    assert!(hits + misses > 150, "{hits} {misses}");
    assert!(
        misses * 4 < hits + misses,
        "{misses} of {} missed",
        hits + misses
    );
}

/// What a lease still holds reaches the store at most every
/// `REPORT_EVERY`, however often it is spent from, and only when it moved.
#[test]
fn what_a_lease_holds_is_reported_at_most_every_so_often() {
    let mut book = book();
    let a = op("a", 1, 1_000_000);
    refill(&mut book, std::slice::from_ref(&a), 0, 100, 0);
    assert!(book.spend(std::slice::from_ref(&a), 10).is_some());
    assert_eq!(book.changed(20), vec![], "the grant itself was news");
    let until = LeaseConfig::default().lifetime;
    assert_eq!(book.changed(REPORT_EVERY), vec![("a".into(), 99, until)]);
    assert!(book
        .spend(std::slice::from_ref(&a), REPORT_EVERY + 1)
        .is_some());
    assert_eq!(book.changed(REPORT_EVERY + 20), vec![]);
    assert_eq!(
        book.changed(2 * REPORT_EVERY),
        vec![("a".into(), 98, until)]
    );
    assert_eq!(book.changed(3 * REPORT_EVERY), vec![], "unmoved");
}

/// A counter decided on here once every 8 s, whose lease lapsed unused,
/// is decided in the store without a lease, and is not left refilling:
/// once its demand grows it gets one again.
#[test]
fn a_counter_too_seldom_for_a_lease_asks_for_none() {
    let mut book = book();
    let a = op("a", 10, 1_000_000_000);
    let asks = book.ask(std::slice::from_ref(&a), 0);
    assert!(asks[0].want > 0, "a first lease, for want of history");
    book.refilled(
        std::slice::from_ref(&a),
        &asks,
        &[state(0)],
        &[asks[0].want],
        true,
        0,
    );
    let _ = book.expired(7_000);
    let asks = book.ask(std::slice::from_ref(&a), 8_000);
    assert_eq!(asks[0].want, 0, "{asks:?}");
    assert!(!book.refilling(std::slice::from_ref(&a), 8_000));
    book.demanded(std::slice::from_ref(&a));
    // Then a hundred decisions in a second: within it, a lease again.
    let asked = (0..100).find(|t| {
        let asks = book.ask(std::slice::from_ref(&a), 8_001 + t * 10);
        book.demanded(std::slice::from_ref(&a));
        asks[0].want > 0
    });
    assert!(asked.is_some(), "{book:?}");
}

/// A busy lease is renewed in the background once a quarter of its time
/// is left: it stays spendable while the renewal is in flight, and what
/// the renewal grants is added to what it still holds, timed from the
/// renewal. An idle lease, or one under a grant, is not renewed; a
/// renewal that granted nothing is not asked again.
#[test]
fn a_busy_lease_is_renewed_before_it_lapses() {
    let config = LeaseConfig::default();
    let mut book = book();
    let a = op("a", 1, 1_000_000);
    refill(&mut book, std::slice::from_ref(&a), 0, 100, 0);
    let usable = config.lifetime - config.margin;
    // Spent from steadily, every 50 ms.
    let mut t = 0;
    while (usable - t) * RENEW_AT > usable {
        t += 50;
        assert!(book.spend(std::slice::from_ref(&a), t).is_some());
        if (usable - t) * RENEW_AT > usable {
            assert_eq!(book.renewals(t), vec![], "more than a quarter left at {t}");
        }
    }
    let renewals = book.renewals(t);
    assert_eq!(renewals.len(), 1, "a quarter left at {t}");
    let (renewed, ask) = &renewals[0];
    assert_eq!((renewed.key.as_str(), renewed.amount), ("a", 0));
    assert_eq!(ask.unused, 0, "a renewal gives nothing back");
    assert!(ask.want > 0);
    assert_eq!(book.renewals(t), vec![], "one renewal in flight at a time");
    let held = book.unused("a");
    let big = op("a", 200, 1_000_000);
    assert_eq!(
        book.ask(std::slice::from_ref(&big), t),
        vec![Ask::default()],
        "a decision the lease cannot serve leaves it to the renewal in flight"
    );
    assert_eq!(book.unused("a"), held);
    assert!(
        book.spend(std::slice::from_ref(&a), t + 1).is_some(),
        "spendable while renewing"
    );
    // The counter stood at 100 (all of it this replica's lease) when the
    // renewal granted 50 more.
    book.renewed(
        std::slice::from_ref(renewed),
        std::slice::from_ref(ask),
        &[state(100)],
        &[50],
        t,
    );
    assert_eq!(book.unused("a"), held - 1 + 50);
    let later = t + usable - 1;
    assert!(
        book.spend(std::slice::from_ref(&a), later).is_some(),
        "usable for a lifetime from the renewal"
    );
    let got = book.spend(std::slice::from_ref(&a), later).unwrap();
    assert_eq!(
        got[0].used_before,
        100 + 50 - book.unused("a") - 1,
        "used as the store holds it, less what the lease holds"
    );

    // Sized as a refill for the op would be: at least `min_requests` of
    // its amount, though demand here (one every 200 ms) asks for less.
    let mut book = self::book();
    let hundred = op("h", 100, 1_000_000);
    refill(&mut book, std::slice::from_ref(&hundred), 0, 1_000, 0);
    let mut t = 0;
    let renewals = loop {
        t += 200;
        assert!(t < usable, "renewed before it lapses");
        assert!(book.spend(std::slice::from_ref(&hundred), t).is_some());
        let renewals = book.renewals(t);
        if !renewals.is_empty() {
            break renewals;
        }
    };
    assert!(
        renewals[0].1.want >= config.min_requests * 100,
        "{:?}",
        renewals[0].1
    );

    // Renewed, and the store grants nothing: not asked again.
    let mut book = self::book();
    refill(&mut book, std::slice::from_ref(&a), 0, 4, 0);
    for t in 1..4 {
        assert!(book.spend(std::slice::from_ref(&a), t).is_some());
    }
    let renewals = book.renewals(4);
    assert_eq!(
        renewals.len(),
        1,
        "running out: a quarter of its grant left"
    );
    let (ops, asks): (Vec<_>, Vec<_>) = renewals.into_iter().unzip();
    book.renewed(&ops, &asks, &[state(4)], &[0], 4);
    assert_eq!(book.renewals(5), vec![]);

    // Idle: not renewed (it goes back instead).
    let mut book = self::book();
    refill(&mut book, std::slice::from_ref(&a), 0, 100, 0);
    assert!(book.spend(std::slice::from_ref(&a), 1).is_some());
    assert_eq!(book.renewals(usable - 10), vec![]);

    // Under a grant: not renewed (a revocation takes effect within a
    // lifetime).
    let mut book = self::book();
    let gated = CounterOp {
        grant: Some(GrantRef {
            key: "g".into(),
            required: false,
        }),
        ..a.clone()
    };
    refill(&mut book, std::slice::from_ref(&gated), 0, 100, 0);
    for t in (50..usable).step_by(50) {
        assert!(book.spend(std::slice::from_ref(&gated), t).is_some());
        assert_eq!(book.renewals(t), vec![]);
    }
}

/// Decisions that waited for a refill are spent with the time they were
/// asked at, earlier than the last spend: they neither shrink the usual
/// gap nor move the last spend back, so a busy lease does not go back as
/// idle after a quiet moment a few of its usual gaps long.
#[test]
fn decisions_that_waited_do_not_make_a_busy_lease_look_idle() {
    let mut book = book();
    let a = op("a", 1, 1_000_000);
    refill(&mut book, std::slice::from_ref(&a), 0, 1_000, 0);
    let mut t = 0;
    for _ in 0..15 {
        t += 80;
        assert!(book.spend(std::slice::from_ref(&a), t).is_some());
        for _ in 0..4 {
            assert!(book.spend(std::slice::from_ref(&a), t - 40).is_some());
        }
    }
    assert_eq!(
        book.expired(t + 250),
        vec![],
        "250 ms is about three of its gaps"
    );
    let back = book.expired(t + IDLE_GAPS as Millis * 80);
    assert_eq!(back.len(), 1, "idle for six of its gaps: {back:?}");
}

/// Demand in bursts (eight decisions a millisecond apart every 400 ms):
/// the pause between two bursts is not taken for idleness, however short
/// the gaps within them; a pause of six of them is.
#[test]
fn a_lease_spent_in_bursts_is_not_idle_between_them() {
    // Living long enough that only idleness sends it back.
    let mut book = LeaseBook::new(LeaseConfig {
        lifetime: 20_000,
        ..LeaseConfig::default()
    });
    let a = op("a", 1, 1_000_000);
    refill(&mut book, std::slice::from_ref(&a), 0, 1_000, 0);
    let mut t = 0;
    for _ in 0..6 {
        t += 400;
        for i in 0..8 {
            assert!(book.spend(std::slice::from_ref(&a), t + i).is_some());
        }
        assert_eq!(book.expired(t + 7 + 399), vec![], "between bursts at {t}");
    }
    let back = book.expired(t + 7 + IDLE_GAPS as Millis * 400);
    assert_eq!(back.len(), 1, "six pauses long: {back:?}");
}

/// The store's entry for a lease is named by its end: a refill that
/// granted nothing leaves the entry as it was, so the reports keep naming
/// it; a refill that gave nothing back added its grant to the live entry,
/// which the next report corrects; and nothing is reported while a renewal
/// is in flight (a report landing after it would name the entry it
/// replaced).
#[test]
fn reports_name_the_entry_the_store_holds() {
    let life = LeaseConfig::default().lifetime;
    let a = op("a", 1, 1_000_000);

    let mut book = book();
    refill(&mut book, std::slice::from_ref(&a), 0, 2, 0);
    assert!(book.spend(std::slice::from_ref(&a), 1).is_some());
    assert!(book.spend(std::slice::from_ref(&a), 1).is_some());
    let asks = book.ask(std::slice::from_ref(&a), 2);
    book.refilled(std::slice::from_ref(&a), &asks, &[state(3)], &[0], true, 2);
    assert_eq!(
        book.changed(3),
        vec![("a".into(), 0, life)],
        "refused a grant: still the first entry"
    );

    let mut book = self::book();
    refill(&mut book, std::slice::from_ref(&a), 0, 2, 0);
    assert!(book.spend(std::slice::from_ref(&a), 1).is_some());
    assert!(book.spend(std::slice::from_ref(&a), 1).is_some());
    assert_eq!(book.changed(1), vec![("a".into(), 0, life)], "spent out");
    let asks = book.ask(std::slice::from_ref(&a), 2);
    book.refilled(std::slice::from_ref(&a), &asks, &[state(3)], &[10], true, 2);
    assert_eq!(
        book.changed(1 + REPORT_EVERY),
        vec![("a".into(), 10, 2 + life)],
        "the store added 10 to the entry's last report: corrected"
    );

    let mut book = self::book();
    refill(&mut book, std::slice::from_ref(&a), 0, 100, 0);
    let usable = life - LeaseConfig::default().margin;
    let late = usable - usable / RENEW_AT;
    assert!(book.spend(std::slice::from_ref(&a), late).is_some());
    assert_eq!(book.renewals(late).len(), 1);
    assert_eq!(
        book.changed(late + REPORT_EVERY.min(usable - late - 1)),
        vec![]
    );
}
