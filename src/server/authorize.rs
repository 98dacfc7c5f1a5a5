//! The one authorize pipeline every HTTP-shaped front end runs: Envoy
//! ext_authz, forward auth and nginx. Read the request on one policy
//! snapshot, decide, and answer allow or a [`Refusal`]; each front end only
//! encodes the answer in its own protocol.

use super::http_request::{check_input, HttpRequest};
use super::status::{allowance, Allowance, Refusal};
use std::sync::Arc;

use tollgate_core::engine::{Decision, Verdict};
use tollgate_core::gate::Gate;
use tollgate_core::policy::CompiledPolicy;

/// What an HTTP-shaped front end answers.
#[derive(Debug)]
pub enum Answer {
    Allowed(Box<Allowed>),
    Refused(Refusal),
}

/// An allowed request: the headers to add, and what a front end that sees
/// the response (ext_proc) needs to settle it.
#[derive(Debug)]
pub struct Allowed {
    pub allowance: Allowance,
    pub decision: Decision,
    /// The snapshot that decided, for the settle.
    pub policy: Arc<CompiledPolicy>,
}

/// What a front end does itself, beyond asking for a decision. ext_authz
/// and forward auth do neither (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct FrontEnd {
    /// It puts a downgrade into effect (ext_proc rewrites the body's
    /// model), whatever the route says.
    pub rewrites_body: bool,
    /// It settles every call it lets through when the call ends (ext_proc),
    /// whatever the policy or the route says about settling: its calls
    /// are never final estimates.
    pub settles: bool,
}

pub async fn authorize(gate: &Gate, request: &HttpRequest<'_>, front_end: FrontEnd) -> Answer {
    let policy = gate.policy();
    let mut input = match check_input(&policy.set.attributes, request) {
        Ok(input) => input,
        Err(e) => return Answer::Refused(Refusal::invalid(&e)),
    };
    input.can_switch_model |= front_end.rewrites_body;
    if front_end.settles {
        input.estimate_is_final = false;
    }
    match gate.check_on(policy.clone(), input).await {
        Ok(d) if d.verdict == Verdict::Deny => Answer::Refused(Refusal::denied(&d)),
        Ok(d) => Answer::Allowed(Box::new(Allowed {
            allowance: allowance(&d, &policy.set.attributes.model_header),
            decision: d,
            policy,
        })),
        Err(e) => {
            let refusal = Refusal::from_gate_error(&e);
            if refusal.is_store_fault() {
                tracing::warn!(error = %e, "counter store fault");
            }
            Answer::Refused(refusal)
        }
    }
}
