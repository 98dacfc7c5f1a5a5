//! The `pricing` section: per-model prices, model families and what to do
//! with a model that has no price.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::{FilePolicy, Reader};
use crate::policy::glob::Pattern;
use crate::policy::model::*;
use crate::policy::yaml::{Node, Value};

impl Reader<'_> {
    pub(super) fn pricing(&mut self, node: &Node, out: &mut FilePolicy) {
        let Some(fields) = self.map(
            node,
            "pricing",
            &["models", "families", "unpriced_models", "import"],
        ) else {
            return;
        };
        for (key, value) in fields {
            match key {
                "models" => {
                    for (name, price, pos) in self.open_map(value, "pricing.models") {
                        if let Some(p) = self.model_price(price, name) {
                            out.pricing_models
                                .push((Pattern::new(name), p, self.origin(pos)));
                        }
                    }
                }
                "families" => {
                    for (name, patterns, pos) in self.open_map(value, "pricing.families") {
                        let what = format!("pricing.families.{name}");
                        let p = self.patterns(patterns, &what);
                        out.families.push((name.to_string(), p, self.origin(pos)));
                    }
                }
                "unpriced_models" => {
                    let mode = match self.string(value, "pricing.unpriced_models").as_deref() {
                        Some("error") => UnpricedModels::Error,
                        Some("reject") => UnpricedModels::Reject,
                        Some(other) => {
                            self.error(
                                value.pos,
                                format!("`pricing.unpriced_models` is `error` or `reject`, found {other:?}"),
                            );
                            continue;
                        }
                        None => continue,
                    };
                    out.unpriced_models = Some((mode, self.origin(value.pos)));
                }
                "import" => {
                    for item in self.seq(value, "pricing.import") {
                        let Some(path) = self.string(item, "pricing.import") else {
                            continue;
                        };
                        if !path.trim().to_ascii_lowercase().ends_with(".json") {
                            self.error(
                                item.pos,
                                format!(
                                    "a price catalog is a JSON file (LiteLLM's \
                                     model_prices_and_context_window.json or OpenRouter's \
                                     models list) whose name ends in .json, found {path:?}"
                                ),
                            );
                            continue;
                        }
                        out.imports.push((path, self.origin(item.pos)));
                    }
                }
                _ => unreachable!(),
            }
        }
    }

    fn model_price(&mut self, node: &Node, model: &str) -> Option<ModelPrice> {
        let what = format!("the price of {model}");
        let fields = self.map(
            node,
            &what,
            &[
                "input_per_mtok",
                "cached_input_per_mtok",
                "output_per_mtok",
                "per_request",
                "per_image",
                "per_video_second",
                "per_audio_minute",
                "default_output_tokens",
                "cache_write_per_mtok",
                "reasoning_per_mtok",
                "audio_input_per_mtok",
                "audio_output_per_mtok",
                "long_context",
                "batch_discount",
                "per_call",
                "tokenizer",
            ],
        )?;
        let mut p = ModelPrice::default();
        let mut tokenizer = None;
        for (key, value) in fields {
            let name = format!("{model}.{key}");
            match key {
                "tokenizer" => {
                    let Some(text) = self.string(value, &name) else {
                        continue;
                    };
                    tokenizer = Tokenizer::parse(text.trim());
                    if tokenizer.is_none() {
                        self.error(
                            value.pos,
                            format!(
                                "`{name}` is `o200k_base`, `cl100k_base` or `approximate`, \
                                 found {text:?}"
                            ),
                        );
                    }
                }
                "input_per_mtok" => p.input_per_mtok = self.amount(value, &name),
                "cached_input_per_mtok" => p.cached_input_per_mtok = self.amount(value, &name),
                "output_per_mtok" => p.output_per_mtok = self.amount(value, &name),
                "per_request" => p.per_request = self.amount(value, &name),
                "per_video_second" => p.per_video_second = self.amount(value, &name),
                "per_audio_minute" => p.per_audio_minute = self.amount(value, &name),
                "default_output_tokens" => p.default_output_tokens = self.count(value, &name),
                "cache_write_per_mtok" => p.cache_write_per_mtok = self.amount(value, &name),
                "reasoning_per_mtok" => p.reasoning_per_mtok = self.amount(value, &name),
                "audio_input_per_mtok" => p.audio_input_per_mtok = self.amount(value, &name),
                "audio_output_per_mtok" => p.audio_output_per_mtok = self.amount(value, &name),
                "batch_discount" => {
                    p.batch_discount = self.amount(value, &name);
                    if p.batch_discount.is_some_and(|d| d > Decimal::ONE) {
                        self.error(
                            value.pos,
                            format!("`{name}` is the fraction taken off, from 0 to 1 (0.5 is half price)"),
                        );
                        p.batch_discount = None;
                    }
                }
                "per_call" => {
                    for (call, fee, _) in self.open_map(value, &name) {
                        if let Some(d) = self.amount(fee, &format!("{name}.{call}")) {
                            p.per_call.insert(call.to_string(), d);
                        }
                    }
                }
                "long_context" => {
                    let what = format!("`{name}`");
                    let Some(fields) = self.map(
                        value,
                        &what,
                        &[
                            "above_input_tokens",
                            "input_per_mtok",
                            "cached_input_per_mtok",
                            "cache_write_per_mtok",
                            "output_per_mtok",
                        ],
                    ) else {
                        continue;
                    };
                    let mut long = LongContext::default();
                    let mut above = None;
                    for (k, v) in fields {
                        let field = format!("{name}.{k}");
                        match k {
                            "above_input_tokens" => above = self.count(v, &field),
                            "input_per_mtok" => long.input_per_mtok = self.amount(v, &field),
                            "cached_input_per_mtok" => {
                                long.cached_input_per_mtok = self.amount(v, &field)
                            }
                            "cache_write_per_mtok" => {
                                long.cache_write_per_mtok = self.amount(v, &field)
                            }
                            "output_per_mtok" => long.output_per_mtok = self.amount(v, &field),
                            _ => unreachable!(),
                        }
                    }
                    match above {
                        Some(n) => {
                            long.above_input_tokens = n;
                            p.long_context = Some(long);
                        }
                        None => self.error(
                            value.pos,
                            format!("{what} needs `above_input_tokens`, the input size past which its prices apply"),
                        ),
                    }
                }
                "per_image" => {
                    p.per_image = if let Value::Map(_) = value.value {
                        let mut by_quality = BTreeMap::new();
                        for (quality, price, _) in self.open_map(value, &name) {
                            if let Some(d) = self.amount(price, &format!("{name}.{quality}")) {
                                by_quality.insert(quality.to_string(), d);
                            }
                        }
                        Some(ImagePrice::ByQuality(by_quality))
                    } else {
                        self.amount(value, &name).map(ImagePrice::Flat)
                    }
                }
                _ => unreachable!(),
            }
        }
        if p == ModelPrice::default() {
            self.error(node.pos, format!("{what} names no price"));
            return None;
        }
        p.tokenizer = tokenizer;
        Some(p)
    }
}
