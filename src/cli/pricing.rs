//! `tollgate pricing`: the price charged for a model and where it comes
//! from; and the models a running server saw without a price.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use axum::http::Method;
use hyper::body::Bytes;
use tollgate::reload;
use tollgate::usage::MissingReport;
use tollgate_core::engine::tokens::tokenizer_for;
use tollgate_core::engine::window::format_utc;
use tollgate_core::policy::{ImagePrice, ModelPrice, PriceSource, Tokenizer, UnpricedModels};

use super::client::{Server, ServerTlsArgs};
use super::runtime::{runtime, Threads};

#[derive(clap::Subcommand)]
pub(super) enum PricingCommand {
    /// The price tollgate charges for a model, and where it was written.
    Show(ShowArgs),
    /// Models a running server has seen in requests that have no price.
    Missing(MissingArgs),
}

#[derive(clap::Args)]
pub(super) struct ShowArgs {
    /// The model name, as requests send it.
    model: String,
    /// Policy directory; may be given several times.
    #[arg(
        long = "policies",
        env = "TOLLGATE_POLICIES",
        value_delimiter = ',',
        required = true
    )]
    policies: Vec<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub(super) struct MissingArgs {
    /// A running server's HTTP address, such as http://127.0.0.1:8080.
    #[arg(long)]
    server: String,
    #[command(flatten)]
    tls: ServerTlsArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub(super) fn pricing(command: PricingCommand) -> ExitCode {
    match command {
        PricingCommand::Show(args) => show(&args),
        PricingCommand::Missing(args) => missing(&args),
    }
}

fn show(args: &ShowArgs) -> ExitCode {
    let policy = match reload::load(&args.policies, true) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let found = policy.priced(&args.model);
    if args.json {
        let value = match found {
            Some((price, origin, source)) => serde_json::json!({
                "model": args.model,
                "price": parts(price).into_iter().collect::<serde_json::Map<_, _>>(),
                "source": source_name(source),
                "origin": origin.to_string(),
                "tokenizer": tokenizer_for(Some(&args.model), Some(price)).name(),
            }),
            None => serde_json::json!({ "model": args.model, "price": null }),
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return if found.is_some() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let Some((price, origin, source)) = found else {
        let consequence = match policy.set.pricing.unpriced_models {
            UnpricedModels::Reject => {
                "a request for it under a spend rule is refused with `unpriced_model`"
            }
            UnpricedModels::Error => "no spend rule can match it (validation makes sure of that)",
        };
        println!("{}: no price; {consequence}", args.model);
        return ExitCode::FAILURE;
    };
    println!("model:  {}", args.model);
    for (name, value) in parts(price) {
        println!("  {name}: {}", value.as_str().unwrap_or_default());
    }
    println!("from:   {origin} ({})", source_text(source));
    let tokenizer = tokenizer_for(Some(&args.model), Some(price));
    println!(
        "tokens: {tokenizer} ({}, {})",
        match tokenizer {
            Tokenizer::Approximate => "4 characters a token",
            _ => "exact, for prompts up to 64 KiB",
        },
        match price.tokenizer {
            Some(_) => "its price entry's tokenizer",
            None => "by its name",
        }
    );
    ExitCode::SUCCESS
}

fn source_name(source: PriceSource) -> &'static str {
    match source {
        PriceSource::Policy => "policy",
        PriceSource::PolicyGlob => "policy_glob",
        PriceSource::Catalog => "catalog",
    }
}

fn source_text(source: PriceSource) -> &'static str {
    match source {
        PriceSource::Policy => "pricing.models, under its own name",
        PriceSource::PolicyGlob => "pricing.models, a glob",
        PriceSource::Catalog => "an imported catalog",
    }
}

/// Each price part as (name, exact decimal text), USD.
fn parts(p: &ModelPrice) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    let mut put = |name: &str, v: Option<rust_decimal::Decimal>| {
        if let Some(v) = v {
            out.push((
                name.to_string(),
                serde_json::Value::String(v.normalize().to_string()),
            ));
        }
    };
    put("input_per_mtok", p.input_per_mtok);
    put("cached_input_per_mtok", p.cached_input_per_mtok);
    put("output_per_mtok", p.output_per_mtok);
    put("per_request", p.per_request);
    match &p.per_image {
        Some(ImagePrice::Flat(d)) => put("per_image", Some(*d)),
        Some(ImagePrice::ByQuality(q)) => {
            for (quality, d) in q {
                put(&format!("per_image.{quality}"), Some(*d));
            }
        }
        None => {}
    }
    put("per_video_second", p.per_video_second);
    put("per_audio_minute", p.per_audio_minute);
    if let Some(n) = p.default_output_tokens {
        out.push((
            "default_output_tokens".to_string(),
            serde_json::Value::String(n.to_string()),
        ));
    }
    out
}

fn missing(args: &MissingArgs) -> ExitCode {
    let runtime = match runtime(Threads::One) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let report = runtime.block_on(async {
        let server = Server::new(&args.server, &args.tls)?;
        let answer = tollgate::http_client::send_with(
            &server.target,
            server.tls,
            Method::GET,
            "/v1/pricing/missing",
            &[],
            Bytes::new(),
            Duration::from_secs(10),
        )
        .await?;
        if answer.status != 200 {
            return Err(format!(
                "HTTP {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            ));
        }
        serde_json::from_slice::<MissingReport>(&answer.body)
            .map_err(|e| format!("bad /v1/pricing/missing answer: {e}"))
    });
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}: {e}", args.server);
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    if report.models.is_empty() {
        println!(
            "every model seen has a price (policy version {})",
            report.policy_version
        );
        return ExitCode::SUCCESS;
    }
    let width = report
        .models
        .iter()
        .map(|m| m.model.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!("{:<width$}  {:>8}  LAST SEEN", "MODEL", "REQUESTS");
    for m in &report.models {
        println!(
            "{:<width$}  {:>8}  {}",
            m.model,
            m.requests,
            format_utc(m.last_seen)
        );
    }
    if report.overflow > 0 {
        println!(
            "and {} requests for other models past the {} kept",
            report.overflow, report.max_models
        );
    }
    ExitCode::SUCCESS
}
