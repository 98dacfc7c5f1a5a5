//! The native gRPC API: `tollgate.v1.Tollgate`.

use std::sync::Arc;

use rust_decimal::Decimal;
use tonic::{Request, Response, Status};

use super::settle::{outcome_name, SettleForm, UsageForm};
use super::status::{grpc_status, Refusal};
use crate::proto::v1 as pb;
use crate::reload::Reloader;
use tollgate_core::engine::request::parse_amount;
use tollgate_core::engine::{Attributes, CounterReport, Decision, Estimate, Verdict};
use tollgate_core::gate::{CheckInput, Gate};
use tollgate_core::policy::Attr;

#[derive(Debug, Clone)]
pub struct NativeApi {
    gate: Arc<Gate>,
    reloader: Arc<Reloader>,
}

impl NativeApi {
    pub fn new(gate: Arc<Gate>, reloader: Arc<Reloader>) -> NativeApi {
        NativeApi { gate, reloader }
    }
}

#[tonic::async_trait]
impl pb::tollgate_server::Tollgate for NativeApi {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let req = request.into_inner();
        let (attributes, api_key) = attributes(req.attributes.unwrap_or_default());
        let input = CheckInput {
            attributes,
            api_key,
            estimate: estimate(req.estimate.unwrap_or_default())?,
            request_id: non_empty(req.request_id),
            // The native API's callers are trusted services: their
            // attributes rank with the route, and they call the model the
            // decision names.
            can_switch_model: true,
            ..Default::default()
        };
        let decision = self.gate.check(input).await.map_err(|e| grpc_status(&e))?;
        Ok(Response::new(check_response(decision)))
    }

    async fn settle(
        &self,
        request: Request<pb::SettleRequest>,
    ) -> Result<Response<pb::SettleResponse>, Status> {
        let (reservation_id, actual) = settle_form(request.into_inner())
            .checked()
            .map_err(|e| Refusal::invalid(&e).grpc_status())?;
        let outcome = self
            .gate
            .settle(&reservation_id, &actual)
            .await
            .map_err(|e| grpc_status(&e))?;
        Ok(Response::new(pb::SettleResponse {
            outcome: outcome_name(outcome).to_string(),
        }))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self.reloader.status();
        Ok(Response::new(pb::StatusResponse {
            policy_version: s.version,
            loaded_at: s.loaded_at,
            rules: s.rules as u32,
            reloads: s.reloads,
            failed_reloads: s.failed_reloads,
            last_error: s.last_error.unwrap_or_default(),
            error_since: s.error_since.unwrap_or_default(),
        }))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let (attributes, api_key) = attributes(request.into_inner().attributes.unwrap_or_default());
        let version = self.gate.policy().version.clone();
        let counters = self
            .gate
            .usage(attributes, api_key.as_deref())
            .await
            .map_err(|e| grpc_status(&e))?;
        Ok(Response::new(pb::UsageResponse {
            counters: counters.into_iter().map(counter_status).collect(),
            policy_version: version.to_string(),
        }))
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn attributes(a: pb::Attributes) -> (Attributes, Option<String>) {
    let mut attrs = Attributes::default();
    let fields = [
        (Attr::Team, a.team),
        (Attr::Workflow, a.workflow),
        (Attr::Environment, a.environment),
        (Attr::Model, a.model),
        (Attr::Modality, a.modality),
        (Attr::Customer, a.customer),
        (Attr::User, a.user),
        (Attr::Action, a.action),
        (Attr::AttemptKind, a.attempt_kind),
    ];
    for (attr, value) in fields {
        attrs.set(&attr, value);
    }
    for (name, value) in a.labels {
        attrs.set(&Attr::Label(name), value);
    }
    (attrs, non_empty(a.api_key))
}

fn estimate(e: pb::Estimate) -> Result<Estimate, Status> {
    Ok(Estimate {
        input_tokens: e.input_tokens,
        cached_input_tokens: e.cached_input_tokens,
        output_tokens: e.output_tokens,
        images: e.images,
        image_quality: non_empty(e.image_quality),
        video_seconds: decimal("estimate.video_seconds", &e.video_seconds)?,
        audio_seconds: decimal("estimate.audio_seconds", &e.audio_seconds)?,
        detail: Default::default(),
        // The native API sends counts, never the prompt's text.
        prompt: None,
    })
}

fn decimal(field: &str, text: &str) -> Result<Option<Decimal>, Status> {
    if text.is_empty() {
        return Ok(None);
    }
    parse_amount(field, text)
        .map(Some)
        .map_err(|e| Refusal::invalid(&e).grpc_status())
}

/// The answer names the version of the policy that made the decision,
/// even when a reload swapped another in meanwhile.
pub fn check_response(d: Decision) -> pb::CheckResponse {
    let policy_version = d.policy_version;
    pb::CheckResponse {
        verdict: match d.verdict {
            Verdict::Allow => pb::Verdict::Allow,
            Verdict::Deny => pb::Verdict::Deny,
            Verdict::Downgrade => pb::Verdict::Downgrade,
        } as i32,
        reason: d.reason.code().to_string(),
        message: d.message,
        rule: d.rule.unwrap_or_default(),
        scope: d.scope.unwrap_or_default(),
        retry_after_seconds: d.retry_after.unwrap_or(0),
        retryable: d.retryable,
        reservation_id: d.reservation_id.unwrap_or_default(),
        model: d.model.unwrap_or_default(),
        counters: d.counters.into_iter().map(counter_status).collect(),
        policy_version: policy_version.to_string(),
        action_id: d.action_id.unwrap_or_default(),
        alerts: d
            .alerts
            .into_iter()
            .map(|a| pb::AlertCrossing {
                rule: a.rule,
                scope: a.scope,
                threshold: a.threshold,
                unit: a.unit.to_string(),
                used: a.used.to_string(),
                limit: a.limit.to_string(),
            })
            .collect(),
    }
}

fn counter_status(c: CounterReport) -> pb::CounterStatus {
    pb::CounterStatus {
        rule: c.rule,
        scope: c.scope,
        unit: c.unit.to_string(),
        window: c.window.to_string(),
        limit: c.limit.to_string(),
        used: c.used.to_string(),
        remaining: c.remaining.to_string(),
        resets_at: c.resets_at.map(|t| t.div_euclid(1000)).unwrap_or(0),
        enforced: c.enforced,
    }
}

/// The native Settle as the one form every front end settles with, which
/// checks it.
pub fn settle_form(req: pb::SettleRequest) -> SettleForm {
    let u = req.usage.unwrap_or_default();
    SettleForm {
        reservation_id: req.reservation_id,
        usage: UsageForm {
            input_tokens: u.input_tokens,
            cached_input_tokens: u.cached_input_tokens,
            output_tokens: u.output_tokens,
            reasoning_tokens: u.reasoning_tokens,
            images: u.images,
            image_quality: Some(u.image_quality),
            video_seconds: Some(u.video_seconds),
            audio_seconds: Some(u.audio_seconds),
            cache_write_tokens: u.cache_write_tokens,
            audio_input_tokens: u.audio_input_tokens,
            audio_output_tokens: u.audio_output_tokens,
            calls: u.calls.into_iter().collect(),
            batch: u.batch,
        },
    }
}
