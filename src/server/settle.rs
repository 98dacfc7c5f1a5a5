//! The one settle form, shared by the native API and `POST /v1/settle`:
//! the same fields, the same checks and the same words for a mistake,
//! whichever protocol it came in.

use serde::{Deserialize, Deserializer};

use tollgate_core::engine::request::parse_amount;
use tollgate_core::engine::RequestError;
use tollgate_core::gate::ActualUsage;
use tollgate_core::store::SettleOutcome;

/// What a call really used. Absent counts are zero.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageForm {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub cached_input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    /// Of `output_tokens`, those spent reasoning.
    #[serde(default)]
    pub reasoning_tokens: u64,
    #[serde(default)]
    pub images: u64,
    #[serde(default)]
    pub image_quality: Option<String>,
    /// Decimal text; JSON may send a number or a string.
    #[serde(default, deserialize_with = "amount_text")]
    pub video_seconds: Option<String>,
    #[serde(default, deserialize_with = "amount_text")]
    pub audio_seconds: Option<String>,
    /// Of `input_tokens`, those written to a prompt cache (Anthropic's
    /// `cache_creation_input_tokens`).
    #[serde(default)]
    pub cache_write_tokens: u64,
    /// Of the input and output tokens, the audio ones.
    #[serde(default)]
    pub audio_input_tokens: u64,
    #[serde(default)]
    pub audio_output_tokens: u64,
    /// Calls with a fee made within the request, by name (`web_search`).
    #[serde(default)]
    pub calls: std::collections::BTreeMap<String, u64>,
    /// The call went through the provider's batch API.
    #[serde(default)]
    pub batch: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleForm {
    pub reservation_id: String,
    #[serde(default)]
    pub usage: UsageForm,
}

impl SettleForm {
    /// The reservation to settle and its actual usage, checked.
    pub fn checked(self) -> Result<(String, ActualUsage), RequestError> {
        if self.reservation_id.trim().is_empty() {
            return Err(RequestError::invalid("`reservation_id` is required"));
        }
        Ok((self.reservation_id, self.usage.actual()?))
    }
}

impl UsageForm {
    pub fn actual(self) -> Result<ActualUsage, RequestError> {
        let seconds = |field: &str, text: &Option<String>| match text.as_deref() {
            None | Some("") => Ok(Default::default()),
            Some(t) => parse_amount(field, t),
        };
        if self.calls.len() > tollgate_core::engine::request::MAX_CALL_KINDS {
            return Err(RequestError::invalid(format!(
                "usage.calls names more than {} kinds of calls",
                tollgate_core::engine::request::MAX_CALL_KINDS
            )));
        }
        if let Some(name) = self.calls.keys().find(|n| n.is_empty() || n.len() > 128) {
            return Err(RequestError::invalid(format!(
                "usage.calls has a bad call name {name:?} (1 to 128 characters)"
            )));
        }
        Ok(ActualUsage {
            input_tokens: self.input_tokens,
            cached_input_tokens: self.cached_input_tokens,
            output_tokens: self.output_tokens,
            reasoning_tokens: self.reasoning_tokens.min(self.output_tokens),
            images: self.images,
            image_quality: self.image_quality.filter(|q| !q.is_empty()),
            video_seconds: seconds("usage.video_seconds", &self.video_seconds)?,
            audio_seconds: seconds("usage.audio_seconds", &self.audio_seconds)?,
            cache_write_tokens: self.cache_write_tokens,
            audio_input_tokens: self.audio_input_tokens,
            audio_output_tokens: self.audio_output_tokens,
            calls: self.calls,
            batch: self.batch,
        })
    }
}

/// How every API names a settle's outcome.
pub fn outcome_name(outcome: SettleOutcome) -> &'static str {
    match outcome {
        SettleOutcome::Settled => "settled",
        SettleOutcome::AlreadySettled => "already_settled",
        SettleOutcome::Unknown => "unknown",
    }
}

/// A JSON number or string, kept as its text so it is read exactly.
fn amount_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Amount {
        Number(serde_json::Number),
        Text(String),
    }
    Ok(Option::<Amount>::deserialize(d)?.map(|a| match a {
        Amount::Number(n) => n.to_string(),
        Amount::Text(t) => t,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_writes_audio_calls_and_batch_are_read() {
        let form: SettleForm = serde_json::from_str(
            r#"{"reservation_id":"r1","usage":{"input_tokens":10,"cache_write_tokens":4,
                "audio_input_tokens":3,"audio_output_tokens":2,"output_tokens":5,
                "calls":{"web_search":2},"batch":true}}"#,
        )
        .unwrap();
        let (_, a) = form.checked().unwrap();
        assert_eq!(
            (
                a.cache_write_tokens,
                a.audio_input_tokens,
                a.audio_output_tokens
            ),
            (4, 3, 2)
        );
        assert_eq!(a.calls["web_search"], 2);
        assert!(a.batch);
        let bad: SettleForm =
            serde_json::from_str(r#"{"reservation_id":"r1","usage":{"calls":{"":1}}}"#).unwrap();
        assert!(bad
            .checked()
            .unwrap_err()
            .to_string()
            .contains("bad call name"));
    }

    #[test]
    fn json_numbers_and_strings_read_alike_and_mistakes_are_named() {
        let form: SettleForm = serde_json::from_str(
            r#"{"reservation_id":"r1","usage":{"output_tokens":5,"video_seconds":2.5,"audio_seconds":"-0"}}"#,
        )
        .unwrap();
        let (id, actual) = form.checked().unwrap();
        assert_eq!(id, "r1");
        assert_eq!(actual.output_tokens, 5);
        assert_eq!(actual.video_seconds.to_string(), "2.5");
        assert!(actual.audio_seconds.is_zero());

        let negative: SettleForm =
            serde_json::from_str(r#"{"reservation_id":"r1","usage":{"video_seconds":-1}}"#)
                .unwrap();
        let e = negative.checked().unwrap_err().to_string();
        assert!(
            e.contains("`usage.video_seconds` must not be negative"),
            "{e}"
        );
        let missing: SettleForm = serde_json::from_str(r#"{"reservation_id":" "}"#).unwrap();
        assert!(missing.checked().is_err());
        assert!(serde_json::from_str::<SettleForm>(r#"{"reservation_id":"r","extra":1}"#).is_err());
    }
}
