//! The `defaults` section: the usage assumed for a request that does not
//! say, so that it can still be priced before it runs.

use super::Reader;
use crate::policy::model::*;
use crate::policy::yaml::Node;

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
                "output_tokens" => {
                    d.output_tokens = self.count(value, &what).unwrap_or(d.output_tokens)
                }
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
}
