//! Graceful shutdown: one trigger shared by every task, a bounded drain of
//! the listeners, then the flush hooks.
//!
//! The order on SIGTERM or SIGINT: readiness goes false (so load balancers
//! and the gRPC health service stop sending new work), the listeners stop
//! accepting and finish the calls in flight for up to the drain timeout,
//! then every [`FlushHooks`] entry runs, bounded too, and the process exits.
//! Anything that buffers work it must not lose (an alert queue, an audit
//! log) registers a hook.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// A one-way switch from running to stopping, cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    #[cfg(test)]
    pub(crate) fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once [`trigger`](Self::trigger) has been called.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.wait_for(|stopping| *stopping).await;
        }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

type Hook = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Work to finish after the listeners have drained and before exit.
#[derive(Default)]
pub struct FlushHooks {
    hooks: Vec<(&'static str, Hook)>,
}

impl FlushHooks {
    /// Registers `flush`, run once at exit. It should be lazy: an `async`
    /// block does nothing until it is polled.
    pub fn add(&mut self, name: &'static str, flush: impl Future<Output = ()> + Send + 'static) {
        self.hooks.push((name, Box::pin(flush)));
    }

    pub fn len(&self) -> usize {
        self.hooks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }

    /// Runs every hook concurrently for at most `within`; returns whether
    /// all of them finished. Unfinished ones are named in the log.
    pub async fn run(self, within: Duration) -> bool {
        let mut pending: Vec<(&'static str, tokio::task::JoinHandle<()>)> = self
            .hooks
            .into_iter()
            .map(|(name, hook)| (name, tokio::spawn(hook)))
            .collect();
        let deadline = tokio::time::Instant::now() + within;
        let mut all = true;
        for (name, handle) in pending.iter_mut() {
            match tokio::time::timeout_at(deadline, handle).await {
                Ok(Ok(())) => tracing::debug!(hook = name, "flushed"),
                Ok(Err(e)) => {
                    all = false;
                    tracing::error!(hook = name, error = %e, "flush failed");
                }
                Err(_) => {
                    all = false;
                    tracing::warn!(hook = name, "flush did not finish in time");
                }
            }
        }
        all
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C elsewhere).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                    _ = int.recv() => tracing::info!("SIGINT: shutting down"),
                }
                return;
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the server")
            }
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn hooks_run_once_and_a_stuck_one_is_cut_off() {
        let flushed = Arc::new(AtomicBool::new(false));
        let mut hooks = FlushHooks::default();
        let f = flushed.clone();
        hooks.add("quick", async move { f.store(true, Ordering::SeqCst) });
        assert!(!flushed.load(Ordering::SeqCst), "hooks are lazy");
        assert!(hooks.run(Duration::from_secs(1)).await);
        assert!(flushed.load(Ordering::SeqCst));

        let mut hooks = FlushHooks::default();
        hooks.add("stuck", std::future::pending());
        let started = std::time::Instant::now();
        assert!(!hooks.run(Duration::from_millis(100)).await);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn every_waiter_sees_the_trigger() {
        let s = Shutdown::new();
        let (a, b) = (s.wait(), s.wait());
        assert!(!s.is_triggered());
        s.trigger();
        a.await;
        b.await;
        s.wait().await;
    }
}
