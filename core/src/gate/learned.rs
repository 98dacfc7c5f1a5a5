//! Output tokens learned from settled calls, for
//! `defaults.output_tokens: learned`: per model and workflow, the last
//! [`WINDOW`] settled calls' output tokens, and a percentile of them
//! (p95 by default) that a request naming no maximum reserves instead of
//! the fixed default, once the policy's `min_samples` calls have settled.
//!
//! *Invariant: memory is bounded whatever the traffic: at most [`MAX_KEYS`]
//! (model, workflow) keys, each a ring of at most [`WINDOW`] samples, and
//! a key past the cap takes the place of the key settled longest ago. The
//! table is per process (each replica learns from the calls it settles),
//! is only written at settle and read at check, and reaches the engine
//! only as data (`engine::charge::LearnedOutput`), so the engine stays
//! pure. A value is always one of the samples, so it never exceeds the
//! largest output seen in the window.*

use std::collections::HashMap;
use std::sync::Mutex;

use crate::engine::charge::LearnedOutput;
use crate::policy::{LearnOutput, MAX_MIN_SAMPLES};

/// Samples kept per key: the percentile is of the last `WINDOW` settled
/// calls, so a change in real usage moves it within a window's calls
/// (p95 within a twentieth of one, upwards).
pub const WINDOW: usize = MAX_MIN_SAMPLES as usize;

/// Keys kept: (model, workflow) pairs.
pub const MAX_KEYS: usize = 1_024;

#[derive(Debug, Default)]
pub(crate) struct Learned {
    inner: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    /// Workflow, then model.
    keys: HashMap<String, HashMap<String, Ring>>,
    len: usize,
    /// Settles seen, as a clock for "settled longest ago".
    tick: u64,
    /// Keys that took the place of another.
    evicted: u64,
}

#[derive(Debug)]
struct Ring {
    samples: Vec<u32>,
    /// Where the next sample goes once the ring is full.
    next: usize,
    /// Every sample ever added, for display.
    total: u64,
    last: u64,
    /// The percentile last computed, and for which percentile; cleared
    /// by a new sample.
    cached: Option<(u8, u64)>,
}

impl Ring {
    fn add(&mut self, tokens: u32, tick: u64) {
        if self.samples.len() < WINDOW {
            self.samples.push(tokens);
        } else {
            self.samples[self.next] = tokens;
            self.next = (self.next + 1) % WINDOW;
        }
        self.total += 1;
        self.last = tick;
        self.cached = None;
    }

    /// The nearest-rank percentile: the smallest sample that at least
    /// `p` percent of the samples are at or below.
    fn percentile(&mut self, p: u8) -> u64 {
        if let Some((at, value)) = self.cached {
            if at == p {
                return value;
            }
        }
        let mut sorted = self.samples.clone();
        let n = sorted.len();
        let rank = (n * usize::from(p)).div_ceil(100).clamp(1, n);
        let (_, v, _) = sorted.select_nth_unstable(rank - 1);
        let value = u64::from(*v);
        self.cached = Some((p, value));
        value
    }
}

/// One key of the table, as `explain` and the dashboard show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LearnedRow {
    pub model: String,
    /// Empty for calls with no workflow.
    pub workflow: String,
    /// Samples in the window, and all settled since the process started.
    pub samples: u64,
    pub settled: u64,
    pub percentile: u8,
    /// The percentile of the window's samples; reserved once `samples`
    /// reaches `min_samples`.
    pub output_tokens: u64,
    pub in_use: bool,
}

/// What a request of `workflow` reserves by the rows of a table listed
/// elsewhere (a running server's, for `explain`): those in use.
pub(crate) fn in_use(rows: &[LearnedRow], workflow: &str) -> LearnedOutput {
    LearnedOutput {
        by_model: rows
            .iter()
            .filter(|r| r.in_use && r.workflow == workflow)
            .map(|r| (r.model.clone(), r.output_tokens))
            .collect(),
    }
}

impl Learned {
    /// Adds a settled call's output tokens.
    pub(crate) fn add(&self, model: &str, workflow: &str, output_tokens: u64) {
        let tokens = u32::try_from(output_tokens).unwrap_or(u32::MAX);
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let t = &mut *guard;
        t.tick += 1;
        let tick = t.tick;
        // The common case, a key already held, allocates nothing.
        if let Some(ring) = t.keys.get_mut(workflow).and_then(|m| m.get_mut(model)) {
            ring.add(tokens, tick);
            return;
        }
        if t.len >= MAX_KEYS {
            let oldest = t
                .keys
                .iter()
                .flat_map(|(w, models)| models.iter().map(move |(m, r)| (r.last, w, m)))
                .min()
                .map(|(_, w, m)| (w.clone(), m.clone()));
            if let Some((w, m)) = oldest {
                if let Some(models) = t.keys.get_mut(&w) {
                    models.remove(&m);
                    if models.is_empty() {
                        t.keys.remove(&w);
                    }
                }
                t.len -= 1;
                t.evicted += 1;
            }
        }
        let mut ring = Ring {
            samples: Vec::new(),
            next: 0,
            total: 0,
            last: tick,
            cached: None,
        };
        ring.add(tokens, tick);
        t.keys
            .entry(workflow.to_string())
            .or_default()
            .insert(model.to_string(), ring);
        t.len += 1;
    }

    /// What a request of `workflow` reserves, by model: the keys of that
    /// workflow with at least `learn.min_samples` samples.
    pub(crate) fn for_workflow(&self, workflow: &str, learn: LearnOutput) -> LearnedOutput {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(models) = t.keys.get_mut(workflow) else {
            return LearnedOutput::default();
        };
        let by_model = models
            .iter_mut()
            .filter(|(_, r)| r.samples.len() >= learn.min_samples as usize)
            .map(|(m, r)| (m.clone(), r.percentile(learn.percentile)))
            .collect();
        LearnedOutput { by_model }
    }

    /// Every key, by model then workflow, and how many keys took the place
    /// of another.
    pub(crate) fn rows(&self, learn: LearnOutput) -> (Vec<LearnedRow>, u64) {
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let evicted = t.evicted;
        let mut rows: Vec<LearnedRow> = t
            .keys
            .iter_mut()
            .flat_map(|(workflow, models)| {
                models.iter_mut().map(move |(model, r)| LearnedRow {
                    model: model.clone(),
                    workflow: workflow.clone(),
                    samples: r.samples.len() as u64,
                    settled: r.total,
                    percentile: learn.percentile,
                    output_tokens: r.percentile(learn.percentile),
                    in_use: r.samples.len() >= learn.min_samples as usize,
                })
            })
            .collect();
        rows.sort_by(|a, b| (&a.model, &a.workflow).cmp(&(&b.model, &b.workflow)));
        (rows, evicted)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap().len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P95: LearnOutput = LearnOutput {
        percentile: 95,
        min_samples: 20,
    };

    fn value(l: &Learned, model: &str, workflow: &str) -> Option<u64> {
        l.for_workflow(workflow, P95)
            .by_model
            .into_iter()
            .find(|(m, _)| m == model)
            .map(|(_, v)| v)
    }

    #[test]
    fn nothing_until_enough_samples_then_the_percentile() {
        let l = Learned::default();
        for i in 1..=19u64 {
            l.add("gpt-4o", "support", i * 10);
            assert_eq!(value(&l, "gpt-4o", "support"), None, "{i} samples");
        }
        l.add("gpt-4o", "support", 200);
        // 10, 20, ... 200: the nearest rank of p95 of 20 is the 19th.
        assert_eq!(value(&l, "gpt-4o", "support"), Some(190));
        // Other keys are apart.
        assert_eq!(value(&l, "gpt-4o", "triage"), None);
        assert_eq!(value(&l, "gpt-4o-mini", "support"), None);
    }

    #[test]
    fn the_window_forgets_old_samples() {
        let l = Learned::default();
        for _ in 0..WINDOW {
            l.add("m", "", 5_000);
        }
        assert_eq!(value(&l, "m", ""), Some(5_000));
        for _ in 0..WINDOW {
            l.add("m", "", 100);
        }
        assert_eq!(value(&l, "m", ""), Some(100));
        let (rows, _) = l.rows(P95);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].samples, WINDOW as u64);
        assert_eq!(rows[0].settled, 2 * WINDOW as u64);
    }

    #[test]
    fn keys_are_capped_and_the_stalest_goes() {
        let l = Learned::default();
        for i in 0..MAX_KEYS {
            l.add(&format!("m{i}"), "w", 1);
        }
        // m0 settles again, so m1 is now the stalest.
        l.add("m0", "w", 1);
        l.add("new", "w", 1);
        assert_eq!(l.len(), MAX_KEYS);
        let (rows, evicted) = l.rows(P95);
        assert_eq!(evicted, 1);
        let models: Vec<String> = rows.into_iter().map(|r| r.model).collect();
        assert!(models.contains(&"m0".to_string()));
        assert!(models.contains(&"new".to_string()));
        assert!(!models.contains(&"m1".to_string()));
    }

    mod through_the_gate {
        use std::sync::Arc;

        use crate::engine::{Attributes, Estimate};
        use crate::gate::ManualClock;
        use crate::gate::{reserved_output_tokens, ActualUsage, CheckInput, Gate, GateConfig};
        use crate::policy::{compile_sources, SourceFile};
        use crate::store::MemoryStore;

        use super::super::WINDOW;

        fn gate(defaults: &str) -> Gate {
            let yaml = format!(
                "\
pricing:
  models:
    gpt-4o: {{ input_per_mtok: 2.5, output_per_mtok: 10 }}
defaults:
  output_tokens: {defaults}
rules:
  - id: output
    match: {{ workflow: \"*\" }}
    per: [workflow]
    limit: {{ output_tokens: 1000000000, window: daily }}
"
            );
            let policy = compile_sources(&[SourceFile {
                name: "p.yaml".to_string(),
                text: yaml,
            }])
            .unwrap_or_else(|e| panic!("{e}"));
            Gate::new(
                policy,
                Arc::new(MemoryStore::default()),
                Arc::new(ManualClock::new(1_795_000_000_000)),
                GateConfig::default(),
            )
        }

        fn input(workflow: &str, output: Option<u64>) -> CheckInput {
            CheckInput {
                attributes: Attributes {
                    workflow: Some(workflow.to_string()),
                    model: Some("gpt-4o".to_string()),
                    ..Default::default()
                },
                estimate: Estimate {
                    input_tokens: Some(10),
                    output_tokens: output,
                    ..Default::default()
                },
                ..Default::default()
            }
        }

        /// The output tokens a request reserves: its decision's charge on
        /// the output counter, and what ext_proc's top-ups start from.
        async fn reserves(gate: &Gate, workflow: &str) -> (u64, Option<String>) {
            let input = input(workflow, None);
            let d = gate.check(input.clone()).await.unwrap();
            let (plan, _) = gate.explain(input.clone()).unwrap();
            let planned = plan.candidates[0].ops[0].amount as u64;
            let covered = reserved_output_tokens(&gate.policy(), &input, &d);
            assert_eq!(planned, covered, "the check and the top-ups agree");
            (covered, d.reservation_id)
        }

        /// The nearest-rank p95 of the last `WINDOW` of `used`, worked out
        /// apart from the table.
        fn p95(used: &[u64]) -> u64 {
            let mut last: Vec<u64> = used[used.len().saturating_sub(WINDOW)..].to_vec();
            last.sort_unstable();
            last[(last.len() * 95).div_ceil(100) - 1]
        }

        /// A Lehmer generator: `base` plus 0..991.
        fn next(r: &mut u64, base: u64) -> u64 {
            *r = (*r * 48_271) % 2_147_483_647;
            base + *r % 991
        }

        async fn settle(gate: &Gate, id: Option<String>, tokens: u64, used: &mut Vec<u64>) {
            used.push(tokens);
            let actual = ActualUsage {
                input_tokens: 10,
                output_tokens: tokens,
                ..Default::default()
            };
            gate.settle(&id.expect("a reservation"), &actual)
                .await
                .unwrap();
        }

        #[tokio::test]
        async fn the_reservation_converges_to_the_p95_and_follows_a_shift() {
            let gate = gate("{ learned: p95, default: 4096 }");
            let mut used = Vec::new();
            // A synthetic stream: outputs spread over 40..=1030 tokens, in
            // an order that is not sorted.
            let mut r: u64 = 7;
            for i in 0..300 {
                let (reserved, id) = reserves(&gate, "support").await;
                if i < 20 {
                    // Until 20 calls have settled, the default.
                    assert_eq!(reserved, 4096, "after {i} settled");
                } else {
                    assert_eq!(reserved, p95(&used), "after {i} settled");
                }
                settle(&gate, id, next(&mut r, 40), &mut used).await;
            }
            let converged = reserves(&gate, "support").await.0;
            assert!((960..=1030).contains(&converged), "{converged}");
            // Another workflow has learned nothing.
            assert_eq!(reserves(&gate, "triage").await.0, 4096);
            // A request that names its maximum reserves it.
            let asked = gate.check(input("support", Some(64))).await.unwrap();
            assert_eq!(asked.learned_output_tokens, None);

            // Real usage shifts up: the reservation follows within a
            // twentieth of the window, and settles on the new p95.
            for i in 0..WINDOW {
                let (reserved, id) = reserves(&gate, "support").await;
                assert_eq!(reserved, p95(&used), "after {i} shifted");
                settle(&gate, id, next(&mut r, 5_000), &mut used).await;
            }
            let shifted = reserves(&gate, "support").await.0;
            assert!((5_900..=5_990).contains(&shifted), "{shifted}");
            let rows = gate.learned_outputs().expect("the policy learns").0;
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].workflow, "support");
            assert_eq!(rows[0].output_tokens, shifted);
            assert!(rows[0].in_use);
        }

        #[tokio::test]
        async fn a_fixed_default_learns_nothing() {
            let gate = gate("700");
            for _ in 0..30 {
                let d = gate.check(input("support", None)).await.unwrap();
                let id = d.reservation_id.expect("a reservation");
                let actual = ActualUsage {
                    output_tokens: 5,
                    ..Default::default()
                };
                gate.settle(&id, &actual).await.unwrap();
            }
            assert_eq!(reserves(&gate, "support").await.0, 700);
            assert!(gate.learned_outputs().is_none());
        }
    }
}
