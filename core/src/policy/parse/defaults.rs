//! The `defaults` section: the usage assumed for a request that does not
//! say, so that it can still be priced before it runs.

use super::Reader;
use crate::policy::model::*;
use crate::policy::yaml::{Node, Value};

impl Reader<'_> {
    pub(super) fn defaults(&mut self, node: &Node) -> Option<Defaults> {
        let fields = self.map(
            node,
            "defaults",
            &[
                "input_tokens",
                "output_tokens",
                "images",
                "image_quality",
                "video_seconds",
                "audio_seconds",
            ],
        )?;
        let mut d = Defaults::default();
        for (key, value) in fields {
            let what = format!("defaults.{key}");
            match key {
                "input_tokens" => {
                    d.input_tokens = self.count(value, &what).unwrap_or(d.input_tokens)
                }
                "output_tokens" => self.output_tokens(value, &mut d),
                "images" => d.images = self.count(value, &what).unwrap_or(d.images),
                "image_quality" => {
                    d.image_quality = self.string(value, &what).unwrap_or(d.image_quality)
                }
                "video_seconds" => {
                    d.video_seconds = self.amount(value, &what).unwrap_or(d.video_seconds)
                }
                "audio_seconds" => {
                    d.audio_seconds = self.amount(value, &what).unwrap_or(d.audio_seconds)
                }
                _ => unreachable!(),
            }
        }
        Some(d)
    }

    /// `output_tokens: N`, `output_tokens: learned`, or
    /// `output_tokens: { learned: p95, default: N, min_samples: N }`.
    fn output_tokens(&mut self, value: &Node, d: &mut Defaults) {
        const WHAT: &str = "defaults.output_tokens";
        match &value.value {
            Value::Scalar { text, .. } if text.trim() == "learned" => {
                d.learn_output = Some(LearnOutput::default());
            }
            Value::Map(_) => {
                let Some(fields) = self.map(value, WHAT, &["learned", "default", "min_samples"])
                else {
                    return;
                };
                let mut learn = LearnOutput::default();
                let mut said = false;
                for (key, v) in fields {
                    let what = format!("{WHAT}.{key}");
                    match key {
                        "learned" => {
                            said = true;
                            let text = self.string(v, &what).unwrap_or_default();
                            match text
                                .trim()
                                .strip_prefix('p')
                                .and_then(|n| n.parse::<u8>().ok())
                                .filter(|n| (50..=99).contains(n))
                            {
                                Some(n) => learn.percentile = n,
                                None => self.error(
                                    v.pos,
                                    format!(
                                        "`{what}` is a percentile from p50 to p99, such as p95, \
                                         found {text:?}"
                                    ),
                                ),
                            }
                        }
                        "default" => {
                            d.output_tokens = self.count(v, &what).unwrap_or(d.output_tokens)
                        }
                        "min_samples" => match self.count(v, &what) {
                            Some(n) if (1..=MAX_MIN_SAMPLES).contains(&n) => {
                                learn.min_samples = n as u32
                            }
                            Some(_) => self
                                .error(v.pos, format!("`{what}` is from 1 to {MAX_MIN_SAMPLES}")),
                            None => {}
                        },
                        _ => unreachable!(),
                    }
                }
                if said {
                    d.learn_output = Some(learn);
                } else {
                    self.error(
                        value.pos,
                        format!(
                            "`{WHAT}` as a map needs `learned` (a percentile such as p95); \
                             a fixed default is a number"
                        ),
                    );
                }
            }
            _ => d.output_tokens = self.count(value, WHAT).unwrap_or(d.output_tokens),
        }
    }
}
