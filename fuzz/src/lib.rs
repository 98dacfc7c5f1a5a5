//! What the fuzz targets share: the shipped policies, compiled once, a
//! gate on the embedded store, and a small text form of an HTTP request
//! that seeds can be written in by hand.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tollgate_core::engine::charge::{counter_amount, Usage};
use tollgate_core::gate::{Gate, GateConfig, ManualClock};
use tollgate_core::policy::{compile_sources, CompiledPolicy, SourceFile, Unit};
use tollgate_core::store::MemoryStore;

/// The policies the repository ships, as `tollgate serve` would load them.
pub const SHIPPED: [(&str, &str); 4] = [
    ("budgets.yaml", include_str!("../../policies/budgets.yaml")),
    ("keys.yaml", include_str!("../../policies/keys.yaml")),
    (
        "notifiers.yaml",
        include_str!("../../policies/notifiers.yaml"),
    ),
    ("pricing.yaml", include_str!("../../policies/pricing.yaml")),
];

/// An `attributes:` section that uses every way a request is read:
/// trusted headers (a label and the replay key among them), client
/// attributes, modality paths and a model header. The shipped set has
/// none, so without it the mapper's trusted paths would go unexercised.
pub const ATTRIBUTES: &str = r#"
attributes:
  unknown_keys: allow
  client_attributes: [action, attempt_kind, workflow, labels.stage]
  trusted_headers:
    customer: x-customer-id
    team: x-team
    labels.plan: x-customer-plan
    request_id: x-request-id
  modality_paths:
    /v2/generate-image: image
  model_header: x-ai-model
"#;

fn compile(files: &[(&str, &str)]) -> CompiledPolicy {
    let sources: Vec<SourceFile> = files
        .iter()
        .map(|(name, text)| SourceFile {
            name: name.to_string(),
            text: text.to_string(),
        })
        .collect();
    match compile_sources(&sources) {
        Ok(p) => p,
        Err(e) => panic!("the fuzz policies must compile:\n{e}"),
    }
}

fn files(with_attributes: bool) -> Vec<(&'static str, &'static str)> {
    let mut files = SHIPPED.to_vec();
    if with_attributes {
        files.push(("attributes.yaml", ATTRIBUTES));
    }
    files
}

/// The shipped policies alone, or with [`ATTRIBUTES`], compiled once.
pub fn policy(with_attributes: bool) -> &'static CompiledPolicy {
    static PLAIN: OnceLock<CompiledPolicy> = OnceLock::new();
    static MAPPED: OnceLock<CompiledPolicy> = OnceLock::new();
    let cell = if with_attributes { &MAPPED } else { &PLAIN };
    cell.get_or_init(|| compile(&files(with_attributes)))
}

/// [`policy`] compiled afresh, for a gate of its own (a compiled policy
/// is not `Clone`).
pub fn fresh_policy(with_attributes: bool) -> CompiledPolicy {
    compile(&files(with_attributes))
}

/// 2026-03-10 14:30 UTC, a Tuesday: inside every window the policies use.
pub const NOW_MS: i64 = 1_773_153_000_000;

/// A fresh gate on an empty embedded store, so that every input is
/// decided alone and a crash reproduces from its input. The store
/// timeout is long: a slow fuzzing machine must not turn into a store
/// fault.
pub fn gate(policy: CompiledPolicy) -> Gate {
    let config = GateConfig {
        store_timeout: Duration::from_secs(30),
        ..GateConfig::default()
    };
    Gate::new(
        policy,
        Arc::new(MemoryStore::new(10_000)),
        Arc::new(ManualClock::new(NOW_MS)),
        config,
    )
}

/// One single-threaded runtime for the whole process.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
    }
    RT.with(|rt| rt.block_on(f))
}

/// Prices `usage` in every unit at every shipped price (and at none):
/// a charge may be refused, but never negative and never over the
/// counter bound.
pub fn check_charges(usage: &Usage) {
    let policy = policy(false);
    let mut prices: Vec<(Option<&str>, Option<_>)> = vec![(None, None), (Some("unpriced"), None)];
    for (model, price, _) in &policy.set.pricing.models {
        prices.push((Some(model.as_str()), Some(price)));
    }
    for unit in Unit::ALL {
        for (model, price) in &prices {
            if let Ok(amount) = counter_amount(unit, usage, *price, *model) {
                assert!(amount >= 0, "{unit:?} charge {amount} for {usage:?}");
                assert!(
                    amount <= tollgate_core::engine::charge::MAX_COUNTER,
                    "{unit:?} charge {amount} over the counter bound"
                );
            }
        }
    }
}

/// An HTTP request read from its text form:
///
/// ```text
/// POST /v1/chat/completions
/// authorization: Bearer sk-test
/// =downgrade: header
/// #id envoy-request-id
///
/// {"model":"gpt-4o",...}
/// ```
///
/// The first line is the method and path. Each line up to the first
/// empty one is a header (`name: value`, the name lower-cased, the value
/// raw bytes), a route context entry (`=name: value`) or the proxy's
/// request id (`#id value`). What follows the empty line is the body;
/// without an empty line there is no body.
#[derive(Debug, Clone, Default)]
pub struct TextRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub context: HashMap<String, String>,
    pub proxy_request_id: Option<String>,
    pub body: Option<Vec<u8>>,
}

impl TextRequest {
    pub fn parse(data: &[u8]) -> TextRequest {
        let mut req = TextRequest::default();
        let mut rest = data;
        let mut first = true;
        loop {
            let (line, tail) = match rest.iter().position(|&b| b == b'\n') {
                Some(at) => (&rest[..at], Some(&rest[at + 1..])),
                None => (rest, None),
            };
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if first {
                first = false;
                let text = String::from_utf8_lossy(line);
                let (method, path) = text.split_once(' ').unwrap_or(("POST", &text));
                req.method = method.to_string();
                req.path = path.to_string();
            } else if line.is_empty() && tail.is_some() {
                req.body = tail.map(<[u8]>::to_vec);
                return req;
            } else if let Some(id) = line.strip_prefix(b"#id ") {
                req.proxy_request_id = Some(String::from_utf8_lossy(id).into_owned());
            } else {
                let (name, value) = match line.iter().position(|&b| b == b':') {
                    Some(at) => (&line[..at], &line[at + 1..]),
                    None => (line, &b""[..]),
                };
                let value = value.strip_prefix(b" ").unwrap_or(value);
                if let Some(name) = name.strip_prefix(b"=") {
                    req.context.insert(
                        String::from_utf8_lossy(name).into_owned(),
                        String::from_utf8_lossy(value).into_owned(),
                    );
                } else {
                    req.headers.push((
                        String::from_utf8_lossy(name).to_ascii_lowercase(),
                        value.to_vec(),
                    ));
                }
            }
            match tail {
                Some(t) => rest = t,
                None => return req,
            }
        }
    }

    /// The request as a front end hands it to the mapper.
    pub fn view(&self) -> tollgate::server::http_request::HttpRequest<'_> {
        tollgate::server::http_request::HttpRequest {
            method: &self.method,
            path: &self.path,
            headers: self.headers.clone(),
            context: Some(&self.context),
            body: self.body.as_deref(),
            proxy_request_id: self.proxy_request_id.as_deref(),
        }
    }

    /// The first header of that name, as the mapper finds it.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// A small repeatable generator, for split points drawn from a seed byte.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}
