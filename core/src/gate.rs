//! The gate: the one place a request meets the policy and the store.
//!
//! Every front end (native gRPC, Envoy, HTTP) turns its input into
//! [`CheckInput`] and calls [`Gate::check`]; none of them decides anything
//! itself. The data flows one way: attributes → plan → one store call →
//! decision.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rust_decimal::Decimal;

use crate::engine::charge::{
    counter_amount, from_counter, to_counter, Basis, LearnedOutput, Usage,
};
use crate::engine::decide::{self, empty_store_outcome, AlertCrossing};
use crate::engine::request::{apply_key, fill_from_client, hash_key, Source};
use crate::engine::window::Millis;
use crate::engine::{Attributes, CounterReport, Decision, Estimate, RequestError};
use crate::policy::{
    Attr, CompiledPolicy, Enforcement, OnExceed, OnOverrun, StoreFailure, Unit, UnknownKeys,
};
use crate::store::{
    Candidate, CounterKind, CounterOp, CounterRef, CounterStore, Grant, Reservation,
    ReserveOutcome, ReserveRequest, SettleOutcome, SpendBounds, SpendDay, StoreError,
};

pub use crate::clock::{Clock, ManualClock, SystemClock};

mod fired;
mod learned;
mod ledger;
mod observe;
mod reserving;
mod scopes;
pub use scopes::{READER_TIMEOUT, SCOPES_PER_READ};
mod unknown_keys;
mod unpriced;

pub use observe::{AlertSink, DecisionReport, Observer, TopUpReport, Unobserved};

use fired::FiredMarkers;
pub use learned::{LearnedRow, MAX_KEYS as MAX_LEARNED_KEYS};
use ledger::{AccountTag, Ledger};
use reserving::{Fate, Reserving};
use unknown_keys::UnknownKeyBucket;
use unpriced::UnpricedSeen;
pub use unpriced::{UnpricedModel, MAX_UNPRICED_MODELS};

/// The append-only log of every approval and revocation.
pub use crate::policy::APPROVALS_LOG;

/// Admin calls are rare and made by people: they may wait longer for the
/// store than a decision may.
const ADMIN_STORE_TIMEOUT: Duration = Duration::from_secs(3);

/// The longest a grant may last.
pub const MAX_GRANT: Duration = Duration::from_secs(366 * 86_400);

#[derive(Debug, Clone)]
pub struct GateConfig {
    /// How long an unsettled reservation lives.
    pub reservation_ttl: Duration,
    /// Bounds every store call, so a dead store never hangs a request.
    pub store_timeout: Duration,
    /// A budget that resets within this long is worth a client's retry
    /// after Retry-After; a longer one is not (see
    /// [`decide::with_retry_hint`]).
    pub retry_within: Duration,
    /// How the spend account is bounded in the store.
    pub spend: SpendBounds,
    /// Keep the spend account at all (on by default; off only to measure
    /// what it costs).
    pub spend_account: bool,
    /// Where the spend account's days are cut.
    pub spend_days: crate::store::DayCalendar,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            reservation_ttl: Duration::from_secs(600),
            store_timeout: Duration::from_millis(50),
            retry_within: Duration::from_secs(decide::DEFAULT_RETRY_WITHIN_SECS),
            spend: SpendBounds::default(),
            spend_account: true,
            spend_days: crate::store::DayCalendar::utc(),
        }
    }
}

/// A request to decide, as every front end hands it over.
#[derive(Debug, Clone, Default)]
pub struct CheckInput {
    /// From the route, a trusted header, or a trusted service: these win
    /// over the key registry.
    pub attributes: Attributes,
    /// Set by the client itself, already limited to the attributes the
    /// policy lets clients set: these only fill what is still empty after
    /// the registry.
    pub client_attributes: Attributes,
    /// Only ever hashed; see [`hash_key`].
    pub api_key: Option<String>,
    pub estimate: Estimate,
    /// The replay key, only from a source the operator trusts: a repeat
    /// within a minute gets the first decision back, uncharged.
    pub request_id: Option<String>,
    /// Whether the caller puts a downgrade into effect (the native API's
    /// services do, and routes whose upstream honours the model header).
    /// When it cannot, a downgrade is refused instead, naming the cheaper
    /// model, so that the expensive call is never charged at the cheap
    /// price.
    pub can_switch_model: bool,
    /// Nothing will settle this call (ext_authz with no ext_proc after
    /// it): the estimate is the charge, the reservation record is kept
    /// only moments, and a rule that needs the call's end (`concurrent`)
    /// is refused.
    pub estimate_is_final: bool,
}

/// What a call really used, reported at settle. Absent fields are zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActualUsage {
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    /// Of `output_tokens`, those spent reasoning, where the API reports
    /// them: counted in the spend account, priced as output.
    pub reasoning_tokens: u64,
    pub images: u64,
    pub image_quality: Option<String>,
    pub video_seconds: Decimal,
    pub audio_seconds: Decimal,
    /// Of `input_tokens`, those written to a prompt cache.
    pub cache_write_tokens: u64,
    /// Of the input and output tokens, the audio ones.
    pub audio_input_tokens: u64,
    pub audio_output_tokens: u64,
    /// Calls with a fee made within the request, by name.
    pub calls: std::collections::BTreeMap<String, u64>,
    /// The call went through a provider's batch API.
    pub batch: bool,
}

impl ActualUsage {
    /// The usage to price, with `default_quality` for images that name
    /// none.
    pub fn usage(&self, default_quality: &str) -> Usage {
        Usage {
            input_tokens: self.input_tokens,
            cached_input_tokens: self.cached_input_tokens,
            output_tokens: self.output_tokens,
            images: self.images,
            image_quality: self
                .image_quality
                .clone()
                .unwrap_or_else(|| default_quality.to_string()),
            video_jobs: 0,
            video_seconds: self.video_seconds,
            audio_seconds: self.audio_seconds,
            detail: crate::engine::charge::Detail {
                cache_write_tokens: self.cache_write_tokens,
                reasoning_tokens: self.reasoning_tokens,
                audio_input_tokens: self.audio_input_tokens,
                audio_output_tokens: self.audio_output_tokens,
                batch: self.batch,
                calls: self.calls.clone(),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reservation {0:?} is unknown, has expired, or was settled over a minute ago; an expired reservation keeps its estimate charged")]
    UnknownReservation(String),
    /// An approval or revocation that cannot be made as asked.
    #[error("{0}")]
    InvalidGrant(String),
    #[error("rule `{rule}` has no active grant for scope {scope}")]
    NoGrant { rule: String, scope: String },
}

impl GateError {
    /// The stable code of a failed decision, as responses, metrics and the
    /// decision log name it.
    pub fn code(&self) -> &'static str {
        match self {
            GateError::Request(r) => r.code(),
            GateError::Store(s) => s.code(),
            GateError::UnknownReservation(_) => "unknown_reservation",
            GateError::InvalidGrant(_) => "invalid_grant",
            GateError::NoGrant { .. } => "no_grant",
        }
    }
}

/// An approval as an admin asks for it.
#[derive(Debug, Clone)]
pub struct GrantRequest {
    pub rule: String,
    /// `team=growth`, several joined by commas, or `all`.
    pub scope: String,
    /// Added to the rule's limit while the grant lasts, in the rule's unit
    /// (USD for spend).
    pub extra: Option<Decimal>,
    pub duration: Duration,
    pub approver: String,
    pub reason: String,
}

#[derive(Debug)]
pub struct Gate {
    policy: ArcSwap<CompiledPolicy>,
    store: Arc<dyn CounterStore>,
    clock: Arc<dyn Clock>,
    config: GateConfig,
    alerts: Option<Arc<dyn AlertSink>>,
    observer: Arc<dyn Observer>,
    unknown_keys: UnknownKeyBucket,
    fired: FiredMarkers,
    ledger: Ledger,
    unpriced: UnpricedSeen,
    learned: learned::Learned,
}

impl Gate {
    pub fn new(
        policy: CompiledPolicy,
        store: Arc<dyn CounterStore>,
        clock: Arc<dyn Clock>,
        config: GateConfig,
    ) -> Gate {
        Gate {
            policy: ArcSwap::from_pointee(policy),
            store,
            clock,
            config,
            alerts: None,
            observer: Arc::new(Unobserved),
            unknown_keys: UnknownKeyBucket::default(),
            fired: FiredMarkers::default(),
            ledger: Ledger::default(),
            unpriced: UnpricedSeen::default(),
            learned: learned::Learned::default(),
        }
    }

    /// Sends the alert crossings of every decision to `sink`.
    pub fn with_alerts(mut self, sink: Arc<dyn AlertSink>) -> Gate {
        self.alerts = Some(sink);
        self
    }

    /// Reports every decision, store call, settle and approval to
    /// `observer` (metrics, tracked scopes, the decision log).
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Gate {
        self.observer = observer;
        self
    }

    pub fn policy(&self) -> Arc<CompiledPolicy> {
        self.policy.load_full()
    }

    /// Swaps in a new policy set; decisions under way finish on the old one.
    pub fn replace_policy(&self, policy: CompiledPolicy) {
        self.policy.store(Arc::new(policy));
    }

    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    /// The models requests named that have no price under the policy in
    /// force now, most requested first, and how many requests named models
    /// past the [`MAX_UNPRICED_MODELS`] kept.
    pub fn unpriced_models(&self) -> (Vec<UnpricedModel>, u64) {
        let policy = self.policy.load();
        let (mut models, overflow) = self.unpriced.list();
        models.retain(|m| policy.price(&m.model).is_none());
        (models, overflow)
    }

    /// Decides a request, reserving its estimate when it is allowed. A
    /// decision takes one snapshot of the policy and one reading of the
    /// clock, and names the version of the policy that made it.
    pub async fn check(&self, input: CheckInput) -> Result<Decision, GateError> {
        self.check_on(self.policy.load_full(), input).await
    }

    /// [`Gate::check`] on a policy snapshot the caller already took, for a
    /// front end that read the request with it (its attribute mapping):
    /// the request is then read and decided on one snapshot.
    pub async fn check_on(
        &self,
        policy: Arc<CompiledPolicy>,
        mut input: CheckInput,
    ) -> Result<Decision, GateError> {
        let now = self.clock.now();
        let started = std::time::Instant::now();
        let abandoned = Abandoned(Some(&*self.observer));
        let mut trace = Trace::default();
        let result = self
            .decide(&policy, now, &mut input, &mut trace)
            .await
            .map(|d| Decision {
                policy_version: policy.version.clone(),
                decided_at: now,
                ..d
            });
        abandoned.defuse();
        self.observer.decided(&DecisionReport {
            policy: &policy,
            now,
            elapsed: started.elapsed(),
            input: &input,
            attributes: trace.attributes.as_ref(),
            plan: trace.plan.as_ref(),
            result: &result,
        });
        result
    }

    async fn decide(
        &self,
        policy: &Arc<CompiledPolicy>,
        now: Millis,
        // Its attributes are moved out into the trace, resolved.
        input: &mut CheckInput,
        trace: &mut Trace,
    ) -> Result<Decision, GateError> {
        let (attributes, unknown_key) = resolve_owned(
            policy,
            std::mem::take(&mut input.attributes),
            input.api_key.as_deref(),
            &input.client_attributes,
            None,
        );
        let attrs = trace.attributes.insert(attributes);
        if let Some(model) = attrs.model.as_deref() {
            if policy.price(model).is_none() {
                self.unpriced.seen(model, now);
            }
        }
        if unknown_key {
            if policy.set.unknown_keys() == UnknownKeys::Deny {
                return Ok(decide::unknown_key());
            }
            self.unknown_keys
                .bound(attrs, policy.set.attributes.max_unknown_keys, now);
        }
        let replay_id = input
            .request_id
            .as_deref()
            .map(|id| replay_id(id, attrs, &input.estimate));
        // A request that names no action is an action of its own: it must
        // never share a retry budget with another by accident. A repeat of
        // the same request gets the same id back.
        let fresh_action = match attrs.action {
            Some(_) => None,
            None if !policy.uses_action() => None,
            None => {
                let id = match &replay_id {
                    Some(r) => format!("act-{}", derived_id("action", r)),
                    None => format!("act-{}", new_reservation_id()),
                };
                attrs.action = Some(id.clone());
                Some(id)
            }
        };
        // What settled calls of this workflow used, where the policy
        // learns it and the request names no maximum.
        let learned = match policy.set.defaults.learn_output {
            Some(learn) if input.estimate.output_tokens.is_none() => self
                .learned
                .for_workflow(attrs.workflow.as_deref().unwrap_or(""), learn),
            _ => LearnedOutput::default(),
        };
        // `plan` checks the attributes and the estimate before anything
        // else, so a malformed request never reaches the store.
        let mut plan = decide::plan_with(policy, attrs, &input.estimate, &learned, now)?;
        if !input.can_switch_model {
            plan.withhold_downgrades();
        }
        if input.estimate_is_final {
            needs_no_settle(policy, &plan)?;
        }
        let plan = trace.plan.insert(plan);
        let retry_within = self.config.retry_within.as_millis() as Millis;
        let with_action = |decision: Decision| Decision {
            action_id: fresh_action.clone(),
            ..decide::with_retry_hint(decision, retry_within)
        };
        if plan.is_free() {
            return Ok(with_action(Decision::allow_unmetered()));
        }
        let account = self
            .config
            .spend_account
            .then(|| self.account_tag(policy, attrs, &input.estimate, &learned, plan, now));
        let request = Arc::new(ReserveRequest {
            now,
            candidates: plan.candidates.clone(),
            reservation_id: new_reservation_id(),
            reservation_ttl: if input.estimate_is_final {
                FINAL_ESTIMATE_TTL
            } else {
                self.config.reservation_ttl.as_millis() as Millis
            },
            request_id: replay_id,
            account: account.as_ref().map(AccountTag::to_text),
            final_estimate: input.estimate_is_final,
        });
        let (result, reserving) = self.reserve(&request).await;
        match result {
            Ok(outcome) => {
                let mut decision = decide::decide(policy, plan, &outcome, now);
                decision.learned_output_tokens =
                    learned.get(policy, decision.model.as_deref().or(attrs.model.as_deref()));
                // A replay repeats a decision whose alerts already went out.
                decision.alerts = match outcome.replayed {
                    true => Vec::new(),
                    false => {
                        self.fire_once(std::mem::take(&mut decision.alerts), now)
                            .await
                    }
                };
                // Only now, past the last await: a caller that went away
                // during the marker call leaves the reservation to be
                // taken back.
                if let Some(r) = reserving {
                    r.resolve(Fate::Kept);
                }
                if let (Some(i), false, Some(account)) =
                    (outcome.applied, outcome.replayed, &account)
                {
                    let model = request.candidates[i].model.as_deref();
                    if let Some(estimate) = account.estimate(model) {
                        let row = ledger::row(policy, &account.owner, model);
                        self.ledger.add(account.day, row, false, *estimate);
                    }
                }
                if let (Some(sink), false) = (&self.alerts, decision.alerts.is_empty()) {
                    sink.send(policy, &decision.alerts, now);
                }
                Ok(with_action(decision))
            }
            Err(e) => {
                let all_fail_open = plan.counters[0]
                    .iter()
                    .all(|c| policy.rules()[c.rule].on_store_error == StoreFailure::FailOpen);
                if all_fail_open {
                    if let Some(r) = reserving {
                        r.resolve(Fate::ChargedAsEstimated);
                    }
                    tracing::warn!(error = %e, "counter store failed; allowing because every matched rule fails open");
                    Ok(with_action(decide::fail_open()))
                } else {
                    // Dropped, `reserving` takes back whatever the late
                    // reserve makes.
                    Err(e.into())
                }
            }
        }
    }

    /// Reserves within the store timeout. On a store that can stall, the
    /// reserve runs to its end whatever happens here, and the returned
    /// handle must be told what became of it; see [`reserving`].
    async fn reserve(
        &self,
        request: &Arc<ReserveRequest>,
    ) -> (Result<ReserveOutcome, StoreError>, Option<Reserving>) {
        // Decided in the process (from a lease): nothing can stall.
        if let Some(outcome) = self.store.reserve_now(request) {
            return (Ok(outcome), None);
        }
        if !self.store.can_stall() {
            return (self.bounded(self.store.reserve(request)).await, None);
        }
        let mut reserving = Reserving::start(
            self.store.clone(),
            self.clock.clone(),
            self.observer.clone(),
            request.clone(),
        );
        let result = self.bounded(reserving.outcome()).await;
        (result, Some(reserving))
    }

    /// The crossings that fire now: each threshold once per counter and
    /// window, across every replica, whatever the counter does in between.
    /// A marker the store cannot set now is asked for again at the next
    /// decision that reaches it, so the alert comes late rather than twice
    /// or never.
    async fn fire_once(&self, crossings: Vec<AlertCrossing>, now: Millis) -> Vec<AlertCrossing> {
        if crossings.is_empty() {
            return crossings;
        }
        let (crossings, markers): (Vec<_>, Vec<_>) =
            self.fired.unknown(crossings, now).into_iter().unzip();
        if markers.is_empty() {
            return Vec::new();
        }
        match self.bounded(self.store.mark_alerts(&markers, now)).await {
            Ok(ours) => {
                self.fired.answered(&markers, now);
                crossings
                    .into_iter()
                    .zip(ours)
                    .filter_map(|(c, ours)| ours.then_some(c))
                    .collect()
            }
            Err(e) => {
                self.fired.unanswered(&markers);
                tracing::warn!(error = %e, "could not set alert markers; the alerts fire at a later decision");
                Vec::new()
            }
        }
    }

    /// The output tokens learned from settled calls, by model and
    /// workflow, with how many keys took the place of another; `None`
    /// when the policy in force does not learn them.
    pub fn learned_outputs(&self) -> Option<(Vec<LearnedRow>, u64)> {
        let learn = self.policy.load().set.defaults.learn_output?;
        Some(self.learned.rows(learn))
    }

    /// The decision a request would get on an empty store; touches nothing.
    pub fn explain(&self, input: CheckInput) -> Result<(decide::Plan, Decision), GateError> {
        self.explain_with(input, None)
    }

    /// [`Gate::explain`], with the learned output tokens of `learned` (as
    /// another process's table lists them) in place of this gate's own.
    pub fn explain_with(
        &self,
        input: CheckInput,
        learned: Option<&[LearnedRow]>,
    ) -> Result<(decide::Plan, Decision), GateError> {
        let policy = self.policy.load_full();
        let now = self.clock.now();
        let attrs = resolve(&policy, &input).attributes;
        let workflow = attrs.workflow.as_deref().unwrap_or("");
        let learned = match (policy.set.defaults.learn_output, learned) {
            (Some(_), _) if input.estimate.output_tokens.is_some() => LearnedOutput::default(),
            (Some(_), Some(rows)) => learned::in_use(rows, workflow),
            (Some(learn), None) => self.learned.for_workflow(workflow, learn),
            (None, _) => LearnedOutput::default(),
        };
        let mut plan = decide::plan_with(&policy, &attrs, &input.estimate, &learned, now)?;
        if !input.can_switch_model {
            plan.withhold_downgrades();
        }
        let mut decision = decide::decide(&policy, &plan, &empty_store_outcome(&plan), now);
        decision.learned_output_tokens = learned.get(
            &policy,
            decision.model.as_deref().or(attrs.model.as_deref()),
        );
        Ok((plan, decision))
    }

    /// Replaces a reservation's estimate with the actual usage.
    pub async fn settle(
        &self,
        reservation_id: &str,
        actual: &ActualUsage,
    ) -> Result<SettleOutcome, GateError> {
        self.settle_on(&self.policy.load_full(), reservation_id, actual, None)
            .await
    }

    /// [`Gate::settle`] on the policy snapshot that made the decision (a
    /// reload in between must not reprice the call), pricing `served`,
    /// the model the response says ran, when it is known: a downgrade the
    /// upstream did not honour is charged as what it really was.
    pub async fn settle_on(
        &self,
        policy: &CompiledPolicy,
        reservation_id: &str,
        actual: &ActualUsage,
        served: Option<&str>,
    ) -> Result<SettleOutcome, GateError> {
        let mut charged = None;
        let (outcome, reservation) = self
            .settle_with(reservation_id, |reservation| {
                let (amounts, usage, model) =
                    self.amounts_used(policy, reservation_id, reservation, actual, served);
                charged = Some((usage, model.map(str::to_string)));
                amounts
            })
            .await?;
        let tag = reservation
            .account
            .as_deref()
            .and_then(AccountTag::from_text);
        if let (SettleOutcome::Settled, Some(tag), Some((usage, model))) = (outcome, tag, charged) {
            let decided = reservation.model.as_deref();
            if let Some(estimate) = tag.estimate(decided) {
                let row = ledger::row(policy, &tag.owner, decided);
                self.ledger.add(tag.day, row, false, estimate.negated());
            }
            let model = model.as_deref();
            // Usage that cannot be priced kept the estimate on the
            // counters; the account books it too.
            let used = ledger::entry(policy, model, &usage, actual.reasoning_tokens)
                .or_else(|| tag.estimate(decided).copied())
                .unwrap_or_default();
            let row = ledger::row(policy, &tag.owner, model);
            self.observer.spent(&row.0[0], &row.0[2], &used);
            self.ledger.add(tag.day, row, true, used);
            if let (Some(_), Some(model)) = (policy.set.defaults.learn_output, model) {
                // The owner's workflow, as the check resolved it.
                self.learned
                    .add(model, &tag.owner.0[4], actual.output_tokens);
            }
        }
        Ok(outcome)
    }

    /// The spend-account tag of a request: its owner, and its estimate at
    /// each model it may run as.
    fn account_tag(
        &self,
        policy: &CompiledPolicy,
        attrs: &Attributes,
        estimate: &Estimate,
        learned: &LearnedOutput,
        plan: &decide::Plan,
        now: Millis,
    ) -> AccountTag {
        let estimates = plan
            .candidates
            .iter()
            .map(|c| {
                let model = c.model.as_deref();
                let price = model.and_then(|m| policy.price(m));
                let usage = Usage::from_estimate(
                    estimate,
                    &Basis {
                        model,
                        modality: attrs.modality.as_deref(),
                        price,
                        defaults: &policy.set.defaults,
                        learned_output: learned.get(policy, model),
                    },
                );
                let entry = ledger::entry(policy, model, &usage, 0).unwrap_or_default();
                (crate::store::spend::clean(model.unwrap_or_default()), entry)
            })
            .collect();
        AccountTag {
            day: self.config.spend_days.day(now),
            owner: ledger::owner(attrs),
            estimates,
        }
    }

    /// Writes what the spend account gathered since the last flush: one
    /// store call a day in it, each batch once even when an answer is lost
    /// (it goes again under the same id). Called every second by the
    /// server, and at shutdown; what a crash can lose is what gathered
    /// since the last flush.
    pub async fn flush_spend(&self) -> Result<(), GateError> {
        // A batch that failed goes first; then what gathered since.
        for _ in 0..2 {
            let Some((id, deltas)) = self.ledger.next_batch() else {
                return Ok(());
            };
            let now = self.clock.now();
            // Not a decision's store call: kept out of the store metrics.
            let call = self
                .store
                .record_spend(&id, &deltas, self.config.spend, now);
            let sent = match tokio::time::timeout(ADMIN_STORE_TIMEOUT, call).await {
                Ok(sent) => sent,
                Err(_) => Err(StoreError::Timeout(ADMIN_STORE_TIMEOUT.as_millis() as u64)),
            };
            if let Err(e) = sent {
                self.ledger.unsent((id, deltas));
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Where the spend account's days are cut.
    pub fn spend_days(&self) -> &crate::store::DayCalendar {
        &self.config.spend_days
    }

    /// The spend account from day `from` to day `to`, both included.
    pub async fn spend(
        &self,
        from: crate::store::spend::Day,
        to: crate::store::spend::Day,
    ) -> Result<Vec<SpendDay>, GateError> {
        Ok(self.admin(self.store.spend(from, to)).await?)
    }

    /// What each op of `reservation` comes to at the usage `actual`.
    fn amounts_used<'a>(
        &self,
        policy: &CompiledPolicy,
        reservation_id: &str,
        reservation: &'a Reservation,
        actual: &ActualUsage,
        served: Option<&'a str>,
    ) -> (Vec<i64>, Usage, Option<&'a str>) {
        let usage = actual.usage(&policy.set.defaults.image_quality);
        let decided = reservation.model.as_deref();
        let model = match (served, decided) {
            (Some(served), Some(decided))
                if !crate::policy::same_model(decided, served)
                    && policy.price(served).is_some() =>
            {
                tracing::warn!(reservation = reservation_id, decided, served, "the upstream served another model than the one decided; charging the one served");
                self.observer.served_other_model();
                Some(served)
            }
            _ => decided,
        };
        let price = model.and_then(|m| policy.price(m));
        let amounts = reservation
            .ops
            .iter()
            .map(|op| match op.unit {
                // An attempt, a started job and a held slot are what they
                // were at check time; only metered usage is trued up.
                Unit::Requests | Unit::VideoJobs | Unit::Concurrent => op.amount,
                unit => counter_amount(unit, &usage, price, model).unwrap_or_else(|e| {
                    tracing::warn!(reservation = reservation_id, error = %e, "cannot price actual usage; keeping the estimate");
                    op.amount
                }),
            })
            .collect();
        (amounts, usage, model)
    }

    /// Settles a reservation at the amounts `amounts` works out from it:
    /// the one path every settle, release and keep takes to the store.
    async fn settle_with(
        &self,
        reservation_id: &str,
        amounts: impl FnOnce(&Reservation) -> Vec<i64>,
    ) -> Result<(SettleOutcome, Reservation), GateError> {
        let now = self.clock.now();
        let unknown = || GateError::UnknownReservation(reservation_id.to_string());
        let reservation = self
            .bounded(self.store.reservation(reservation_id, now))
            .await?
            .ok_or_else(unknown)?;
        let amounts = amounts(&reservation);
        match self
            .bounded(self.store.settle(reservation_id, &amounts, now))
            .await?
        {
            SettleOutcome::Unknown => Err(unknown()),
            outcome => {
                if outcome == SettleOutcome::Settled {
                    self.observer.settled(reservation.expires_at);
                }
                Ok((outcome, reservation))
            }
        }
    }

    /// Reserves `output_tokens` more output for a call already decided
    /// (`decided`, on `input` and `policy`), while its response streams
    /// past what its reservation covered: a reservation of its own, on the
    /// counters the call's usage counts against (tokens, output tokens,
    /// spend), never its attempt, its job or its slot, which the first
    /// reservation holds. The model is the one decided (the downgrade
    /// model on a downgrade), and no downgrade is tried: the call is
    /// under way. Give it back with [`Gate::release`] when the call ends,
    /// once the first reservation is settled at what the call used.
    pub async fn top_up(
        &self,
        policy: &CompiledPolicy,
        input: &CheckInput,
        decided: &Decision,
        output_tokens: u64,
    ) -> Result<TopUp, GateError> {
        let now = self.clock.now();
        let attrs = decided_attributes(policy, input, decided);
        let mut asked = (Vec::new(), Vec::new());
        let result = self
            .top_up_at(policy, input, &attrs, output_tokens, now, &mut asked)
            .await;
        // A top-up with nothing to reserve is not an event: the call's
        // output is counted by no rule.
        if !matches!(result, Ok(TopUp::Unmetered)) {
            self.observer.topped_up(&TopUpReport {
                policy,
                now,
                input,
                attributes: &attrs,
                output_tokens,
                ops: &asked.0,
                counters: &asked.1,
                result: &result,
            });
        }
        result
    }

    /// [`Gate::top_up`] itself; `asked` gets the ops it reserved or tried,
    /// with their counters, for the report.
    async fn top_up_at(
        &self,
        policy: &CompiledPolicy,
        input: &CheckInput,
        attrs: &Attributes,
        output_tokens: u64,
        now: Millis,
        asked: &mut (Vec<CounterOp>, Vec<decide::RuleCounter>),
    ) -> Result<TopUp, GateError> {
        let estimate = Estimate {
            input_tokens: Some(0),
            cached_input_tokens: Some(0),
            output_tokens: Some(output_tokens),
            images: Some(0),
            image_quality: input.estimate.image_quality.clone(),
            video_seconds: Some(Decimal::ZERO),
            audio_seconds: Some(Decimal::ZERO),
            detail: crate::engine::charge::Detail {
                batch: input.estimate.detail.batch,
                ..Default::default()
            },
            prompt: None,
        };
        let mut plan = decide::plan(policy, attrs, &estimate, now)?;
        plan.withhold_downgrades();
        let (Some(candidate), Some(counters)) = (plan.candidates.pop(), plan.counters.pop()) else {
            return Ok(TopUp::Unmetered);
        };
        let model = candidate.model.clone();
        let price = model.as_deref().and_then(|m| policy.price(m));
        // A price per request is charged by the first reservation only.
        let per_call = Usage {
            image_quality: policy.set.defaults.image_quality.clone(),
            ..Usage::default()
        };
        let (ops, counters): (Vec<_>, Vec<_>) = candidate
            .ops
            .into_iter()
            .zip(counters)
            .filter(|(op, _)| {
                !matches!(op.unit, Unit::Requests | Unit::Concurrent | Unit::VideoJobs)
            })
            .map(|(mut op, counter)| {
                if op.unit == Unit::Spend {
                    let base = counter_amount(Unit::Spend, &per_call, price, model.as_deref())
                        .unwrap_or(0);
                    op.amount = op.amount.saturating_sub(base);
                }
                op.downgradable = false;
                (op, counter)
            })
            .filter(|(op, _)| op.amount > 0)
            .unzip();
        if ops.is_empty() {
            return Ok(TopUp::Unmetered);
        }
        asked.0.clone_from(&ops);
        asked.1 = counters;
        let counters = &asked.1;
        let request = Arc::new(ReserveRequest {
            now,
            candidates: vec![Candidate { model, ops }],
            reservation_id: new_reservation_id(),
            reservation_ttl: self.config.reservation_ttl.as_millis() as Millis,
            request_id: None,
            account: None,
            final_estimate: false,
        });
        let (result, reserving) = self.reserve(&request).await;
        let outcome = result?;
        if let Some(r) = reserving {
            r.resolve(Fate::Kept);
        }
        if outcome.applied.is_some() {
            return Ok(TopUp::Reserved(
                outcome
                    .reservation_id
                    .unwrap_or_else(|| request.reservation_id.clone()),
            ));
        }
        let ops = &request.candidates[0].ops;
        let states = outcome.tried.last();
        let mut blocking: Vec<usize> = ops
            .iter()
            .zip(counters)
            .enumerate()
            .filter(|(i, (op, _))| {
                states
                    .and_then(|s| s.get(*i))
                    .is_some_and(|state| op.blocks_at(state))
            })
            .map(|(_, (_, c))| c.rule)
            .collect();
        // A store that does not say which counter blocked: every rule of
        // the top-up speaks.
        if blocking.is_empty() {
            blocking = counters.iter().map(|c| c.rule).collect();
        }
        blocking.dedup();
        let rules: Vec<&crate::policy::Rule> =
            blocking.iter().map(|&i| &policy.rules()[i]).collect();
        Ok(TopUp::NoRoom {
            cut: rules.iter().any(|r| r.on_overrun == OnOverrun::Cut),
            rules: rules.iter().map(|r| r.id.clone()).collect(),
        })
    }

    /// Gives a reservation back whole: every counter it added to is
    /// settled at zero. For a [`Gate::top_up`] once its call has ended:
    /// the call's first reservation carries what it really used.
    pub async fn release(&self, reservation_id: &str) -> Result<SettleOutcome, GateError> {
        self.close(reservation_id, false).await
    }

    /// Ends a call at its estimate: every counter keeps what was reserved,
    /// and its concurrency slots are given back. For a call that must be
    /// charged as if it had run, whatever it reported.
    pub async fn keep_estimate(&self, reservation_id: &str) -> Result<SettleOutcome, GateError> {
        self.close(reservation_id, true).await
    }

    async fn close(&self, reservation_id: &str, keep: bool) -> Result<SettleOutcome, GateError> {
        self.settle_with(reservation_id, |reservation| {
            reservation
                .ops
                .iter()
                .map(|op| if keep { op.amount } else { 0 })
                .collect()
        })
        .await
        .map(|(outcome, _)| outcome)
    }

    /// The counters that apply to these attributes, read without charging.
    pub async fn usage(
        &self,
        attributes: Attributes,
        api_key: Option<&str>,
    ) -> Result<Vec<CounterReport>, GateError> {
        let policy = self.policy.load_full();
        let now = self.clock.now();
        let input = CheckInput {
            attributes,
            api_key: api_key.map(str::to_string),
            ..Default::default()
        };
        let attrs = resolve(&policy, &input).attributes;
        let counters = decide::scope_counters(&policy, &attrs, now)?;
        self.report(&policy, &counters, now).await
    }

    /// Reads `counters` from the store and reports each against its limit.
    async fn report(
        &self,
        policy: &CompiledPolicy,
        counters: &[decide::RuleCounter],
        now: Millis,
    ) -> Result<Vec<CounterReport>, GateError> {
        self.report_within(policy, counters, now, self.config.store_timeout)
            .await
    }

    /// [`Gate::report`] with each store call bounded by `limit`.
    async fn report_within(
        &self,
        policy: &CompiledPolicy,
        counters: &[decide::RuleCounter],
        now: Millis,
        limit: Duration,
    ) -> Result<Vec<CounterReport>, GateError> {
        let refs: Vec<CounterRef> = counters
            .iter()
            .map(|c| CounterRef {
                key: c.key.clone(),
                kind: decide::counter_kind(&policy.rules()[c.rule].limit),
            })
            .collect();
        let states = self.bounded_by(limit, self.store.read(&refs, now)).await?;
        // An approved extension raises what a scope may use.
        let takes_approvals = |c: &decide::RuleCounter| {
            let rule = &policy.rules()[c.rule];
            rule.enforcement == Enforcement::Approval || rule.on_exceed == OnExceed::Approval
        };
        let grants = if counters.iter().any(takes_approvals) {
            self.bounded_by(limit, self.store.grants(now)).await?
        } else {
            Vec::new()
        };
        Ok(counters
            .iter()
            .zip(states)
            .map(|(c, s)| {
                let rule = &policy.rules()[c.rule];
                let unit = rule.limit.unit;
                let key = decide::grant_key(&rule.id, &c.scope_hash);
                let extra = grants
                    .iter()
                    .find(|g| g.key == key)
                    .map_or(0, |g| g.extra.max(0));
                let limit = c.limit.saturating_add(extra);
                CounterReport {
                    rule: rule.id.clone(),
                    scope: c.scope.clone(),
                    unit,
                    window: rule.limit.window,
                    limit: from_counter(limit, unit),
                    used: from_counter(s.used_before, unit),
                    leased: from_counter(s.leased, unit),
                    remaining: from_counter((limit - s.used_before - s.leased).max(0), unit),
                    resets_at: c.window_end.or(s.resets_at),
                    enforced: rule.enforcement != Enforcement::Soft,
                }
            })
            .collect())
    }

    /// Records a grant for a rule and scope, audited; replaces an earlier
    /// grant for the same pair.
    pub async fn approve(&self, req: GrantRequest) -> Result<Grant, GateError> {
        let policy = self.policy.load_full();
        let now = self.clock.now();
        let invalid = |m: String| GateError::InvalidGrant(m);
        let rule = policy
            .rule(&req.rule)
            .ok_or_else(|| invalid(format!("no rule `{}` in the policy in force", req.rule)))?;
        let gate = rule.enforcement == Enforcement::Approval;
        if !gate && rule.on_exceed != OnExceed::Approval {
            return Err(invalid(format!(
                "rule `{}` takes no approvals: it is neither `enforcement: approval` nor `on_exceed: approval`",
                rule.id
            )));
        }
        let extra = match req.extra {
            Some(d) if d.is_sign_negative() && !d.is_zero() => {
                return Err(invalid("the extra amount must not be negative".to_string()))
            }
            Some(d) => to_counter(d, rule.limit.unit.scale(), rule.limit.unit)?,
            None => 0,
        };
        if !gate && extra == 0 {
            return Err(invalid(format!(
                "rule `{}` is a cap that asks for approval once reached; an approval must add an extra amount ({})",
                rule.id, rule.limit.unit
            )));
        }
        if req.duration.is_zero() || req.duration > MAX_GRANT {
            return Err(invalid(
                "a grant lasts from 1 second to 366 days".to_string(),
            ));
        }
        for (what, value) in [("approver", &req.approver), ("reason", &req.reason)] {
            if value.trim().is_empty() || value.len() > 1024 {
                return Err(invalid(format!(
                    "the {what} must be given (at most 1024 bytes): approvals are audited"
                )));
            }
        }
        let (scope, scope_hash) = decide::grant_scope(&policy, rule, &req.scope)?;
        let grant = Grant {
            rule: rule.id.clone(),
            scope,
            key: decide::grant_key(&rule.id, &scope_hash),
            unit: rule.limit.unit,
            extra,
            expires_at: now.saturating_add(req.duration.as_millis() as Millis),
            approver: req.approver.trim().to_string(),
            reason: req.reason.trim().to_string(),
            created_at: now,
        };
        // The trail first: nothing may be in force that it does not show.
        // A grant that then fails to be stored gets a second entry saying so.
        self.audit("approve", &grant, &grant.approver, &grant.reason, now)
            .await?;
        if let Err(e) = self.admin(self.store.put_grant(&grant, now)).await {
            let _ = self
                .audit(
                    "approve-failed",
                    &grant,
                    &grant.approver,
                    &e.to_string(),
                    now,
                )
                .await;
            return Err(e.into());
        }
        Ok(grant)
    }

    /// Ends a grant before its time, audited.
    pub async fn revoke(
        &self,
        rule_id: &str,
        scope: &str,
        by: &str,
        reason: &str,
    ) -> Result<Grant, GateError> {
        let policy = self.policy.load_full();
        let now = self.clock.now();
        if by.trim().is_empty() {
            return Err(GateError::InvalidGrant(
                "say who revokes: revocations are audited".to_string(),
            ));
        }
        let rule = policy.rule(rule_id).ok_or_else(|| {
            GateError::InvalidGrant(format!("no rule `{rule_id}` in the policy in force"))
        })?;
        let (scope, scope_hash) = decide::grant_scope(&policy, rule, scope)?;
        let key = decide::grant_key(&rule.id, &scope_hash);
        let no_grant = || GateError::NoGrant {
            rule: rule.id.clone(),
            scope: scope.clone(),
        };
        let current = self
            .admin(self.store.grants(now))
            .await?
            .into_iter()
            .find(|g| g.key == key)
            .ok_or_else(no_grant)?;
        // As for approvals, the trail first; then the grant goes.
        self.audit("revoke", &current, by.trim(), reason.trim(), now)
            .await?;
        self.admin(self.store.remove_grant(&key, now))
            .await?
            .ok_or_else(no_grant)
    }

    /// Every active grant.
    pub async fn approvals(&self) -> Result<Vec<Grant>, GateError> {
        let now = self.clock.now();
        Ok(self.admin(self.store.grants(now)).await?)
    }

    /// The last `limit` entries of the approvals audit trail (JSON).
    pub async fn approvals_log(&self, limit: usize) -> Result<Vec<String>, GateError> {
        Ok(self.admin(self.store.entries(APPROVALS_LOG, limit)).await?)
    }

    async fn audit(
        &self,
        action: &str,
        grant: &Grant,
        by: &str,
        reason: &str,
        now: Millis,
    ) -> Result<(), GateError> {
        let entry = serde_json::json!({
            "action": action,
            "at": crate::engine::window::format_utc(now),
            "by": by,
            "reason": reason,
            "grant": grant_view(grant),
        })
        .to_string();
        tracing::info!(target: "tollgate::audit", action, rule = %grant.rule, scope = %grant.scope, by, reason, "approval {action}");
        self.admin(self.store.append(APPROVALS_LOG, &entry)).await?;
        self.observer.approval(action);
        Ok(())
    }

    async fn admin<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.bounded_by(ADMIN_STORE_TIMEOUT, call).await
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.bounded_by(self.config.store_timeout, call).await
    }

    async fn bounded_by<T>(
        &self,
        limit: Duration,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(limit, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout(limit.as_millis() as u64)),
        };
        self.observer
            .store_call(started.elapsed(), result.as_ref().err());
        result
    }
}

/// What a [`Gate::top_up`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopUp {
    /// Reserved under this id; give it back with [`Gate::release`] when
    /// the call ends.
    Reserved(String),
    /// No rule counts the call's output: nothing to top up, ever.
    Unmetered,
    /// No room under `rules` (the rules whose counters blocked). `cut`:
    /// one of them says `on_overrun: cut`.
    NoRoom { cut: bool, rules: Vec<String> },
}

/// The output tokens a call's first reservation covered: its estimate's,
/// or else the default for the model decided (or the policy's), as the
/// plan counted them.
pub fn reserved_output_tokens(
    policy: &CompiledPolicy,
    input: &CheckInput,
    decided: &Decision,
) -> u64 {
    let attrs = decided_attributes(policy, input, decided);
    let price = attrs.model.as_deref().and_then(|m| policy.price(m));
    // Output alone: the prompt need not be counted again.
    Basis {
        model: attrs.model.as_deref(),
        modality: attrs.modality.as_deref(),
        price,
        defaults: &policy.set.defaults,
        learned_output: decided.learned_output_tokens,
    }
    .output_tokens(&input.estimate)
}

/// The attributes a decided call ran with: resolved as the decision
/// resolved them, with the action id the decision made up, and the model
/// it switched to on a downgrade.
fn decided_attributes(
    policy: &CompiledPolicy,
    input: &CheckInput,
    decided: &Decision,
) -> Attributes {
    let (mut attrs, _) = resolve_owned(
        policy,
        input.attributes.clone(),
        input.api_key.as_deref(),
        &input.client_attributes,
        None,
    );
    if attrs.action.is_none() {
        attrs.action.clone_from(&decided.action_id);
    }
    if decided.verdict == crate::engine::Verdict::Downgrade {
        if let Some(model) = &decided.model {
            attrs.model = Some(model.clone());
        }
    }
    attrs
}

/// How long the reservation of a call nothing will settle is kept: long
/// enough to recognise a replay of the same request, no longer.
const FINAL_ESTIMATE_TTL: Millis = 5_000;

/// Refuses a call that nothing will settle under a rule that counts what
/// is in flight: its slot would be held until the reservation lapsed.
fn needs_no_settle(policy: &CompiledPolicy, plan: &decide::Plan) -> Result<(), RequestError> {
    let held = plan
        .candidates
        .iter()
        .zip(&plan.counters)
        .flat_map(|(c, counters)| c.ops.iter().zip(counters))
        .find(|(op, _)| op.kind == CounterKind::Gauge);
    match held {
        None => Ok(()),
        Some((_, counter)) => Err(RequestError::invalid(format!(
            "rule `{}` limits calls in flight, which needs each call settled when it ends; \
             this route says nothing settles its calls (`settle: never`): put Envoy ext_proc \
             in front of it, or settle through the native API",
            policy.rules()[counter.rule].id
        ))),
    }
}

/// What a decision was made from, kept for its report.
#[derive(Default)]
struct Trace {
    attributes: Option<Attributes>,
    plan: Option<decide::Plan>,
}

/// Reports a decision whose future was dropped before it finished (a
/// cancelled gRPC call, a closed connection), so that it is counted
/// rather than lost.
struct Abandoned<'a>(Option<&'a dyn Observer>);

impl Abandoned<'_> {
    fn defuse(mut self) {
        self.0 = None;
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some(observer) = self.0 {
            observer.cancelled();
        }
    }
}

/// The request's attributes by precedence: the route's, then the key
/// registry's, then the client's own; each attribute with its source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    pub attributes: Attributes,
    pub sources: Vec<(Attr, Source)>,
    /// A key was given that the registry does not know.
    pub unknown_key: bool,
}

/// Hashes the raw key (if any), applies the key registry, then fills what
/// is still empty from the client's attributes.
pub fn resolve(policy: &CompiledPolicy, input: &CheckInput) -> Resolved {
    let mut sources = Vec::new();
    let (attributes, unknown_key) = resolve_owned(
        policy,
        input.attributes.clone(),
        input.api_key.as_deref(),
        &input.client_attributes,
        Some(&mut sources),
    );
    Resolved {
        attributes,
        sources,
        unknown_key,
    }
}

/// The work of [`resolve`], on attributes the caller gives up, and noting
/// sources only when asked: the decision path needs neither the copy nor
/// the list. Returns the attributes and whether the key is unregistered.
fn resolve_owned(
    policy: &CompiledPolicy,
    mut attrs: Attributes,
    api_key: Option<&str>,
    client: &Attributes,
    mut sources: Option<&mut Vec<(Attr, Source)>>,
) -> (Attributes, bool) {
    if let Some(list) = sources.as_deref_mut() {
        list.extend(
            Attr::WELL_KNOWN
                .iter()
                .cloned()
                .chain(attrs.labels.keys().map(|l| Attr::Label(l.clone())))
                .filter(|a| *a != Attr::ModelFamily && attrs.get(a).is_some())
                .map(|a| (a, Source::Route)),
        );
    }
    let mut unknown_key = false;
    if let Some(raw) = api_key.filter(|k| !k.trim().is_empty()) {
        let filled = apply_key(policy, &mut attrs, &hash_key(raw));
        unknown_key = filled.is_none();
        if let Some(list) = sources.as_deref_mut() {
            list.retain(|(a, _)| *a != Attr::Key);
            match filled {
                Some(filled) => {
                    list.push((Attr::Key, Source::Registry));
                    list.extend(filled.into_iter().map(|a| (a, Source::Registry)));
                }
                None => list.push((Attr::Key, Source::Client)),
            }
        }
    }
    let filled = fill_from_client(&mut attrs, client);
    if let Some(list) = sources {
        list.extend(filled.into_iter().map(|a| (a, Source::Client)));
    }
    (attrs, unknown_key)
}

/// The extra of a grant in its rule's own unit (USD for spend), exactly.
pub fn grant_extra_text(g: &Grant) -> String {
    from_counter(g.extra, g.unit).normalize().to_string()
}

/// A grant as people and the admin API see it: amounts in the rule's unit
/// and times in RFC 3339, the same in answers and in the audit trail.
pub fn grant_view(g: &Grant) -> serde_json::Value {
    use crate::engine::window::format_utc;
    serde_json::json!({
        "rule": g.rule,
        "scope": g.scope,
        "extra": grant_extra_text(g),
        "unit": g.unit.name(),
        "expires_at": format_utc(g.expires_at),
        "approver": g.approver,
        "reason": g.reason,
        "created_at": format_utc(g.created_at),
    })
}

/// What a caller's request id is remembered under: the id bound to what
/// the request asks (its resolved attributes, the key only as its registry
/// id or hash, and its estimate). A reused id on a different request (a
/// client that repeats one `x-request-id`, or another caller's id) is
/// decided afresh instead of getting the first request's decision and
/// reservation.
fn replay_id(request_id: &str, attrs: &Attributes, estimate: &Estimate) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut field = |name: &[&str], value: &[u8]| {
        for part in name {
            h.update(part.as_bytes());
        }
        // The value's length first: no value, whatever bytes it holds,
        // reads as the end of one field and the start of another.
        h.update([0]);
        h.update((value.len() as u64).to_le_bytes());
        h.update(value);
    };
    field(&["request_id"], request_id.as_bytes());
    for attr in crate::policy::Attr::WELL_KNOWN.iter() {
        if let Some(v) = attrs
            .get(attr)
            .filter(|_| *attr != crate::policy::Attr::ModelFamily)
        {
            field(&[attr.name()], v.as_bytes());
        }
    }
    for (k, v) in &attrs.labels {
        field(&["labels.", k], v.as_bytes());
    }
    estimate_fields(estimate, &mut |name, value| {
        field(&["estimate.", name], value)
    });
    crate::policy::hex(&h.finalize()[..16])
}

/// Each field of an estimate that is set, by name, with its value's bytes:
/// what a replay of the same request must repeat. Every field is named
/// here, so that one added to [`Estimate`] cannot be left out unseen.
fn estimate_fields(estimate: &Estimate, field: &mut dyn FnMut(&str, &[u8])) {
    let Estimate {
        input_tokens,
        cached_input_tokens,
        output_tokens,
        images,
        image_quality,
        video_seconds,
        audio_seconds,
        detail,
        prompt,
    } = estimate;
    let crate::engine::charge::Detail {
        cache_write_tokens,
        reasoning_tokens,
        audio_input_tokens,
        audio_output_tokens,
        batch,
        calls,
    } = detail;
    for (name, n) in [
        ("input_tokens", input_tokens),
        ("cached_input_tokens", cached_input_tokens),
        ("output_tokens", output_tokens),
        ("images", images),
    ] {
        if let Some(n) = n {
            field(name, &u64::to_le_bytes(*n));
        }
    }
    for (name, n) in [
        ("cache_write_tokens", cache_write_tokens),
        ("reasoning_tokens", reasoning_tokens),
        ("audio_input_tokens", audio_input_tokens),
        ("audio_output_tokens", audio_output_tokens),
    ] {
        if *n != 0 {
            field(name, &u64::to_le_bytes(*n));
        }
    }
    if *batch {
        field("batch", &u64::to_le_bytes(1));
    }
    if let Some(q) = image_quality {
        field("image_quality", q.as_bytes());
    }
    for (name, seconds) in [
        ("video_seconds", video_seconds),
        ("audio_seconds", audio_seconds),
    ] {
        if let Some(s) = seconds {
            // Normalized, so that 1.50 and 1.5 are the same estimate.
            field(name, s.normalize().to_string().as_bytes());
        }
    }
    for (name, n) in calls {
        field("calls", name.as_bytes());
        field("calls.n", &u64::to_le_bytes(*n));
    }
    if let Some(p) = prompt {
        // Its size, never its text: the estimate's other fields already
        // say what it is expected to cost.
        field("prompt.bytes", &u64::to_le_bytes(p.bytes() as u64));
        field("prompt.messages", &u64::to_le_bytes(p.messages()));
    }
}

/// An id derived from another, for what must be the same on a replay.
fn derived_id(purpose: &str, from: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(purpose.as_bytes())
        .chain_update([0])
        .chain_update(from.as_bytes())
        .finalize();
    crate::policy::hex(&digest[..16])
}

/// A reservation id nobody can guess (and so settle for someone else):
/// the SHA-256 of a per-process random secret and a counter, cut to 128
/// bits. One OS random read per process instead of one per decision.
fn new_reservation_id() -> String {
    use sha2::{Digest, Sha256};
    use std::sync::OnceLock;
    static SECRET: OnceLock<[u8; 32]> = OnceLock::new();
    static COUNTER: AtomicI64 = AtomicI64::new(0);
    let secret = SECRET.get_or_init(|| {
        let mut bytes = [0u8; 32];
        if getrandom::fill(&mut bytes).is_err() {
            // Without an OS random source, fall back to what differs per
            // process and moment; weaker, but never a reason to stop.
            bytes[..8].copy_from_slice(&SystemClock.now().to_le_bytes());
            bytes[8..12].copy_from_slice(&std::process::id().to_le_bytes());
        }
        bytes
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let digest = Sha256::new()
        .chain_update(secret)
        .chain_update(n.to_le_bytes())
        .finalize();
    crate::policy::hex(&digest[..16])
}

#[cfg(test)]
mod replay_id_tests {
    use super::*;

    fn estimate() -> Estimate {
        let mut e = Estimate {
            input_tokens: Some(120),
            cached_input_tokens: Some(20),
            output_tokens: Some(900),
            images: Some(2),
            image_quality: Some("hd".into()),
            video_seconds: Some(rust_decimal::Decimal::new(15, 1)),
            audio_seconds: Some(rust_decimal::Decimal::new(3, 0)),
            prompt: Some(crate::engine::tokens::Prompt::new(
                vec!["hello".into()],
                vec!["user".into()],
                1,
            )),
            ..Estimate::default()
        };
        e.detail.cache_write_tokens = 5;
        e.detail.reasoning_tokens = 6;
        e.detail.audio_input_tokens = 7;
        e.detail.audio_output_tokens = 8;
        e.detail.batch = true;
        e.detail.calls.insert("web_search".into(), 2);
        e
    }

    fn attrs() -> Attributes {
        let mut attrs = Attributes {
            key: Some("sha256:abc".into()),
            team: Some("growth".into()),
            model: Some("gpt-4o".into()),
            ..Attributes::default()
        };
        attrs.labels.insert("tier".into(), "gold\u{e9}".into());
        attrs
    }

    /// Ids must not change across an upgrade, or a repeat that straddles
    /// one would be charged twice. The expected id is SHA-256 over each
    /// field as `name NUL length(u64 LE) value`, numbers as u64 LE,
    /// computed apart from this code.
    #[test]
    fn the_replay_id_of_a_request_stays_what_it_was() {
        assert_eq!(
            replay_id("req-1", &attrs(), &estimate()),
            "cbab0f4fac8326eb9d73785ad7b0cde1"
        );
    }

    #[test]
    fn every_field_of_the_estimate_changes_the_replay_id() {
        let base = estimate();
        let id = |e: &Estimate| replay_id("req-1", &attrs(), e);
        let mut variants: Vec<Estimate> = Vec::new();
        let mut vary = |f: &dyn Fn(&mut Estimate)| {
            let mut e = base.clone();
            f(&mut e);
            variants.push(e);
        };
        vary(&|e| e.input_tokens = Some(121));
        vary(&|e| e.input_tokens = None);
        vary(&|e| e.cached_input_tokens = Some(21));
        vary(&|e| e.output_tokens = Some(901));
        vary(&|e| e.images = Some(3));
        vary(&|e| e.image_quality = Some("standard".into()));
        vary(&|e| e.video_seconds = Some(rust_decimal::Decimal::new(16, 1)));
        vary(&|e| e.audio_seconds = None);
        vary(&|e| e.detail.cache_write_tokens = 0);
        vary(&|e| e.detail.reasoning_tokens = 60);
        vary(&|e| e.detail.audio_input_tokens = 70);
        vary(&|e| e.detail.audio_output_tokens = 80);
        vary(&|e| e.detail.batch = false);
        vary(&|e| {
            e.detail.calls.insert("web_search".into(), 3);
        });
        vary(&|e| {
            e.detail.calls.insert("code_exec".into(), 1);
        });
        vary(&|e| e.prompt = None);
        vary(&|e| {
            e.prompt = Some(crate::engine::tokens::Prompt::new(
                vec!["hello!".into()],
                vec!["user".into()],
                1,
            ))
        });
        let mut seen = std::collections::HashSet::new();
        assert!(seen.insert(id(&base)));
        for (i, v) in variants.iter().enumerate() {
            assert!(
                seen.insert(id(v)),
                "variant {i} has the base's id or another's"
            );
        }
        // The same estimate, written with other trailing zeros, is a repeat.
        let mut same = base.clone();
        same.video_seconds = Some(rust_decimal::Decimal::new(150, 2));
        assert_eq!(id(&same), id(&base));
    }

    #[test]
    fn a_value_cannot_pass_for_the_end_of_its_field() {
        let mut a = attrs();
        let mut b = attrs();
        a.labels.insert("x".into(), "1".into());
        a.labels.insert("y".into(), "2".into());
        b.labels.insert("x".into(), "1\u{0}labels.y\u{0}2".into());
        let e = Estimate::default();
        assert_ne!(replay_id("r", &a, &e), replay_id("r", &b, &e));
        assert_ne!(
            replay_id("r", &attrs(), &e),
            replay_id("r\u{0}", &attrs(), &e)
        );
    }
}
