//! How much of each unit a request uses, and what that costs, in exact
//! decimal arithmetic. Charges are turned into integer counter amounts
//! here, rounding up so that a budget is never under-charged.

use rust_decimal::Decimal;

use super::request::Estimate;
use super::tokens;
use super::RequestError;
use crate::policy::{Defaults, ImagePrice, ModelPrice, Tokenizer, Unit};

/// Usage with every field known: an estimate filled from defaults, or the
/// actual usage reported at settle.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Usage {
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub images: u64,
    pub image_quality: String,
    pub video_jobs: u64,
    pub video_seconds: Decimal,
    pub audio_seconds: Decimal,
    pub detail: Detail,
}

/// How the tokens of a usage are billed beyond input, cached input and
/// output. Each token count is a part of `input_tokens` or
/// `output_tokens`, not in addition to them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Detail {
    /// Of the input tokens, those written to a prompt cache (Anthropic's
    /// `cache_creation_input_tokens`).
    pub cache_write_tokens: u64,
    /// Of the output tokens, those spent reasoning.
    pub reasoning_tokens: u64,
    /// Of the input and output tokens, the audio ones.
    pub audio_input_tokens: u64,
    pub audio_output_tokens: u64,
    /// A call through a provider's batch API.
    pub batch: bool,
    /// Calls made within the request that carry a fee (`web_search`), by
    /// name, with how many.
    pub calls: std::collections::BTreeMap<String, u64>,
}

/// What an estimate is filled from besides itself: the model it is priced
/// at, and what the policy (and the gate's learned table) assume.
#[derive(Debug, Clone, Copy)]
pub struct Basis<'a> {
    pub model: Option<&'a str>,
    pub modality: Option<&'a str>,
    pub price: Option<&'a ModelPrice>,
    pub defaults: &'a Defaults,
    /// The output tokens learned from this model's settled calls in the
    /// request's workflow, when the policy learns them
    /// (`defaults.output_tokens: learned`) and enough were settled.
    pub learned_output: Option<u64>,
}

/// The output tokens learned from settled calls for one request's
/// workflow, by model: what the gate's table (`gate::learned`) holds for
/// the keys that have enough samples, handed to the engine as data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LearnedOutput {
    pub by_model: Vec<(String, u64)>,
}

impl LearnedOutput {
    /// The learned output of `model`, when the policy learns it.
    pub fn get(&self, policy: &crate::policy::CompiledPolicy, model: Option<&str>) -> Option<u64> {
        policy.set.defaults.learn_output?;
        let model = model?;
        self.by_model
            .iter()
            .find(|(m, _)| m == model)
            .map(|(_, n)| *n)
    }
}

/// Where an estimate's input tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputSource {
    /// Counted from the prompt's text with this tokenizer
    /// (`Approximate`: at four characters a token).
    Prompt(Tokenizer),
    /// Approximated although the model has an exact tokenizer: the prompt
    /// is over `tokens::EXACT_MAX_BYTES`.
    PromptTooLarge(Tokenizer),
    /// The number the request gave.
    Request,
    /// `defaults.input_tokens`.
    Default,
    /// None: not a text request.
    None,
}

/// Where an estimate's output tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputSource {
    /// The request's own maximum (`max_tokens` and the like).
    Request,
    /// Learned from settled calls (`defaults.output_tokens: learned`).
    Learned,
    /// The model's `default_output_tokens`.
    Model,
    /// `defaults.output_tokens`.
    Default,
    /// None: not a text request.
    None,
}

impl Basis<'_> {
    fn text(&self) -> bool {
        matches!(self.modality, None | Some("text"))
    }

    pub fn input_source(&self, est: &Estimate) -> InputSource {
        if let Some(prompt) = &est.prompt {
            let tokenizer = tokens::tokenizer_for(self.model, self.price);
            return match prompt.method(tokenizer) {
                Tokenizer::Approximate if tokenizer != Tokenizer::Approximate => {
                    InputSource::PromptTooLarge(tokenizer)
                }
                method => InputSource::Prompt(method),
            };
        }
        match (est.input_tokens, self.modality) {
            (Some(_), _) => InputSource::Request,
            (None, None | Some("text") | Some("embedding")) => InputSource::Default,
            (None, _) => InputSource::None,
        }
    }

    pub fn output_source(&self, est: &Estimate) -> OutputSource {
        if est.output_tokens.is_some() {
            OutputSource::Request
        } else if !self.text() {
            OutputSource::None
        } else if self.learned_output.is_some() {
            OutputSource::Learned
        } else if self.price.and_then(|p| p.default_output_tokens).is_some() {
            OutputSource::Model
        } else {
            OutputSource::Default
        }
    }
}

impl Basis<'_> {
    /// The output tokens of [`Usage::from_estimate`] alone, without
    /// counting the prompt.
    pub fn output_tokens(&self, est: &Estimate) -> u64 {
        let defaults = self.defaults;
        est.output_tokens.unwrap_or(match self.output_source(est) {
            OutputSource::Learned => self.learned_output.unwrap_or(defaults.output_tokens),
            OutputSource::Model => self
                .price
                .and_then(|p| p.default_output_tokens)
                .unwrap_or(defaults.output_tokens),
            OutputSource::Default => defaults.output_tokens,
            OutputSource::Request | OutputSource::None => 0,
        })
    }
}

impl Usage {
    /// Fills what the estimate leaves open, by modality: text counts the
    /// prompt with the model's tokenizer (else assumes the default prompt)
    /// and assumes the request's maximum, else the learned output, else
    /// the model's or the policy's default; images, video and audio assume
    /// one default-sized item.
    pub fn from_estimate(est: &Estimate, basis: &Basis) -> Usage {
        let modality = basis.modality;
        let defaults = basis.defaults;
        let input_tokens = match &est.prompt {
            Some(prompt) => prompt.count(tokens::tokenizer_for(basis.model, basis.price)),
            None => est.input_tokens.unwrap_or(match modality {
                None | Some("text") | Some("embedding") => defaults.input_tokens,
                _ => 0,
            }),
        };
        let output_tokens = basis.output_tokens(est);
        Usage {
            input_tokens,
            cached_input_tokens: est.cached_input_tokens.unwrap_or(0),
            output_tokens,
            images: est.images.unwrap_or(if modality == Some("image") {
                defaults.images
            } else {
                0
            }),
            image_quality: est
                .image_quality
                .clone()
                .unwrap_or_else(|| defaults.image_quality.clone()),
            video_jobs: u64::from(modality == Some("video")),
            video_seconds: est.video_seconds.unwrap_or(if modality == Some("video") {
                defaults.video_seconds
            } else {
                Decimal::ZERO
            }),
            audio_seconds: est.audio_seconds.unwrap_or(if modality == Some("audio") {
                defaults.audio_seconds
            } else {
                Decimal::ZERO
            }),
            detail: est.detail.clone(),
        }
    }
}

/// The counter amount a usage adds to a counter of `unit`. `price` is only
/// consulted for spend; `model` only names it in errors.
pub fn counter_amount(
    unit: Unit,
    usage: &Usage,
    price: Option<&ModelPrice>,
    model: Option<&str>,
) -> Result<i64, RequestError> {
    let whole = |n: u64| {
        i64::try_from(n)
            .ok()
            .filter(|v| *v <= MAX_COUNTER)
            .ok_or_else(|| RequestError::too_large(unit))
    };
    let seconds = |d: Decimal| to_counter(d, 1, unit);
    match unit {
        Unit::Requests | Unit::Concurrent => Ok(1),
        Unit::InputTokens => whole(usage.input_tokens),
        Unit::OutputTokens => whole(usage.output_tokens),
        Unit::Tokens => whole(usage.input_tokens.saturating_add(usage.output_tokens)),
        Unit::Images => whole(usage.images),
        Unit::VideoJobs => whole(usage.video_jobs),
        Unit::VideoSeconds => seconds(usage.video_seconds),
        Unit::AudioSeconds => seconds(usage.audio_seconds),
        Unit::Spend => {
            let model = model.ok_or_else(|| RequestError::Unpriced {
                message: "the request names no model, and a spend rule applies to it".to_string(),
            })?;
            let price = price.ok_or_else(|| RequestError::Unpriced {
                message: format!("model `{model}` has no price, and a spend rule applies to it"),
            })?;
            to_counter(cost(price, usage, model)?, Unit::Spend.scale(), unit)
        }
    }
}

/// Exact USD cost of a usage at a model's prices. Parts the model has no
/// price for cost nothing, but a usage none of whose parts is priced is an
/// error rather than a free request.
pub fn cost(price: &ModelPrice, usage: &Usage, model: &str) -> Result<Decimal, RequestError> {
    let mtok = Decimal::from(1_000_000);
    let mut total = Decimal::ZERO;
    let mut priced = false;
    let mut unpriced_parts: Vec<&str> = Vec::new();
    let overflow = || RequestError::too_large(Unit::Spend);
    let mut add =
        |part: Option<Decimal>, qty: Decimal, name: &'static str| -> Result<(), RequestError> {
            if qty.is_zero() {
                return Ok(());
            }
            match part {
                Some(p) => {
                    priced = true;
                    let c = p.checked_mul(qty).ok_or_else(overflow)?;
                    total = total.checked_add(c).ok_or_else(overflow)?;
                }
                None => unpriced_parts.push(name),
            }
            Ok(())
        };
    let detail = &usage.detail;
    // Above its threshold, a long-context tier's prices replace the base
    // ones for every token of the request.
    let long = price
        .long_context
        .as_ref()
        .filter(|l| usage.input_tokens > l.above_input_tokens);
    let tier = |pick: fn(&crate::policy::LongContext) -> Option<Decimal>, base: Option<Decimal>| {
        long.and_then(pick).or(base)
    };
    let input_rate = tier(|l| l.input_per_mtok, price.input_per_mtok);
    let cached_rate = tier(|l| l.cached_input_per_mtok, price.cached_input_per_mtok).or(input_rate);
    let write_rate = tier(|l| l.cache_write_per_mtok, price.cache_write_per_mtok).or(input_rate);
    let output_rate = tier(|l| l.output_per_mtok, price.output_per_mtok);
    let reasoning_rate = price.reasoning_per_mtok.or(output_rate);
    let audio_in_rate = price.audio_input_per_mtok.or(input_rate);
    let audio_out_rate = price.audio_output_per_mtok.or(output_rate);
    // A batch call takes the discount off every token price.
    let factor = match (detail.batch, price.batch_discount) {
        (true, Some(d)) => Decimal::ONE - d,
        _ => Decimal::ONE,
    };
    // Worked out only for a part the usage has (`add` skips the others),
    // since most calls have two or three of the seven.
    let per_token =
        |rate: Option<Decimal>, n: u64| rate.filter(|_| n > 0).map(|p| p * factor / mtok);
    // The parts of the input and of the output, each counted once: a
    // report whose parts add up to more than its total is taken as far as
    // the total goes.
    let mut input_left = usage.input_tokens;
    let mut take_input = |n: u64| {
        let n = n.min(input_left);
        input_left -= n;
        n
    };
    let cached = take_input(usage.cached_input_tokens);
    let written = take_input(detail.cache_write_tokens);
    let audio_in = take_input(detail.audio_input_tokens);
    let uncached = input_left;
    let mut output_left = usage.output_tokens;
    let mut take_output = |n: u64| {
        let n = n.min(output_left);
        output_left -= n;
        n
    };
    let reasoning = take_output(detail.reasoning_tokens);
    let audio_out = take_output(detail.audio_output_tokens);
    let text_output = output_left;
    add(
        per_token(input_rate, uncached),
        Decimal::from(uncached),
        "input tokens",
    )?;
    add(
        per_token(cached_rate, cached),
        Decimal::from(cached),
        "cached input tokens",
    )?;
    add(
        per_token(write_rate, written),
        Decimal::from(written),
        "cache write tokens",
    )?;
    add(
        per_token(audio_in_rate, audio_in),
        Decimal::from(audio_in),
        "audio input tokens",
    )?;
    add(
        per_token(output_rate, text_output),
        Decimal::from(text_output),
        "output tokens",
    )?;
    add(
        per_token(reasoning_rate, reasoning),
        Decimal::from(reasoning),
        "reasoning tokens",
    )?;
    add(
        per_token(audio_out_rate, audio_out),
        Decimal::from(audio_out),
        "audio output tokens",
    )?;
    for (call, n) in &detail.calls {
        add(
            price.per_call.get(call).copied(),
            Decimal::from(*n),
            "calls with a fee",
        )?;
    }
    add(price.per_request, Decimal::ONE, "requests")?;
    let image_rate = match &price.per_image {
        None => None,
        Some(ImagePrice::Flat(p)) => Some(*p),
        Some(ImagePrice::ByQuality(by)) => match by.get(&usage.image_quality) {
            Some(p) => Some(*p),
            None if usage.images == 0 => None,
            None => {
                let known: Vec<&str> = by.keys().map(String::as_str).collect();
                return Err(RequestError::invalid(format!(
                    "image quality {:?} has no price for model `{model}`; priced qualities: {}",
                    usage.image_quality,
                    known.join(", ")
                )));
            }
        },
    };
    add(image_rate, Decimal::from(usage.images), "images")?;
    add(price.per_video_second, usage.video_seconds, "video seconds")?;
    let per_audio_second = price.per_audio_minute.map(|p| p / Decimal::from(60));
    add(per_audio_second, usage.audio_seconds, "audio seconds")?;
    if !priced && !unpriced_parts.is_empty() {
        return Err(RequestError::Unpriced {
            message: format!(
                "model `{model}` has no price for {}, and a spend rule applies to it",
                unpriced_parts.join(", ")
            ),
        });
    }
    Ok(total)
}

/// Converts a natural amount to counter units (`scale` per unit), rounding
/// up: a charge never rounds down to less than was used.
pub fn to_counter(amount: Decimal, scale: i64, unit: Unit) -> Result<i64, RequestError> {
    let scaled = amount
        .checked_mul(Decimal::from(scale))
        .ok_or_else(|| RequestError::too_large(unit))?
        .ceil();
    i64::try_from(scaled)
        .ok()
        .filter(|v| *v <= MAX_COUNTER)
        .ok_or_else(|| RequestError::too_large(unit))
}

/// The largest amount a counter may hold; keeps sums far from overflow in
/// every store (Lua numbers are exact up to 2^53).
pub const MAX_COUNTER: i64 = 1 << 52;

/// A counter amount back in the unit's natural scale.
pub fn from_counter(value: i64, unit: Unit) -> Decimal {
    // A counter holds the unit's smallest step (a millionth of a dollar
    // for spend): moving the decimal point is exact, and no division.
    Decimal::new(value, unit.decimals()).normalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::str::FromStr;

    #[test]
    fn a_counter_value_reads_as_its_division_by_the_units_scale() {
        for unit in Unit::ALL {
            for v in [
                0,
                1,
                -1,
                7,
                999_999,
                1_000_000,
                1_500_000,
                123_456_789,
                i64::MAX,
                i64::MIN,
            ] {
                let divided = (Decimal::from(v) / Decimal::from(unit.scale())).normalize();
                let read = from_counter(v, unit);
                assert_eq!(read, divided, "{v} {unit}");
                assert_eq!(read.to_string(), divided.to_string(), "{v} {unit}");
            }
        }
    }

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn gpt4o() -> ModelPrice {
        ModelPrice {
            input_per_mtok: Some(d("2.50")),
            output_per_mtok: Some(d("10.00")),
            cached_input_per_mtok: Some(d("1.25")),
            ..Default::default()
        }
    }

    fn sonnet() -> ModelPrice {
        ModelPrice {
            input_per_mtok: Some(d("3")),
            cached_input_per_mtok: Some(d("0.30")),
            cache_write_per_mtok: Some(d("3.75")),
            output_per_mtok: Some(d("15")),
            long_context: Some(crate::policy::LongContext {
                above_input_tokens: 200_000,
                input_per_mtok: Some(d("6")),
                cached_input_per_mtok: Some(d("0.60")),
                cache_write_per_mtok: Some(d("7.50")),
                output_per_mtok: Some(d("22.50")),
            }),
            batch_discount: Some(d("0.5")),
            per_call: [("web_search".to_string(), d("0.01"))].into(),
            ..Default::default()
        }
    }

    fn tokens(input: u64, cached: u64, output: u64, detail: Detail) -> Usage {
        Usage {
            input_tokens: input,
            cached_input_tokens: cached,
            output_tokens: output,
            detail,
            ..Default::default()
        }
    }

    #[test]
    fn anthropic_cache_writes_and_reads_are_priced_apart() {
        // 10 000 input: 6 000 read from the cache, 3 000 written to it,
        // 1 000 plain; 2 000 output.
        let usage = tokens(
            10_000,
            6_000,
            2_000,
            Detail {
                cache_write_tokens: 3_000,
                ..Default::default()
            },
        );
        // 1000*3e-6 + 6000*0.3e-6 + 3000*3.75e-6 + 2000*15e-6
        // = 0.003 + 0.0018 + 0.01125 + 0.03
        assert_eq!(cost(&sonnet(), &usage, "m").unwrap(), d("0.04605"));
        // Without a cache write price, writes cost as input.
        let plain = ModelPrice {
            cache_write_per_mtok: None,
            ..sonnet()
        };
        assert_eq!(cost(&plain, &usage, "m").unwrap(), d("0.0438"));
    }

    #[test]
    fn reasoning_tokens_have_their_own_rate_or_the_output_rate() {
        let flash = ModelPrice {
            input_per_mtok: Some(d("0.15")),
            output_per_mtok: Some(d("0.60")),
            reasoning_per_mtok: Some(d("3.50")),
            ..Default::default()
        };
        let usage = tokens(
            1_000,
            0,
            5_000,
            Detail {
                reasoning_tokens: 4_000,
                ..Default::default()
            },
        );
        // 1000*0.15e-6 + 1000*0.6e-6 + 4000*3.5e-6 = 0.00015 + 0.0006 + 0.014
        assert_eq!(cost(&flash, &usage, "m").unwrap(), d("0.01475"));
        let as_output = ModelPrice {
            reasoning_per_mtok: None,
            ..flash
        };
        // 0.00015 + 5000*0.6e-6
        assert_eq!(cost(&as_output, &usage, "m").unwrap(), d("0.00315"));
    }

    #[test]
    fn a_long_context_tier_prices_every_token_above_its_threshold() {
        let at_threshold = tokens(200_000, 0, 1_000, Detail::default());
        // 200000*3e-6 + 1000*15e-6 = 0.6 + 0.015
        assert_eq!(cost(&sonnet(), &at_threshold, "m").unwrap(), d("0.615"));
        let above = tokens(
            200_001,
            100_000,
            1_000,
            Detail {
                cache_write_tokens: 1,
                ..Default::default()
            },
        );
        // 100000*6e-6 + 100000*0.6e-6 + 1*7.5e-6 + 1000*22.5e-6
        // = 0.6 + 0.06 + 0.0000075 + 0.0225
        assert_eq!(cost(&sonnet(), &above, "m").unwrap(), d("0.6825075"));
    }

    #[test]
    fn a_batch_call_takes_the_discount_off_the_tokens_only() {
        let mut detail = Detail {
            batch: true,
            ..Default::default()
        };
        detail.calls.insert("web_search".into(), 3);
        let usage = tokens(1_000, 0, 1_000, detail);
        // (1000*3e-6 + 1000*15e-6) * 0.5 + 3 * 0.01 = 0.009 + 0.03
        assert_eq!(cost(&sonnet(), &usage, "m").unwrap(), d("0.039"));
        let full = ModelPrice {
            per_request: Some(d("0.001")),
            ..sonnet()
        };
        let mut not_batch = usage.clone();
        not_batch.detail.batch = false;
        // 0.018 + 0.03 + 0.001
        assert_eq!(cost(&full, &not_batch, "m").unwrap(), d("0.049"));
    }

    #[test]
    fn per_call_fees_are_charged_per_call_and_an_unpriced_call_is_named() {
        let mut detail = Detail::default();
        detail.calls.insert("web_search".into(), 7);
        let usage = tokens(0, 0, 0, detail);
        assert_eq!(cost(&sonnet(), &usage, "m").unwrap(), d("0.07"));
        let mut other = usage.clone();
        other.detail.calls = [("code_interpreter".to_string(), 1)].into();
        let err = cost(&sonnet(), &other, "m").unwrap_err().to_string();
        assert!(err.contains("calls with a fee"), "{err}");
    }

    #[test]
    fn audio_tokens_have_their_own_rates_in_and_out() {
        let audio = ModelPrice {
            input_per_mtok: Some(d("2.50")),
            output_per_mtok: Some(d("10")),
            audio_input_per_mtok: Some(d("40")),
            audio_output_per_mtok: Some(d("80")),
            ..Default::default()
        };
        let usage = tokens(
            3_000,
            0,
            1_500,
            Detail {
                audio_input_tokens: 2_000,
                audio_output_tokens: 1_000,
                ..Default::default()
            },
        );
        // 1000*2.5e-6 + 2000*40e-6 + 500*10e-6 + 1000*80e-6
        // = 0.0025 + 0.08 + 0.005 + 0.08
        assert_eq!(cost(&audio, &usage, "m").unwrap(), d("0.1675"));
        // Parts past the total are counted only as far as the total goes.
        let over = tokens(
            1_000,
            0,
            0,
            Detail {
                audio_input_tokens: 5_000,
                ..Default::default()
            },
        );
        assert_eq!(cost(&audio, &over, "m").unwrap(), d("0.04"));
    }

    #[test]
    fn token_cost_is_exact() {
        let usage = Usage {
            input_tokens: 1_000,
            cached_input_tokens: 200,
            output_tokens: 500,
            ..Default::default()
        };
        // 800 * 2.5e-6 + 200 * 1.25e-6 + 500 * 1e-5 = 0.002 + 0.00025 + 0.005
        assert_eq!(cost(&gpt4o(), &usage, "gpt-4o").unwrap(), d("0.00725"));
        assert_eq!(
            counter_amount(Unit::Spend, &usage, Some(&gpt4o()), Some("gpt-4o")).unwrap(),
            7_250
        );
    }

    #[test]
    fn tenths_add_up_exactly() {
        let p = ModelPrice {
            per_request: Some(d("0.1")),
            ..Default::default()
        };
        let one = cost(&p, &Usage::default(), "m").unwrap();
        let ten: Decimal = (0..10).map(|_| one).sum();
        assert_eq!(ten, Decimal::ONE);
    }

    #[test]
    fn charges_round_up_to_the_micro_dollar() {
        let cheap = ModelPrice {
            input_per_mtok: Some(d("0.15")),
            ..Default::default()
        };
        let one_token = Usage {
            input_tokens: 1,
            ..Default::default()
        };
        // 0.00000015 USD is 0.15 micro-USD: charged as 1.
        assert_eq!(
            counter_amount(Unit::Spend, &one_token, Some(&cheap), Some("m")).unwrap(),
            1
        );
        assert_eq!(
            to_counter(d("0.000002"), 1_000_000, Unit::Spend).unwrap(),
            2
        );
        assert_eq!(
            to_counter(d("0.0000020001"), 1_000_000, Unit::Spend).unwrap(),
            3
        );
    }

    #[test]
    fn image_video_and_audio_prices() {
        let image = ModelPrice {
            per_image: Some(ImagePrice::ByQuality(BTreeMap::from([
                ("low".to_string(), d("0.011")),
                ("high".to_string(), d("0.167")),
            ]))),
            ..Default::default()
        };
        let usage = Usage {
            images: 3,
            image_quality: "high".to_string(),
            ..Default::default()
        };
        assert_eq!(cost(&image, &usage, "img").unwrap(), d("0.501"));
        let bad_quality = Usage {
            image_quality: "ultra".to_string(),
            ..usage.clone()
        };
        assert!(cost(&image, &bad_quality, "img").is_err());

        let video = ModelPrice {
            per_video_second: Some(d("0.10")),
            ..Default::default()
        };
        let clip = Usage {
            video_seconds: d("12.5"),
            video_jobs: 1,
            ..Default::default()
        };
        assert_eq!(cost(&video, &clip, "sora").unwrap(), d("1.25"));
        assert_eq!(
            counter_amount(Unit::VideoSeconds, &clip, None, None).unwrap(),
            13
        );

        let audio = ModelPrice {
            per_audio_minute: Some(d("0.006")),
            ..Default::default()
        };
        let minute_and_half = Usage {
            audio_seconds: d("90"),
            ..Default::default()
        };
        assert_eq!(
            cost(&audio, &minute_and_half, "whisper").unwrap(),
            d("0.009")
        );
    }

    #[test]
    fn unpriced_usage_is_an_error_not_free() {
        let video_only = ModelPrice {
            per_video_second: Some(d("0.10")),
            ..Default::default()
        };
        let text = Usage {
            input_tokens: 10,
            ..Default::default()
        };
        assert!(matches!(
            cost(&video_only, &text, "sora"),
            Err(RequestError::Unpriced { .. })
        ));
        assert!(matches!(
            counter_amount(Unit::Spend, &text, None, Some("mystery")),
            Err(RequestError::Unpriced { .. })
        ));
    }

    #[test]
    fn overflow_is_refused() {
        assert!(to_counter(Decimal::MAX, 1_000_000, Unit::Spend).is_err());
        assert!(to_counter(Decimal::from(MAX_COUNTER) + Decimal::ONE, 1, Unit::Tokens).is_err());
    }

    fn basis<'a>(
        model: &'a str,
        price: Option<&'a ModelPrice>,
        defaults: &'a Defaults,
    ) -> Basis<'a> {
        Basis {
            model: Some(model),
            modality: Some("text"),
            price,
            defaults,
            learned_output: None,
        }
    }

    #[test]
    fn the_prompt_is_counted_with_each_models_tokenizer() {
        use crate::engine::tokens::Prompt;
        let defaults = Defaults::default();
        // 44 characters; 10 tokens in both OpenAI encodings (see
        // engine::tokens), one user message: + 1 (the role) + 3 + 3.
        let est = Estimate {
            input_tokens: Some(11),
            prompt: Some(Prompt::new(
                vec!["The quick brown fox jumps over the lazy dog.".into()],
                vec!["user".into()],
                1,
            )),
            ..Default::default()
        };
        let input = |b: Basis| Usage::from_estimate(&est, &b).input_tokens;
        assert_eq!(input(basis("gpt-4o", None, &defaults)), 17);
        assert_eq!(input(basis("gpt-3.5-turbo", None, &defaults)), 17);
        assert_eq!(input(basis("claude-sonnet-4", None, &defaults)), 11);
        assert_eq!(
            basis("gpt-4o", None, &defaults).input_source(&est),
            InputSource::Prompt(Tokenizer::O200kBase)
        );
        assert_eq!(
            basis("claude-sonnet-4", None, &defaults).input_source(&est),
            InputSource::Prompt(Tokenizer::Approximate)
        );
        // The price entry's tokenizer beats the name.
        let house = ModelPrice {
            tokenizer: Some(Tokenizer::Cl100kBase),
            ..gpt4o()
        };
        assert_eq!(input(basis("house-model", Some(&house), &defaults)), 17);
        let approx = ModelPrice {
            tokenizer: Some(Tokenizer::Approximate),
            ..gpt4o()
        };
        assert_eq!(input(basis("gpt-4o", Some(&approx), &defaults)), 11);

        // The encodings differ on other text: "I'm we'll they've she'd
        // IT'S DON'T" is 7 tokens in o200k_base and 12 in cl100k_base.
        let est = Estimate {
            prompt: Some(Prompt::text("I'm we'll they've she'd IT'S DON'T")),
            ..Default::default()
        };
        let input = |b: Basis| Usage::from_estimate(&est, &b).input_tokens;
        assert_eq!(input(basis("gpt-4.1", None, &defaults)), 7);
        assert_eq!(input(basis("gpt-4", None, &defaults)), 12);
        assert_eq!(input(basis("gemini-2.5-pro", None, &defaults)), 9);
    }

    #[test]
    fn without_a_prompt_the_given_or_default_input_applies() {
        let defaults = Defaults::default();
        let b = basis("gpt-4o", None, &defaults);
        let given = Estimate {
            input_tokens: Some(42),
            ..Default::default()
        };
        assert_eq!(Usage::from_estimate(&given, &b).input_tokens, 42);
        assert_eq!(b.input_source(&given), InputSource::Request);
        let none = Estimate::default();
        assert_eq!(Usage::from_estimate(&none, &b).input_tokens, 1_000);
        assert_eq!(b.input_source(&none), InputSource::Default);
    }

    #[test]
    fn output_comes_from_the_request_then_learned_then_the_defaults() {
        let defaults = Defaults::default();
        let priced = ModelPrice {
            default_output_tokens: Some(700),
            ..gpt4o()
        };
        let mut b = basis("gpt-4o", Some(&priced), &defaults);
        let asked = Estimate {
            output_tokens: Some(64),
            ..Default::default()
        };
        let none = Estimate::default();
        let out = |e: &Estimate, b: &Basis| {
            (Usage::from_estimate(e, b).output_tokens, b.output_source(e))
        };
        assert_eq!(out(&asked, &b), (64, OutputSource::Request));
        assert_eq!(out(&none, &b), (700, OutputSource::Model));
        b.learned_output = Some(321);
        assert_eq!(out(&asked, &b), (64, OutputSource::Request));
        assert_eq!(out(&none, &b), (321, OutputSource::Learned));
        b.learned_output = None;
        b.price = None;
        assert_eq!(out(&none, &b), (1_000, OutputSource::Default));
        b.modality = Some("image");
        assert_eq!(out(&none, &b), (0, OutputSource::None));
    }
}
