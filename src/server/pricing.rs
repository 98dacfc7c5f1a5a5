//! `GET /v1/pricing/missing`: the models this server has seen in requests
//! that have no price under the policy in force (`tollgate pricing
//! missing`).

use tollgate_core::gate::{Gate, MAX_UNPRICED_MODELS};

use crate::usage::{MissingModel, MissingReport};

/// Per replica: each server counts the requests it saw since it started.
pub fn report(gate: &Gate) -> MissingReport {
    let (models, overflow) = gate.unpriced_models();
    MissingReport {
        policy_version: gate.policy().version.to_string(),
        models: models
            .into_iter()
            .map(|m| MissingModel {
                model: m.model,
                requests: m.requests,
                first_seen: m.first_seen,
                last_seen: m.last_seen,
            })
            .collect(),
        overflow,
        max_models: MAX_UNPRICED_MODELS,
    }
}
