//! The one authorize pipeline every HTTP-shaped front end runs: Envoy
//! ext_authz, forward auth and nginx. Read the request on one policy
//! snapshot, decide, and answer allow or a [`Refusal`]; each front end only
//! encodes the answer in its own protocol.

use super::http_request::{check_input, HttpRequest};
use super::status::{allowance, Allowance, Refusal};
use tollgate_core::engine::Verdict;
use tollgate_core::gate::Gate;

/// What an HTTP-shaped front end answers.
#[derive(Debug)]
pub enum Answer {
    Allowed(Allowance),
    Refused(Refusal),
}

pub async fn authorize(gate: &Gate, request: &HttpRequest<'_>) -> Answer {
    let policy = gate.policy();
    let input = match check_input(&policy.set.attributes, request) {
        Ok(input) => input,
        Err(e) => return Answer::Refused(Refusal::invalid(&e)),
    };
    let model_header = policy.set.attributes.model_header.clone();
    match gate.check_on(policy, input).await {
        Ok(d) if d.verdict == Verdict::Deny => Answer::Refused(Refusal::denied(&d)),
        Ok(d) => Answer::Allowed(allowance(&d, &model_header)),
        Err(e) => {
            let refusal = Refusal::from_gate_error(&e);
            if refusal.is_store_fault() {
                tracing::warn!(error = %e, "counter store fault");
            }
            Answer::Refused(refusal)
        }
    }
}
