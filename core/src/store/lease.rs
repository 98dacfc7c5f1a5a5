//! A replica's leases: budget already counted in the shared store on this
//! replica's behalf, spent here without a round trip.
//!
//! Invariant: no I/O and no clock of its own; every call is given `now`.
//! The book never lets a decision spend more than a lease holds, and it
//! hands every unused amount back exactly once: to a refill, to an expiry
//! return, or to a drain at shutdown. What it hands back is taken out of
//! the lease first, so an amount in flight to the store can never also be
//! spent here.
//!
//! A lease is only ever taken on a plain counter (a calendar window or a
//! lifetime total). Concurrency gauges are never leased (a slot must be
//! freed when its call ends, on whichever replica), nor are rolling
//! windows (their end is set by the store at first use).

use std::collections::HashMap;

use super::{CounterKind, CounterOp, CounterState, Expiry};
use crate::clock::Millis;

/// How leases are sized and how long they are used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeaseConfig {
    /// How long the store keeps a lease record; also the demand a lease is
    /// sized for.
    pub lifetime: Millis,
    /// Stop using a lease this long before its record lapses, so that a
    /// decision made here never relies on a lease the store has let go.
    pub margin: Millis,
    /// A lease takes at most 1/`share` of the room left below the cap (and
    /// below the next alert value).
    pub share: i64,
    /// A lease is at least this many of the asking request's amount.
    pub min_requests: i64,
    /// Leases kept, at most; a counter past it is decided in the store.
    pub max_leases: usize,
    /// A lease nothing has spent from for this long, and for
    /// [`IDLE_GAPS`] of its longest recent gap between spends, goes back
    /// at the next batch: a replica whose demand stopped does not sit on
    /// budget.
    pub idle: Millis,
    /// A decision refused only because other replicas hold unused leases
    /// is decided again once, this long after, when they may have come
    /// back idle; 0 never. Must stay under the store timeout.
    pub retry_early_denial_after: Millis,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            lifetime: 2_000,
            margin: 250,
            share: 4,
            min_requests: 8,
            max_leases: 100_000,
            idle: 200,
            retry_early_denial_after: 0,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Lease {
    /// Counted in the store, not yet spent here.
    remaining: i64,
    /// What the last refill granted.
    granted: i64,
    /// The counter as the store last answered, this lease included: what
    /// this replica reports as used is `seen - remaining`.
    seen: i64,
    /// The op it was last refilled for. Its limit and alert values are
    /// the ones the lease is spent under: a change to either (a reload)
    /// sends the next decision to the store, which takes the lease back,
    /// so that a new threshold is crossed there, once. A renewal asks
    /// again with it.
    op: Option<CounterOp>,
    /// The grant in force when it was granted (see [`CounterState::grant`]).
    grant: Option<i64>,
    /// Spendable before this instant.
    usable_until: Millis,
    /// When the store's entry for it lapses, as the store wrote it (the
    /// `now` sent plus the life asked): a report or a return names it, so
    /// that one still in flight when a later refill rewrote the entry
    /// cannot overwrite that refill's.
    record_until: Millis,
    /// A refill of this counter is in flight: no second one asks for more.
    refilling: bool,
    /// A renewal of this lease is in flight (see [`LeaseBook::renewals`]):
    /// it stays spendable meanwhile, since what it holds stays counted.
    renewing: bool,
    /// Whether it may be renewed: not once a renewal failed or granted
    /// nothing, until the next refill.
    renewable: bool,
    /// Spent here since `since`, for the demand estimate.
    spent: i64,
    since: Millis,
    /// Demand, in units per second, as last estimated.
    rate: i64,
    /// When this replica last spent from it.
    last_spent: Millis,
    /// The longest recent time between two spends (ms; see
    /// [`Lease::touched`]): a lease is idle only after several of them
    /// pass with none.
    longest_gap: f64,
    /// Spent or credited since the store last heard what it holds.
    dirty: bool,
    /// When the store last heard what it holds.
    reported_at: Millis,
}

impl Lease {
    /// Whether it was granted under `op`'s limit and alert values.
    fn granted_for(&self, op: &CounterOp) -> bool {
        self.op
            .as_ref()
            .is_some_and(|g| g.limit == op.limit && g.alert_at == op.alert_at)
    }

    /// Whether it can serve `op` now: live, granted under its limit,
    /// holding its amount, not being refilled, and (for an approval gate)
    /// with a grant seen open.
    fn serves(&self, op: &CounterOp, now: Millis) -> bool {
        leasable(op)
            && !self.refilling
            && self.usable_until > now
            && self.granted_for(op)
            && self.remaining >= op.amount
            && (op.grant.as_ref().is_none_or(|g| !g.required) || self.grant.is_some())
    }

    /// A decision on this counter, now: the longest recent gap between
    /// them follows. It is the longest, fading with time rather than with
    /// decisions, because demand comes in bursts: with an average of the
    /// gaps, a burst's many short ones hid the pause after it, busy leases
    /// went back as idle between bursts, and each next burst missed and
    /// waited for a refill (in some runs at 1,000 keys, a third of all
    /// decisions). A decision that waited for a refill comes with the
    /// time it was asked at, earlier than the last spend's: it says
    /// nothing of the gaps.
    fn touched(&mut self, now: Millis) {
        if now < self.last_spent {
            return;
        }
        let gap = (now - self.last_spent).min(60_000) as f64;
        let faded = self.longest_gap * 0.5f64.powf(gap / GAP_HALF_LIFE as f64);
        self.longest_gap = gap.max(faded);
        self.last_spent = now;
    }

    /// How long nothing must spend from it before it counts as idle.
    fn quiet(&self, idle: Millis) -> Millis {
        idle.max((IDLE_GAPS * self.longest_gap) as Millis)
    }
}

/// What a decision that goes to the store gives back and asks for, per op:
/// a lease of `want`, usable for `life` less the margin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ask {
    pub unused: i64,
    pub want: i64,
    pub life: Millis,
}

/// Far from the cap a lease lives this many lifetimes, and is sized to the
/// demand over that time: refills are that many times rarer, and a
/// counter this replica spends from too slowly to use even the smallest
/// lease (`min_requests`) within one lifetime (ten replicas sharing 1,000
/// keys each see a key about once a second) no longer sees each lease
/// lapse after a request or two. Far means the lease is at most
/// 1/[`FAR_SHARE`] of the room the replica last saw below the cap and the
/// next alert value; an approval gate is never far. Near a cap or a
/// threshold, and wherever a revocation must take effect, a lease keeps
/// the one lifetime.
pub const LONGEST_LIFE: Millis = 5;

/// See [`LONGEST_LIFE`].
pub const FAR_SHARE: i64 = 1000;

/// An amount handed back to the store: `unused` of counter `key`, from
/// the lease whose entry there lapses at `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Return {
    pub key: String,
    pub unused: i64,
    pub until: Millis,
}

#[derive(Debug)]
pub struct LeaseBook {
    config: LeaseConfig,
    leases: HashMap<String, Lease>,
}

/// How many of a lease's longest recent gap between spends pass with none
/// before it counts as idle. Under steady random demand at a mean gap of
/// m, the longest recent gap is about m·ln(n) for the n gaps of the last
/// [`GAP_HALF_LIFE`]; a gap six times that comes with a chance of under
/// e^-9 per spend once n is past 4.
pub const IDLE_GAPS: f64 = 6.0;

/// The longest recent gap between spends fades by half over this long
/// (ms): a counter whose demand quickens is judged on its new gaps within
/// a few of these.
pub const GAP_HALF_LIFE: Millis = 2_000;

/// A busy lease is renewed once 1/`RENEW_AT` of its time or of its
/// grant is left (see [`LeaseBook::renewals`]).
pub const RENEW_AT: i64 = 4;

/// How often, at most, the store hears what a lease still holds. Every
/// batch (20 ms) was one write per busy lease per batch, most of what
/// Redis did for leased decisions; what it is for (reports, and telling
/// early denials apart) can be this late.
pub const REPORT_EVERY: Millis = 250;

/// Whether a lease of `want` on `op`'s counter, last seen at `seen`, is at
/// most 1/[`FAR_SHARE`] of the room below the cap and the next alert value
/// (see [`LONGEST_LIFE`]).
fn far_below(op: &CounterOp, seen: i64, want: i64) -> bool {
    let next_alert = op.alert_at.iter().copied().find(|&v| v > seen);
    let ceiling = next_alert.map_or(op.limit, |v| v.min(op.limit));
    op.grant.is_none() && ceiling.saturating_sub(seen) / FAR_SHARE >= want
}

/// A new lease's size and life for `op` at the demand `lease` has seen
/// (its rate estimate moves on); `None` for a counter seen too seldom here
/// to be worth one.
fn size(
    config: &LeaseConfig,
    lease: &mut Lease,
    op: &CounterOp,
    now: Millis,
) -> Option<(i64, Millis)> {
    let elapsed = (now - lease.since).max(1);
    let measured = lease.spent.saturating_mul(1000) / elapsed;
    // Smoothed, so that one quiet moment does not shrink it.
    lease.rate = (lease.rate + measured.max(lease.rate / 2)) / 2;
    let floor = op.amount.max(1).saturating_mul(config.min_requests);
    let longest = config.lifetime * LONGEST_LIFE;
    // A counter that has had a lease, and at whose demand here
    // (measured over a lifetime at least) one would serve
    // fewer than two decisions in the longest life (100,000
    // keys at 10k/s: each seen every 10 s), is decided in the
    // store without one: a lease there only adds a grant and a
    // return to every decision.
    let seldom = lease.spent.saturating_mul(longest - config.margin) / elapsed;
    if lease.granted > 0 && elapsed >= config.lifetime && seldom < 2 * op.amount {
        // Measured over the last longest life only, so that a
        // counter seldom for hours is not judged on its past
        // once demand comes.
        if elapsed > longest {
            lease.spent = lease.spent.saturating_mul(longest) / elapsed;
            lease.since = now - longest;
        }
        return None;
    }
    // Sized to demand over 90% of the time it can be used, so
    // that it is spent rather than left to lapse: far from the
    // cap over the longest life, otherwise over one lifetime.
    let sized = |life: Millis| {
        let usable = (life - config.margin) * 9 / 10;
        let for_demand = lease.rate.saturating_mul(usable) / 1000;
        for_demand.max(floor).saturating_add(op.amount)
    };
    let long = sized(longest);
    let (want, life) = if lease.rate > 0 && far_below(op, lease.seen, long) {
        (long, longest)
    } else {
        (sized(config.lifetime), config.lifetime)
    };
    Some((want, life))
}

/// Whether an op's counter can be leased at all.
pub fn leasable(op: &CounterOp) -> bool {
    op.kind == CounterKind::Plain && !matches!(op.expiry, Expiry::AfterFirstUse(_))
}

impl LeaseBook {
    pub fn new(config: LeaseConfig) -> LeaseBook {
        LeaseBook {
            config,
            leases: HashMap::new(),
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// Spends `ops` from their leases, all or none: the states a store
    /// would have answered, as this replica knows them, or `None` when an
    /// op has no live lease holding its amount under the same limit (or,
    /// for an approval gate, no grant seen open).
    pub fn spend(&mut self, ops: &[CounterOp], now: Millis) -> Option<Vec<CounterState>> {
        if ops.is_empty() {
            return None;
        }
        // One lookup an op: each is spent as it is checked, and those
        // spent are put back as they were if a later one cannot be.
        let mut states = Vec::with_capacity(ops.len());
        let mut undo = Vec::with_capacity(ops.len());
        for op in ops {
            let Some(lease) = self.leases.get_mut(&op.key).filter(|l| l.serves(op, now)) else {
                for (op, (last_spent, longest_gap, dirty)) in ops.iter().zip(undo) {
                    let lease = self.leases.get_mut(&op.key).expect("spent above");
                    lease.remaining += op.amount;
                    lease.spent -= op.amount;
                    lease.last_spent = last_spent;
                    lease.longest_gap = longest_gap;
                    lease.dirty = dirty;
                }
                return None;
            };
            undo.push((lease.last_spent, lease.longest_gap, lease.dirty));
            states.push(CounterState {
                used_before: lease.seen - lease.remaining,
                resets_at: None,
                grant: lease.grant,
                leased: 0,
            });
            lease.remaining -= op.amount;
            lease.spent += op.amount;
            lease.dirty = true;
            lease.touched(now);
        }
        Some(states)
    }

    /// What a decision going to the store gives back and asks for, per op
    /// whose lease cannot serve it: the unused amount (taken out of the
    /// lease now), and a new lease sized to demand, unless a refill of that
    /// counter is already in flight or the book is full. An op whose lease
    /// could serve it asks for nothing.
    pub fn ask(&mut self, ops: &[CounterOp], now: Millis) -> Vec<Ask> {
        let config = self.config;
        ops.iter()
            .map(|op| {
                if !leasable(op) {
                    return Ask::default();
                }
                if !self.leases.contains_key(&op.key) {
                    if self.leases.len() >= config.max_leases {
                        return Ask::default();
                    }
                    self.leases.insert(
                        op.key.clone(),
                        Lease {
                            since: now,
                            // Its first gap is timed from now, not from
                            // the epoch.
                            last_spent: now,
                            ..Lease::default()
                        },
                    );
                }
                let lease = self.leases.get_mut(&op.key).expect("inserted above");
                // A decision that goes to the store is demand here too: a
                // counter whose decisions mostly miss must not look idle.
                lease.touched(now);
                if lease.renewing {
                    // Left as it is: what a renewal in flight grants is
                    // added to it, and the entry it writes in the store
                    // must stay this replica's. This decision is charged
                    // in the store directly.
                    return Ask::default();
                }
                // A lease that could serve this op is left as it is while
                // it holds at least half of what it was granted, for at
                // least half of its time: the decision goes to Redis for
                // another counter, and this one is charged there
                // directly. One spent further is topped up now, with the
                // counter that sent the decision there: the leases of
                // counters that are decided together then run out
                // together, rather than each sending decisions to Redis
                // at its own moment (with 20 rules a request, one in
                // eight did).
                if lease.serves(op, now) {
                    let half_left = lease.remaining * 2 >= lease.granted
                        && (lease.usable_until - now) * 2 >= lease.usable_until - lease.since;
                    if half_left {
                        return Ask::default();
                    }
                    // Topped up as a renewal is, giving nothing back, so
                    // that it stays spendable meanwhile: a counter every
                    // decision shares, taken back and refilled with each
                    // key's, had every decision wait for that refill (one
                    // in five, at 1,000 keys).
                    return match size(&config, lease, op, now) {
                        Some((want, life)) => {
                            lease.renewing = true;
                            Ask {
                                unused: 0,
                                want,
                                life,
                            }
                        }
                        None => Ask::default(),
                    };
                }
                let unused = std::mem::take(&mut lease.remaining);
                if lease.refilling {
                    return Ask {
                        unused,
                        ..Ask::default()
                    };
                }
                match size(&config, lease, op, now) {
                    Some((want, life)) => {
                        lease.refilling = true;
                        Ask { unused, want, life }
                    }
                    None => Ask {
                        unused,
                        ..Ask::default()
                    },
                }
            })
            .collect()
    }

    /// Records the store's answer to [`LeaseBook::ask`]: `granted[i]` is op
    /// i's new lease, counted in the store, whose counter stood at
    /// `states[i].used_before` before the decision. `applied` says whether
    /// the decision's own amounts were added. `sent_at` is the `now` the
    /// store was given: a lease is timed from then, never from its answer.
    /// A lease topped up (see [`LeaseBook::ask`]) adds its grant to what
    /// it still holds, as a renewal does.
    pub fn refilled(
        &mut self,
        ops: &[CounterOp],
        asks: &[Ask],
        states: &[CounterState],
        granted: &[i64],
        applied: bool,
        sent_at: Millis,
    ) {
        for (i, op) in ops.iter().enumerate() {
            let Some(lease) = self.leases.get_mut(&op.key) else {
                continue;
            };
            // An op that asked for nothing leaves the lease to the refill
            // that did.
            if asks.get(i).is_none_or(|a| a.want == 0) {
                continue;
            }
            let got = granted.get(i).copied().unwrap_or(0).max(0);
            let used = states.get(i).map_or(0, |s| s.used_before);
            let topped_up = std::mem::take(&mut lease.renewing);
            lease.refilling = false;
            if topped_up {
                if got == 0 {
                    // Near a cap or a threshold: it keeps what it holds
                    // until it lapses, and is not renewed.
                    lease.renewable = false;
                    continue;
                }
                // The store's entry now names the grant alone: the next
                // report corrects it.
                lease.dirty = true;
            } else if asks[i].unused == 0 && got > 0 && lease.record_until > sent_at {
                // Nothing was given back, so the store added the grant to
                // its live entry, which names what the lease held at its
                // last report: the next report corrects it.
                lease.dirty = true;
            } else {
                // The grant itself told the store what it holds.
                lease.reported_at = sent_at;
            }
            lease.remaining += got;
            lease.granted = got;
            lease.seen = used + if applied { op.amount } else { 0 } + got;
            lease.op = Some(op.clone());
            lease.renewable = true;
            lease.grant = states.get(i).and_then(|s| s.grant);
            let life = asks[i].life.max(self.config.lifetime);
            lease.usable_until = sent_at + life - self.config.margin;
            if got > 0 {
                // Only a grant rewrites the store's entry.
                lease.record_until = sent_at + asks[i].life;
            }
            lease.spent = 0;
            lease.since = sent_at;
            if !topped_up {
                lease.last_spent = sent_at;
            }
        }
    }

    /// The busy leases to renew now, in the background, before decisions
    /// find them spent or lapsed and wait for a refill: each with the op
    /// it was last refilled for, at amount 0, and what to ask. A lease is
    /// renewed when a quarter of its time or of its grant is left, if a
    /// decision spent from it lately (an idle one goes back instead) and
    /// it names no grant (a revocation must still take effect within a
    /// lifetime). It stays spendable while the renewal is in flight: the
    /// renewal gives nothing back, and what it grants is added.
    pub fn renewals(&mut self, now: Millis) -> Vec<(CounterOp, Ask)> {
        let config = self.config;
        let mut out = Vec::new();
        for lease in self.leases.values_mut() {
            let Some(op) = lease.op.as_ref().filter(|_| lease.renewable) else {
                continue;
            };
            if lease.refilling
                || lease.renewing
                || lease.granted == 0
                || lease.usable_until <= now
                || op.grant.is_some()
                || now.saturating_sub(lease.last_spent) >= lease.quiet(config.idle)
            {
                continue;
            }
            let left = lease.usable_until - now;
            let near_end = left * RENEW_AT <= lease.usable_until - lease.since;
            let running_out = lease.remaining * RENEW_AT <= lease.granted;
            if !(near_end || running_out) {
                continue;
            }
            // Sized for the op as a refill would be (its amount sets the
            // floor, and whether the counter is seen too seldom); sent at 0.
            let op = op.clone();
            if let Some((want, life)) = size(&config, lease, &op, now) {
                lease.renewing = true;
                out.push((
                    CounterOp { amount: 0, ..op },
                    Ask {
                        unused: 0,
                        want,
                        life,
                    },
                ));
            }
        }
        out
    }

    /// Records the store's answer to [`LeaseBook::renewals`], as
    /// [`LeaseBook::refilled`] does for a refill: what was granted is added
    /// to what the lease still holds, and the lease is timed from
    /// `sent_at`. A renewal granted nothing (near a cap or a threshold)
    /// is not asked again: the lease lapses, and decisions go to the store.
    pub fn renewed(
        &mut self,
        ops: &[CounterOp],
        asks: &[Ask],
        states: &[CounterState],
        granted: &[i64],
        sent_at: Millis,
    ) {
        for (i, op) in ops.iter().enumerate() {
            let Some(lease) = self.leases.get_mut(&op.key) else {
                continue;
            };
            if !lease.renewing {
                continue;
            }
            lease.renewing = false;
            let got = granted.get(i).copied().unwrap_or(0).max(0);
            let Some(state) = states.get(i).filter(|_| got > 0) else {
                lease.renewable = false;
                continue;
            };
            lease.remaining += got;
            lease.granted = got;
            lease.seen = state.used_before + got;
            lease.grant = state.grant;
            lease.dirty = true;
            let asked = asks.get(i).map_or(0, |a| a.life);
            lease.usable_until = sent_at + asked.max(self.config.lifetime) - self.config.margin;
            lease.record_until = sent_at + asked;
            lease.spent = 0;
            lease.since = sent_at;
        }
    }

    /// A renewal that failed (or was refused) leaves the leases as they
    /// were, to lapse or be refilled by a decision.
    pub fn renew_failed(&mut self, ops: &[CounterOp]) {
        for op in ops {
            if let Some(lease) = self.leases.get_mut(&op.key) {
                lease.renewing = false;
                lease.renewable = false;
            }
        }
    }

    /// A refill that never reached the store for the ops where `reached`
    /// is false (a reserve across cluster slots stopped before their
    /// slot): what they sent is theirs again, under their old lifetime.
    pub fn not_reached(&mut self, ops: &[CounterOp], asks: &[Ask], reached: &[bool]) {
        for ((op, ask), reached) in ops.iter().zip(asks).zip(reached) {
            if *reached {
                continue;
            }
            if let Some(lease) = self.leases.get_mut(&op.key) {
                lease.remaining += ask.unused;
                if ask.want > 0 {
                    lease.refilling = false;
                    lease.renewing = false;
                }
            }
        }
    }

    /// A decision on `ops` was applied in the store, not from leases: it is
    /// demand all the same, and leases are sized to demand. (Counting only
    /// what leases served would shrink them each time decisions went to
    /// the store, and send more there.)
    pub fn demanded(&mut self, ops: &[CounterOp]) {
        for op in ops {
            if let Some(lease) = self.leases.get_mut(&op.key) {
                lease.spent = lease.spent.saturating_add(op.amount);
            }
        }
    }

    /// The refill of `ops` failed: whether or not the store gave back what
    /// was sent is unknown, so it stays counted there (on the side of
    /// denying) and the leases are free to be refilled again.
    pub fn refill_failed(&mut self, ops: &[CounterOp], asks: &[Ask]) {
        for (op, ask) in ops.iter().zip(asks) {
            if ask.want > 0 {
                if let Some(lease) = self.leases.get_mut(&op.key) {
                    lease.refilling = false;
                    lease.renewing = false;
                }
            }
        }
    }

    /// Gives `amount` back to the lease of counter `key` (a settle that
    /// used less, or a withdrawn decision), or takes `-amount` more from
    /// it (a settle that used more). `false` when the lease cannot take
    /// it: it has lapsed, is being refilled, or holds too little; the
    /// caller then moves the counter in the store.
    pub fn credit(&mut self, key: &str, amount: i64, now: Millis) -> bool {
        match self.leases.get_mut(key) {
            Some(lease)
                if !lease.refilling
                    && lease.usable_until > now
                    && lease.remaining.saturating_add(amount) >= 0 =>
            {
                lease.remaining += amount;
                if amount < 0 {
                    lease.spent -= amount;
                }
                lease.dirty = true;
                true
            }
            _ => false,
        }
    }

    /// Takes out every lease past its use or idle, to be handed back, and
    /// forgets counters that have been idle for the longest lease life.
    pub fn expired(&mut self, now: Millis) -> Vec<Return> {
        let LeaseConfig { lifetime, idle, .. } = self.config;
        let mut out = Vec::new();
        self.leases.retain(|key, lease| {
            if lease.refilling || lease.renewing {
                return true;
            }
            if lease.usable_until > now {
                let quiet = lease.quiet(idle);
                if lease.remaining == 0 || now.saturating_sub(lease.last_spent) < quiet {
                    return true;
                }
                lease.usable_until = now;
            }
            if lease.remaining > 0 {
                out.push(Return {
                    key: key.clone(),
                    unused: std::mem::take(&mut lease.remaining),
                    until: lease.record_until,
                });
            }
            // Kept while decisions come (its demand estimate), then
            // forgotten once none has for the longest lease life.
            now.saturating_sub(lease.usable_until.max(lease.last_spent)) < lifetime * LONGEST_LIFE
        });
        out
    }

    /// The live leases whose unused amount changed since the store last
    /// heard it, at most every [`REPORT_EVERY`] (at once when a lease is
    /// spent out): the counter, what is left, and when the store's record
    /// of it lapses. So that other replicas (and reports) see what this
    /// one holds.
    pub fn changed(&mut self, now: Millis) -> Vec<(String, i64, Millis)> {
        self.leases
            .iter_mut()
            .filter(|(_, l)| {
                // Not while a refill or renewal is in flight: a report
                // landing after it names the entry it replaced, and is
                // dropped.
                l.dirty
                    && !l.refilling
                    && !l.renewing
                    && l.usable_until > now
                    && (l.remaining == 0 || now.saturating_sub(l.reported_at) >= REPORT_EVERY)
            })
            .map(|(key, l)| {
                l.dirty = false;
                l.reported_at = now;
                (key.clone(), l.remaining, l.record_until)
            })
            .collect()
    }

    /// Takes out every unused amount (at shutdown).
    pub fn drain(&mut self) -> Vec<Return> {
        let out = self
            .leases
            .iter_mut()
            .filter(|(_, l)| l.remaining > 0)
            .map(|(key, l)| Return {
                key: key.clone(),
                unused: std::mem::take(&mut l.remaining),
                until: l.record_until,
            })
            .collect();
        for lease in self.leases.values_mut() {
            lease.usable_until = Millis::MIN;
        }
        out
    }

    /// Whether `ops` may be decided here once the refills and renewals in
    /// flight land: some op's lease cannot serve it now, and each such
    /// lease is being refilled or renewed. (Waiting on a lease that can
    /// serve already, or beside one nothing will refill, only delays the
    /// call to the store.)
    pub fn refilling(&self, ops: &[CounterOp], now: Millis) -> bool {
        let mut waiting = false;
        for op in ops {
            match self.leases.get(&op.key) {
                Some(l) if l.serves(op, now) => {}
                Some(l) if l.refilling || l.renewing => waiting = true,
                _ => return false,
            }
        }
        waiting
    }

    /// What this replica holds unused of counter `key` now.
    pub fn unused(&self, key: &str) -> i64 {
        self.leases.get(key).map_or(0, |l| l.remaining)
    }

    /// Unused amounts held now, by counter.
    pub fn outstanding(&self) -> impl Iterator<Item = (&str, i64)> {
        self.leases
            .iter()
            .filter(|(_, l)| l.remaining > 0)
            .map(|(k, l)| (k.as_str(), l.remaining))
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

#[cfg(test)]
mod tests;
