//! The decision audit log: one JSON line per decision, written by a thread
//! of its own so that a slow disk never slows a decision.
//!
//! The decision path only samples, copies what the record needs and
//! `try_send`s it into a bounded queue; a full queue drops the record,
//! counts it (`tollgate_audit_dropped_total`) and logs, at most every ten
//! seconds. The matched rules and the charge come from the decision's own
//! plan, so nothing is worked out twice; the writer only formats, and
//! flushes whenever the queue is empty. [`AuditLog::flush`] waits for every record queued before
//! it, for shutdown.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};

use super::names;
use tollgate_core::engine::charge::from_counter;
use tollgate_core::engine::decide::{Plan, RuleCounter};
use tollgate_core::engine::request::hash_key;
use tollgate_core::engine::window::{format_utc, Millis};
use tollgate_core::engine::{Attributes, Decision, Verdict};
use tollgate_core::gate::{CheckInput, DecisionReport, GateError, TopUp, TopUpReport};
use tollgate_core::policy::{hex, Attr, CompiledPolicy, Unit};
use tollgate_core::store::CounterOp;

/// Records waiting for the writer before new ones are dropped.
pub const DEFAULT_QUEUE: usize = 8192;

#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// A file to append to, or `-` for standard output.
    pub path: PathBuf,
    /// Share of decisions recorded, 0 to 1.
    pub sample: f64,
    /// Record only denials and failed decisions.
    pub denials_only: bool,
    pub queue: usize,
}

enum Message {
    Record(Box<Record>),
    Flush(oneshot::Sender<()>),
}

/// What the decision path hands over: copies of what the line needs,
/// already worked out by the decision itself.
struct Record {
    now: Millis,
    request_id: Option<String>,
    /// The only form of the API key that leaves the decision path.
    key_sha256: Option<[u8; 32]>,
    attributes: Attributes,
    /// Every rule the request matched, by id.
    rules: Vec<String>,
    /// What the decision charged (or, for a denial, would have charged).
    charge: Vec<Charge>,
    policy_version: String,
    outcome: Outcome,
}

/// The record itself is boxed on its way to the writer; a decision's
/// outcome is boxed here too, so that a top-up's record is not as large.
enum Outcome {
    Decision(Box<Result<Decision, GateError>>),
    TopUp {
        output_tokens: u64,
        result: Result<TopUp, GateError>,
    },
}

struct Charge {
    rule: String,
    scope: String,
    unit: Unit,
    amount: i64,
}

#[derive(Debug)]
pub struct AuditLog {
    tx: mpsc::Sender<Message>,
    /// Sampling threshold: `sample` scaled to 2^32.
    sample: u64,
    denials_only: bool,
    seen: AtomicU64,
    dropped: AtomicU64,
    last_warning: AtomicI64,
}

impl AuditLog {
    /// Opens the file (or standard output) and starts the writer thread.
    pub fn open(config: &AuditConfig) -> std::io::Result<AuditLog> {
        let out: Box<dyn Write + Send> = if config.path.as_os_str() == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&config.path)?,
            )
        };
        AuditLog::to_writer(config, out)
    }

    /// Starts the writer thread on any output (`config.path` is unused).
    pub fn to_writer(
        config: &AuditConfig,
        out: Box<dyn Write + Send>,
    ) -> std::io::Result<AuditLog> {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        std::thread::Builder::new()
            .name("tollgate-audit".to_string())
            .spawn(move || write_loop(rx, std::io::BufWriter::new(out)))?;
        Ok(AuditLog {
            tx,
            sample: (config.sample.clamp(0.0, 1.0) * (1u64 << 32) as f64) as u64,
            denials_only: config.denials_only,
            seen: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_warning: AtomicI64::new(i64::MIN),
        })
    }

    /// Keeps a record of a finished decision, if it is sampled. Sampling
    /// is by count, not chance: of every n decisions, `sample * n` are
    /// kept, spread evenly. Nothing is copied for a decision not kept.
    /// Whether the next record is written: the sample, then the denials
    /// filter.
    fn keeps(&self, denial: bool) -> bool {
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        let kept = |n: u64| (u128::from(n) * u128::from(self.sample)) >> 32;
        kept(n + 1) != kept(n) && (denial || !self.denials_only)
    }

    pub(crate) fn record(&self, report: &DecisionReport<'_>) {
        let denial = !matches!(report.result, Ok(d) if d.verdict != Verdict::Deny);
        if !self.keeps(denial) {
            return;
        }
        let policy = report.policy;
        let input = report.input;
        let (rules, charge) = match report.plan {
            Some(plan) => rules_and_charge(policy, plan, report.result),
            None => (Vec::new(), Vec::new()),
        };
        let record = Record {
            now: report.now,
            request_id: input.request_id.clone(),
            key_sha256: key_sha256(input),
            attributes: report
                .attributes
                .cloned()
                .unwrap_or_else(|| input.attributes.clone()),
            rules,
            charge,
            policy_version: policy.version.to_string(),
            outcome: Outcome::Decision(Box::new(report.result.clone())),
        };
        self.queue(record);
    }

    /// A top-up is written as a line of its own (`"event": "top_up"`),
    /// with the call's request id and attributes, so that the decision
    /// log shows every reservation a streamed call made. It is sampled
    /// and filtered as decisions are; one without room, or failed, counts
    /// as a denial.
    pub(crate) fn record_top_up(&self, report: &TopUpReport<'_>) {
        let denial = !matches!(report.result, Ok(TopUp::Reserved(_)));
        if !self.keeps(denial) {
            return;
        }
        let policy = report.policy;
        let charge = charges(policy, report.ops, report.counters);
        let mut rules: Vec<String> = report
            .counters
            .iter()
            .map(|rc| policy.rules()[rc.rule].id.clone())
            .collect();
        rules.dedup();
        let record = Record {
            now: report.now,
            request_id: report.input.request_id.clone(),
            key_sha256: key_sha256(report.input),
            attributes: report.attributes.clone(),
            rules,
            charge,
            policy_version: policy.version.to_string(),
            outcome: Outcome::TopUp {
                output_tokens: report.output_tokens,
                result: report.result.clone(),
            },
        };
        self.queue(record);
    }

    fn queue(&self, record: Record) {
        match self.tx.try_send(Message::Record(Box::new(record))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.dropped(),
            Err(mpsc::error::TrySendError::Closed(_)) => self.dropped(),
        }
    }

    fn dropped(&self) {
        let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::counter!(names::AUDIT_DROPPED).increment(1);
        let now =
            tollgate_core::gate::Clock::now(&tollgate_core::gate::SystemClock).div_euclid(1000);
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last.saturating_add(10)
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                dropped_total = total,
                "audit log queue is full; dropping audit records"
            );
        }
    }

    /// Records dropped so far because the queue was full.
    #[cfg(test)]
    pub(crate) fn dropped_total(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every record queued before this call is written and
    /// flushed to the file.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

fn write_loop(mut rx: mpsc::Receiver<Message>, mut out: impl Write) {
    let mut failing = false;
    while let Some(message) = rx.blocking_recv() {
        let result = match message {
            Message::Record(record) => {
                let mut line = line(&record);
                line.push('\n');
                let written = out.write_all(line.as_bytes());
                if written.is_ok() {
                    metrics::counter!(names::AUDIT_WRITTEN).increment(1);
                }
                written.and_then(|()| if rx.is_empty() { out.flush() } else { Ok(()) })
            }
            Message::Flush(done) => {
                let flushed = out.flush();
                let _ = done.send(());
                flushed
            }
        };
        match result {
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "cannot write the audit log");
            }
            Err(_) => {}
            Ok(()) => failing = false,
        }
    }
    let _ = out.flush();
}

/// One audit line, fields in the order people read them.
#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    /// `decision`, or `top_up` for more output reserved by a streamed call
    /// already decided.
    event: &'static str,
    request_id: Option<&'a str>,
    verdict: &'static str,
    reason: &'static str,
    rule: Option<&'a str>,
    scope: Option<&'a str>,
    model: Option<&'a str>,
    message: String,
    /// Whether the charge was reserved (false for denials and errors).
    charged: bool,
    rules: Vec<String>,
    charge: Vec<Value>,
    attributes: Value,
    policy_version: &'a str,
}

fn line(r: &Record) -> String {
    let charge = r
        .charge
        .iter()
        .map(|c| {
            json!({
                "rule": c.rule,
                "scope": c.scope,
                "unit": c.unit.name(),
                "amount": from_counter(c.amount, c.unit).to_string(),
            })
        })
        .collect();
    let mut line = Line {
        ts: format_utc_millis(r.now),
        event: "decision",
        request_id: r.request_id.as_deref(),
        verdict: "error",
        reason: "",
        rule: None,
        scope: None,
        model: None,
        message: String::new(),
        charged: false,
        rules: r.rules.clone(),
        charge,
        attributes: attributes_json(&r.attributes, r.key_sha256.as_ref()),
        policy_version: &r.policy_version,
    };
    match &r.outcome {
        Outcome::Decision(result) => decision_fields(&mut line, result),
        Outcome::TopUp {
            output_tokens,
            result,
        } => {
            line.model = r.attributes.model.as_deref();
            top_up_fields(&mut line, *output_tokens, result)
        }
    }
    // Written as a struct, not a map, to keep the field order.
    serde_json::to_string(&line).unwrap_or_default()
}

fn decision_fields<'a>(line: &mut Line<'a>, result: &'a Result<Decision, GateError>) {
    match result {
        Ok(d) => {
            line.verdict = d.verdict.name();
            line.reason = d.reason.code();
            line.rule = d.rule.as_deref();
            line.scope = d.scope.as_deref();
            line.model = d.model.as_deref();
            line.message = d.message.clone();
            line.charged = d.reservation_id.is_some() && d.verdict != Verdict::Deny;
        }
        Err(e) => {
            line.reason = e.code();
            line.message = e.to_string();
        }
    }
}

fn top_up_fields<'a>(line: &mut Line<'a>, tokens: u64, result: &'a Result<TopUp, GateError>) {
    line.event = "top_up";
    match result {
        Ok(TopUp::Reserved(_)) => {
            line.verdict = "allow";
            line.reason = "topped_up";
            line.charged = true;
            line.message = format!("reserved {tokens} more output tokens for a streamed call");
        }
        Ok(TopUp::NoRoom { cut, rules }) => {
            line.verdict = "deny";
            line.reason = "budget_exceeded";
            line.rule = rules.first().map(String::as_str);
            let names: Vec<String> = rules.iter().map(|r| format!("`{r}`")).collect();
            let then = if *cut {
                "the stream is cut (on_overrun: cut)"
            } else {
                "the stream runs to its end and is charged what it used (on_overrun: finish)"
            };
            line.message = format!(
                "no room for {tokens} more output tokens under {}; {then}",
                names.join(", ")
            );
        }
        Ok(TopUp::Unmetered) => {
            line.verdict = "allow";
            line.reason = "unmetered";
        }
        Err(e) => {
            line.reason = e.code();
            line.message = e.to_string();
        }
    }
}

/// The rules the request matched, and what the decision charged (or, for
/// a denial, would have charged) on each counter, from its own plan.
fn rules_and_charge(
    policy: &CompiledPolicy,
    plan: &Plan,
    outcome: &Result<Decision, GateError>,
) -> (Vec<String>, Vec<Charge>) {
    let rules = plan
        .matched
        .iter()
        .map(|&i| policy.rules()[i].id.clone())
        .collect();
    let chosen = match outcome {
        Ok(d) if d.verdict == Verdict::Downgrade => plan
            .candidates
            .iter()
            .position(|c| c.model == d.model)
            .unwrap_or(0),
        _ => 0,
    };
    let charge = match (plan.candidates.get(chosen), plan.counters.get(chosen)) {
        (Some(c), Some(counters)) => charges(policy, &c.ops, counters),
        _ => Vec::new(),
    };
    (rules, charge)
}

/// Each op with the rule and scope of its counter (parallel slices).
fn charges(policy: &CompiledPolicy, ops: &[CounterOp], counters: &[RuleCounter]) -> Vec<Charge> {
    ops.iter()
        .zip(counters)
        .map(|(op, rc)| Charge {
            rule: policy.rules()[rc.rule].id.clone(),
            scope: rc.scope.clone(),
            unit: op.unit,
            amount: op.amount,
        })
        .collect()
}

/// The only form of the API key that leaves the decision path.
fn key_sha256(input: &CheckInput) -> Option<[u8; 32]> {
    input
        .api_key
        .as_deref()
        .filter(|k| !k.trim().is_empty())
        .map(hash_key)
}

fn attributes_json(attrs: &Attributes, key_sha256: Option<&[u8; 32]>) -> Value {
    let mut map = Map::new();
    if let Some(h) = key_sha256 {
        map.insert("api_key_sha256".into(), json!(hex(h)));
    }
    for attr in Attr::WELL_KNOWN.iter().filter(|a| **a != Attr::ModelFamily) {
        if let Some(v) = attrs.get(attr) {
            map.insert(attr.name().to_string(), json!(v));
        }
    }
    if !attrs.labels.is_empty() {
        map.insert("labels".into(), json!(attrs.labels));
    }
    Value::Object(map)
}

fn format_utc_millis(t: Millis) -> String {
    let secs = format_utc(t);
    format!("{}.{:03}Z", secs.trim_end_matches('Z'), t.rem_euclid(1000))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc as std_mpsc;
    use std::sync::{Arc, Mutex};
    use tollgate_core::gate::CheckInput;

    /// An output that stalls on its first write until released, as a slow
    /// disk would, and says when the writer is stuck in it.
    struct Stalled {
        entered: Option<std_mpsc::Sender<()>>,
        release: std_mpsc::Receiver<()>,
        bytes: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(entered) = self.entered.take() {
                let _ = entered.send(());
                let _ = self.release.recv();
            }
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_and_never_blocks() {
        let policy = Arc::new(
            tollgate_core::policy::compile_sources(&[tollgate_core::policy::SourceFile {
                name: "p.yaml".to_string(),
                text: "rules:\n  - id: r\n    limit: { requests: 1, window: daily }\n".to_string(),
            }])
            .unwrap(),
        );
        let (entered_tx, entered) = std_mpsc::channel();
        let (release, release_rx) = std_mpsc::channel();
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let config = AuditConfig {
            path: PathBuf::from("-"),
            sample: 1.0,
            denials_only: false,
            queue: 2,
        };
        let out = Stalled {
            entered: Some(entered_tx),
            release: release_rx,
            bytes: bytes.clone(),
        };
        let log = AuditLog::to_writer(&config, Box::new(out)).unwrap();
        let mut input = CheckInput::default();
        input.attributes.team = Some("t".to_string());
        input.api_key = Some("sk-never-written".to_string());
        let result = Ok(Decision::allow_unmetered());
        let submit = |n: usize| {
            for _ in 0..n {
                log.record(&DecisionReport {
                    policy: &policy,
                    now: 0,
                    elapsed: std::time::Duration::ZERO,
                    input: &input,
                    attributes: None,
                    plan: None,
                    result: &result,
                });
            }
        };
        submit(1);
        entered.recv().unwrap();
        // The writer is stuck on the first record: two fit in the queue,
        // the other three are dropped at once.
        submit(5);
        assert_eq!(log.dropped_total(), 3);
        release.send(()).unwrap();
        log.flush().await;
        let text = String::from_utf8(bytes.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(!text.contains("sk-never-written"));
    }
}
