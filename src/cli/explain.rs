//! `tollgate explain`: which rules a request meets, and the decision on an
//! empty store.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use axum::http::Method;
use hyper::body::Bytes;

use tollgate_core::engine::request::parse_amount;
use tollgate_core::engine::Estimate;
use tollgate_core::gate::{CheckInput, Clock, LearnedRow, SystemClock};
use tollgate_core::policy;

use super::args::{parse_attrs, split_pair};
use super::client::{Server, ServerTlsArgs};
use super::runtime::{runtime, Threads};

#[derive(clap::Args)]
pub(super) struct ExplainArgs {
    /// Policy directory.
    dir: PathBuf,
    /// A route attribute (Envoy context_extensions, a trusted header), such
    /// as team=growth or labels.tier=gold; beats the key registry.
    #[arg(long = "attr", value_name = "NAME=VALUE")]
    attrs: Vec<String>,
    /// An attribute as a client's own header sets it; only fills what the
    /// route and the registry leave empty, and only for the policy's
    /// `client_attributes`.
    #[arg(long = "client-attr", value_name = "NAME=VALUE")]
    client_attrs: Vec<String>,
    /// Explain as for a route that cannot switch the model (ext_authz,
    /// nginx, forward auth without `downgrade: header`).
    #[arg(long)]
    no_model_switch: bool,
    /// A raw API key to look up in the key registry (hashed, never printed).
    #[arg(long)]
    api_key: Option<String>,
    /// An estimate field: input_tokens, cached_input_tokens, output_tokens,
    /// images, image_quality, video_seconds or audio_seconds.
    #[arg(long = "estimate", value_name = "FIELD=VALUE")]
    estimate: Vec<String>,
    /// A request body (JSON) to read the model and estimate from, as the
    /// HTTP front ends read one: its prompt is counted with the model's
    /// tokenizer. `--estimate` fields then override what it says.
    #[arg(long, value_name = "FILE")]
    body: Option<PathBuf>,
    /// A running server's HTTP address (http://127.0.0.1:8080): explain
    /// with the output tokens it learned from settled calls
    /// (`defaults.output_tokens: learned`), read from its dashboard API.
    #[arg(long)]
    server: Option<String>,
    #[command(flatten)]
    tls: ServerTlsArgs,
}

pub(super) fn explain(args: ExplainArgs) -> ExitCode {
    let policy = match policy::load_dirs(std::slice::from_ref(&args.dir)) {
        Ok(p) => p,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let input = match explain_input(&args) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let learned = match &args.server {
        None => None,
        Some(server) => match learned_from(server, &args.tls) {
            Ok(rows) => Some(tollgate::explain::Learned {
                server: server.clone(),
                rows,
            }),
            Err(e) => {
                eprintln!("error: {server}: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    match tollgate::explain::explain_learned(policy, input, SystemClock.now(), learned) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", e.code());
            ExitCode::FAILURE
        }
    }
}

/// The learned output tokens in a running server's `GET /v1/dashboard`.
fn learned_from(server: &str, tls: &ServerTlsArgs) -> Result<Vec<LearnedRow>, String> {
    let runtime = runtime(Threads::One).map_err(|_| "cannot start a runtime".to_string())?;
    runtime.block_on(async {
        let server = Server::new(server, tls)?;
        let answer = tollgate::http_client::send_with(
            &server.target,
            server.tls,
            Method::GET,
            "/v1/dashboard",
            &[],
            Bytes::new(),
            Duration::from_secs(10),
        )
        .await?;
        if answer.status != 200 {
            return Err(format!(
                "HTTP {} from /v1/dashboard: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            ));
        }
        let view: serde_json::Value = serde_json::from_slice(&answer.body)
            .map_err(|e| format!("bad /v1/dashboard answer: {e}"))?;
        serde_json::from_value(view["learned_output"]["entries"].clone())
            .map_err(|e| format!("bad learned_output in /v1/dashboard: {e}"))
    })
}

fn explain_input(args: &ExplainArgs) -> Result<CheckInput, String> {
    let mut attributes = parse_attrs(&args.attrs)?;
    let mut estimate = Estimate::default();
    if let Some(path) = &args.body {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let facts = tollgate::server::body::read(&bytes);
        if attributes.model.is_none() {
            attributes.model = facts.model;
        }
        estimate = facts.estimate;
    }
    parse_estimate(&args.estimate, &mut estimate)?;
    Ok(CheckInput {
        attributes,
        client_attributes: parse_attrs(&args.client_attrs)?,
        api_key: args.api_key.clone(),
        estimate,
        request_id: None,
        can_switch_model: !args.no_model_switch,
        estimate_is_final: false,
    })
}

/// `--estimate FIELD=VALUE` pairs, over what `estimate` holds.
fn parse_estimate(pairs: &[String], estimate: &mut Estimate) -> Result<(), String> {
    for pair in pairs {
        let (name, value) = split_pair(pair)?;
        let int = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{name} must be a whole number"))
        };
        let dec = || parse_amount(name, value).map_err(|e| e.to_string());
        match name {
            "input_tokens" => {
                estimate.input_tokens = Some(int()?);
                // A number given beats the body's text.
                estimate.prompt = None;
            }
            "cached_input_tokens" => estimate.cached_input_tokens = Some(int()?),
            "output_tokens" => estimate.output_tokens = Some(int()?),
            "images" => estimate.images = Some(int()?),
            "image_quality" => estimate.image_quality = Some(value.to_string()),
            "video_seconds" => estimate.video_seconds = Some(dec()?),
            "audio_seconds" => estimate.audio_seconds = Some(dec()?),
            "cache_write_tokens" => estimate.detail.cache_write_tokens = int()?,
            "reasoning_tokens" => estimate.detail.reasoning_tokens = int()?,
            "audio_input_tokens" => estimate.detail.audio_input_tokens = int()?,
            "audio_output_tokens" => estimate.detail.audio_output_tokens = int()?,
            "batch" => {
                estimate.detail.batch = value
                    .parse::<bool>()
                    .map_err(|_| "batch must be true or false".to_string())?
            }
            other => match other.strip_prefix("calls.") {
                Some(call) if !call.is_empty() => {
                    estimate.detail.calls.insert(call.to_string(), int()?);
                }
                _ => return Err(format!("unknown estimate field {other:?}")),
            },
        }
    }
    Ok(())
}
