//! `tollgate explain`: which rules a request meets, and the decision on an
//! empty store.

use std::path::PathBuf;
use std::process::ExitCode;

use tollgate_core::engine::request::parse_amount;
use tollgate_core::engine::Estimate;
use tollgate_core::gate::{CheckInput, Clock, SystemClock};
use tollgate_core::policy;

use super::args::{parse_attrs, split_pair};

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
    match tollgate::explain::explain(policy, input, SystemClock.now()) {
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

fn explain_input(args: &ExplainArgs) -> Result<CheckInput, String> {
    let attributes = parse_attrs(&args.attrs)?;
    let estimate = parse_estimate(&args.estimate)?;
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

/// `--estimate FIELD=VALUE` pairs.
fn parse_estimate(pairs: &[String]) -> Result<Estimate, String> {
    let mut estimate = Estimate::default();
    for pair in pairs {
        let (name, value) = split_pair(pair)?;
        let int = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{name} must be a whole number"))
        };
        let dec = || parse_amount(name, value).map_err(|e| e.to_string());
        match name {
            "input_tokens" => estimate.input_tokens = Some(int()?),
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
    Ok(estimate)
}
