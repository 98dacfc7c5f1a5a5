//! What the gate reports, and to whom. The gate defines these traits and
//! calls them; telemetry, the decision log and the alert dispatcher
//! implement them. So the gate depends on none of them, and data flows one
//! way: a decision is made, then reported.

use std::fmt;
use std::time::Duration;

use super::{CheckInput, GateError, TopUp};
use crate::engine::decide::{AlertCrossing, Plan, RuleCounter};
use crate::engine::window::Millis;
use crate::engine::{Attributes, Decision};
use crate::policy::CompiledPolicy;
use crate::store::{CounterOp, StoreError};

/// One finished decision, with what it was made from.
#[derive(Debug)]
pub struct DecisionReport<'a> {
    /// The one policy snapshot the decision used.
    pub policy: &'a CompiledPolicy,
    /// The one clock reading the decision used.
    pub now: Millis,
    pub elapsed: Duration,
    /// The request as the front end handed it over, less its route
    /// attributes, which went into `attributes`. Its API key, if any, must
    /// only ever be hashed.
    pub input: &'a CheckInput,
    /// The attributes the decision was made on (route, registry, client,
    /// and the action id the gate gave), once they were known.
    pub attributes: Option<&'a Attributes>,
    /// The counter operations, once they were planned.
    pub plan: Option<&'a Plan>,
    pub result: &'a Result<Decision, GateError>,
}

/// One finished top-up: more output reserved for a call whose response
/// streams past what its reservation covered ([`super::Gate::top_up`]).
#[derive(Debug)]
pub struct TopUpReport<'a> {
    /// The snapshot that decided the call, which the top-up also uses.
    pub policy: &'a CompiledPolicy,
    pub now: Millis,
    /// The call's request, as for its decision.
    pub input: &'a CheckInput,
    /// The attributes the call was decided on, with the model decided.
    pub attributes: &'a Attributes,
    /// The output tokens asked for.
    pub output_tokens: u64,
    /// What the top-up reserved (or, with no room, tried to), parallel to
    /// `counters`; empty when it failed before it was planned.
    pub ops: &'a [CounterOp],
    pub counters: &'a [RuleCounter],
    pub result: &'a Result<TopUp, GateError>,
}

/// Everything the gate reports. Each method has an empty default, so an
/// observer implements only what it records.
pub trait Observer: Send + Sync + fmt::Debug {
    /// A decision finished, allowed, denied or failed.
    fn decided(&self, _report: &DecisionReport<'_>) {}
    /// A top-up finished, reserved, without room or failed.
    fn topped_up(&self, _report: &TopUpReport<'_>) {}
    /// A decision was abandoned mid-way (its caller went away). Its store
    /// call may still have reserved; that reservation expires.
    fn cancelled(&self) {}
    /// One counter-store call finished.
    fn store_call(&self, _elapsed: Duration, _error: Option<&StoreError>) {}
    /// A reservation that was to expire at `expires_at` was settled.
    fn settled(&self, _expires_at: Millis) {}
    /// An approval was granted or revoked (`approve`, `revoke`).
    fn approval(&self, _action: &str) {}
    /// A call settled: what it used and spent, with its model and team
    /// (empty when it had none).
    fn spent(&self, _model: &str, _team: &str, _used: &crate::store::SpendEntry) {}
    /// A reservation whose decision never reached its caller was taken
    /// back (`kept`: its estimate stays charged, for a call that went ahead
    /// failing open; otherwise refunded).
    fn withdrawn(&self, _kept: bool) {}
    /// Taking such a reservation back failed; it lapses charged.
    fn withdraw_failed(&self) {}
    /// A settle found that the upstream ran another model than the one
    /// decided on, and charged the one it ran.
    fn served_other_model(&self) {}
}

/// Where alert crossings go. Called on the decision path: an
/// implementation must only queue, never wait.
pub trait AlertSink: Send + Sync + fmt::Debug {
    fn send(&self, policy: &CompiledPolicy, crossings: &[AlertCrossing], now: Millis);
}

/// The observer of a gate built without one: reports go nowhere.
#[derive(Debug, Default)]
pub struct Unobserved;

impl Observer for Unobserved {}
