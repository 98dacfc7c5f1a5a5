//! The spend account's two ends in a server: the task that writes what the
//! gate gathered every second, and `GET /v1/spend`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tollgate_core::gate::Gate;

use crate::spend::{report, SpendQuery, SpendReport};

/// How often the gate's gathered account goes to the store: the most a
/// crash can lose.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Writes the account every [`FLUSH_EVERY`] until `stop`; the last write
/// is the shutdown flush hook's.
pub fn spawn_flusher(gate: Arc<Gate>, stop: impl Future<Output = ()> + Send + 'static) {
    tokio::spawn(async move {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
            }
            match gate.flush_spend().await {
                Ok(()) => failing = false,
                Err(e) => {
                    // Kept for the next flush: logged once per outage.
                    if !failing {
                        tracing::warn!(error = %e, "cannot write the spend account; keeping it to write later");
                    }
                    failing = true;
                }
            }
        }
    });
}

/// The query string of `GET /v1/spend`: `from`, `to` (`YYYY-MM-DD`, both
/// included; `to` defaults to `from`), `by` (`model,team`), and `where`
/// (`team=growth`, several joined by commas).
#[derive(Debug, Default)]
pub struct SpendParams {
    pub from: Option<String>,
    pub to: Option<String>,
    pub by: String,
    pub filters: String,
}

/// Reads the days the query covers and reports them.
pub async fn spend_report(gate: &Gate, params: SpendParams) -> Result<SpendReport, SpendError> {
    let calendar = gate.spend_days();
    let today = crate::spend::day_text(calendar.day(gate.now()));
    let from = params.from.unwrap_or_else(|| today.clone());
    let to = params.to.unwrap_or_else(|| from.clone());
    let query =
        SpendQuery::parse(&from, &to, &params.by, &[params.filters]).map_err(SpendError::Query)?;
    let days = gate
        .spend(query.from, query.to)
        .await
        .map_err(SpendError::Gate)?;
    Ok(report(&days, &query, calendar.name()))
}

#[derive(Debug)]
pub enum SpendError {
    Query(String),
    Gate(tollgate_core::gate::GateError),
}
