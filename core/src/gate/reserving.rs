//! A reserve that is never lost halfway. When a store call outlives the
//! store timeout, or the caller goes away, the call itself may still
//! reserve: the script was sent and runs when the store catches up. So a
//! reserve against a store that can stall runs in a task of its own, to its
//! end. The decision tells the task what became of it; a task that hears
//! nothing takes back what it reserved, so a refused call is never
//! charged and never holds a concurrency slot.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::observe::Observer;
use crate::clock::Clock;
use crate::store::{CounterStore, ReserveOutcome, ReserveRequest, StoreError};

/// What the decision did with a reservation the store made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fate {
    /// The decision used it: it stays, for the caller to settle.
    Kept,
    /// The call went ahead without it (its rules fail open after a store
    /// error): the estimate stays charged, for the call did run, and its
    /// slots are freed at once, since nobody will settle it.
    ChargedAsEstimated,
}

/// A reserve under way. Dropping it without [`Reserving::resolve`] takes
/// back whatever the reserve makes.
pub(super) struct Reserving {
    result: Option<oneshot::Receiver<Result<ReserveOutcome, StoreError>>>,
    fate: Option<oneshot::Sender<Fate>>,
}

impl Reserving {
    pub(super) fn start(
        store: Arc<dyn CounterStore>,
        clock: Arc<dyn Clock>,
        observer: Arc<dyn Observer>,
        request: Arc<ReserveRequest>,
    ) -> Reserving {
        let (result_tx, result_rx) = oneshot::channel();
        let (fate_tx, fate_rx) = oneshot::channel();
        tokio::spawn(async move {
            let result = store.reserve(&request).await;
            let made = match &result {
                Ok(o) if !o.replayed => o.applied.zip(o.reservation_id.clone()),
                _ => None,
            };
            let _ = result_tx.send(result);
            let Some((applied, id)) = made else {
                return;
            };
            let now = clock.now();
            let outcome = match fate_rx.await {
                Ok(Fate::Kept) => return,
                Ok(Fate::ChargedAsEstimated) => {
                    let estimate: Vec<i64> = request.candidates[applied]
                        .ops
                        .iter()
                        .map(|op| op.amount)
                        .collect();
                    store.settle(&id, &estimate, now).await.map(|_| true)
                }
                Err(_) => store
                    .withdraw(&id, request.request_id.as_deref(), now)
                    .await
                    .map(|_| false),
            };
            match outcome {
                Ok(kept) => observer.withdrawn(kept),
                Err(e) => {
                    // Left as it is, the reservation lapses at its TTL with
                    // its estimate charged: on the side of denying.
                    tracing::error!(reservation = %id, error = %e, "could not take back the reservation of a call that was refused or abandoned; it lapses with its estimate charged");
                    observer.withdraw_failed();
                }
            }
        });
        Reserving {
            result: Some(result_rx),
            fate: Some(fate_tx),
        }
    }

    /// The reserve's result. Cancel-safe: dropping this future (a timeout)
    /// leaves the reserve running, to be taken back.
    pub(super) async fn outcome(&mut self) -> Result<ReserveOutcome, StoreError> {
        let Some(rx) = self.result.as_mut() else {
            return Err(StoreError::Unavailable("reserve already awaited".into()));
        };
        let result = rx.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the reserve task ended without an answer".into(),
            ))
        });
        self.result = None;
        result
    }

    /// Tells the reserve what became of its reservation.
    pub(super) fn resolve(mut self, fate: Fate) {
        if let Some(tx) = self.fate.take() {
            let _ = tx.send(fate);
        }
    }
}
