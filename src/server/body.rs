//! Usage estimates read from AI API request bodies: OpenAI chat,
//! responses, images and embeddings, Anthropic Messages, Gemini
//! `generateContent`, and video jobs.
//!
//! Input tokens are approximated as one token per four characters of
//! prompt text (rounded up), counting every text part the request sends:
//! messages, system prompts, instructions, inputs and prompts. Output
//! tokens are the request's own maximum. Anything missing or malformed is
//! left unset, so the policy's defaults apply.

use rust_decimal::Decimal;
use serde_json::Value;

use crate::engine::Estimate;

/// What a body says about the request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyFacts {
    pub model: Option<String>,
    pub estimate: Estimate,
}

/// Characters per token in the input approximation.
pub const CHARS_PER_TOKEN: u64 = 4;

pub fn read(body: &[u8]) -> BodyFacts {
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return BodyFacts::default();
    };
    let Some(obj) = json.as_object() else {
        return BodyFacts::default();
    };
    let mut facts = BodyFacts {
        model: obj.get("model").and_then(Value::as_str).map(str::to_string),
        ..Default::default()
    };
    let mut chars = 0u64;
    for field in [
        "messages",
        "system",
        "instructions",
        "input",
        "prompt",
        "contents",
        "systemInstruction",
    ] {
        if let Some(v) = obj.get(field) {
            chars = chars.saturating_add(text_chars(v));
        }
    }
    if chars > 0 {
        facts.estimate.input_tokens = Some(chars.div_ceil(CHARS_PER_TOKEN));
    }
    let generation = obj.get("generationConfig");
    facts.estimate.output_tokens = ["max_tokens", "max_output_tokens", "max_completion_tokens"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_u64))
        .or_else(|| {
            generation
                .and_then(|g| g.get("maxOutputTokens"))
                .and_then(Value::as_u64)
        });
    facts.estimate.images = obj.get("n").and_then(Value::as_u64);
    facts.estimate.image_quality = obj
        .get("quality")
        .and_then(Value::as_str)
        .map(str::to_string);
    facts.estimate.video_seconds = ["seconds", "duration"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(seconds));
    facts
}

/// Characters of prompt text anywhere inside a value: strings, and the
/// `text`/`content` of message parts.
fn text_chars(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(items) => items.iter().map(text_chars).fold(0, u64::saturating_add),
        Value::Object(o) => ["content", "text", "parts", "input"]
            .iter()
            .filter_map(|k| o.get(*k))
            .map(text_chars)
            .fold(0, u64::saturating_add),
        _ => 0,
    }
}

fn seconds(v: &Value) -> Option<Decimal> {
    match v {
        Value::Number(n) => n.to_string().parse().ok(),
        Value::String(s) => s.trim().trim_end_matches('s').parse().ok(),
        _ => None,
    }
    .filter(|d: &Decimal| !d.is_sign_negative())
}

/// The model named in a Gemini path: `/v1beta/models/{model}:generateContent`.
pub fn model_from_path(path: &str) -> Option<String> {
    let rest = path.split("/models/").nth(1)?;
    let model = rest.split([':', '/', '?']).next()?;
    (!model.is_empty()).then(|| model.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(body: &str) -> BodyFacts {
        read(body.as_bytes())
    }

    #[test]
    fn real_bodies_of_every_supported_api() {
        // (body, model, input tokens, output tokens, images, quality, video seconds)
        // (body, model, input tokens, output tokens, images, quality, video seconds)
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            Option<u64>,
            Option<u64>,
            Option<u64>,
            Option<&'a str>,
            Option<&'a str>,
        );
        let cases: Vec<Case> = vec![
            // OpenAI chat, plain and streaming, with content parts.
            (
                r#"{"model":"gpt-4o","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hello there!"}],"max_tokens":50}"#,
                Some("gpt-4o"),
                Some(6),
                Some(50),
                None,
                None,
                None,
            ),
            (
                r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":[{"type":"text","text":"12345678"}]}],"max_completion_tokens":7}"#,
                Some("gpt-4o"),
                Some(2),
                Some(7),
                None,
                None,
                None,
            ),
            // OpenAI responses.
            (
                r#"{"model":"gpt-5","instructions":"abcd","input":"efgh","max_output_tokens":300}"#,
                Some("gpt-5"),
                Some(2),
                Some(300),
                None,
                None,
                None,
            ),
            (
                r#"{"model":"gpt-5","input":[{"role":"user","content":[{"type":"input_text","text":"abcdefgh"}]}]}"#,
                Some("gpt-5"),
                Some(2),
                None,
                None,
                None,
                None,
            ),
            // OpenAI images.
            (
                r#"{"model":"gpt-image-1","prompt":"a red fox","n":3,"quality":"high","size":"1024x1024"}"#,
                Some("gpt-image-1"),
                Some(3),
                None,
                Some(3),
                Some("high"),
                None,
            ),
            // OpenAI embeddings, a string and a batch.
            (
                r#"{"model":"text-embedding-3-small","input":"abcd"}"#,
                Some("text-embedding-3-small"),
                Some(1),
                None,
                None,
                None,
                None,
            ),
            (
                r#"{"model":"text-embedding-3-small","input":["abcd","efgh"]}"#,
                Some("text-embedding-3-small"),
                Some(2),
                None,
                None,
                None,
                None,
            ),
            // Anthropic Messages with a system prompt.
            (
                r#"{"model":"claude-opus-4","system":"You are terse.","messages":[{"role":"user","content":"Hi"}],"max_tokens":1024,"stream":true}"#,
                Some("claude-opus-4"),
                Some(4),
                Some(1024),
                None,
                None,
                None,
            ),
            // Gemini generateContent (the model is in the path).
            (
                r#"{"contents":[{"role":"user","parts":[{"text":"abcdefgh"}]}],"generationConfig":{"maxOutputTokens":256}}"#,
                None,
                Some(2),
                Some(256),
                None,
                None,
                None,
            ),
            // Video jobs.
            (
                r#"{"model":"sora-2","prompt":"waves","seconds":"12"}"#,
                Some("sora-2"),
                Some(2),
                None,
                None,
                None,
                Some("12"),
            ),
            (
                r#"{"model":"sora-2","prompt":"waves","duration":8.5}"#,
                Some("sora-2"),
                Some(2),
                None,
                None,
                None,
                Some("8.5"),
            ),
            // Missing fields, garbage, and the wrong types all fall back.
            (r#"{}"#, None, None, None, None, None, None),
            (
                r#"{"model":42,"max_tokens":"lots","n":-1,"seconds":-5}"#,
                None,
                None,
                None,
                None,
                None,
                None,
            ),
            ("not json at all", None, None, None, None, None, None),
            (
                r#"{"model":"gpt-4o","messages":[{"role":"user","content":"trunc"#,
                None,
                None,
                None,
                None,
                None,
                None,
            ),
            ("[1,2,3]", None, None, None, None, None, None),
        ];
        for (body, model, input, output, images, quality, video) in cases {
            let f = est(body);
            assert_eq!(f.model.as_deref(), model, "{body}");
            assert_eq!(f.estimate.input_tokens, input, "{body}");
            assert_eq!(f.estimate.output_tokens, output, "{body}");
            assert_eq!(f.estimate.images, images, "{body}");
            assert_eq!(f.estimate.image_quality.as_deref(), quality, "{body}");
            assert_eq!(
                f.estimate.video_seconds.map(|d| d.to_string()).as_deref(),
                video,
                "{body}"
            );
        }
    }

    #[test]
    fn gemini_model_from_path() {
        assert_eq!(
            model_from_path("/v1beta/models/gemini-2.5-pro:generateContent").as_deref(),
            Some("gemini-2.5-pro")
        );
        assert_eq!(
            model_from_path("/v1/models/gemini-2.5-flash:streamGenerateContent?alt=sse").as_deref(),
            Some("gemini-2.5-flash")
        );
        assert_eq!(model_from_path("/v1/chat/completions"), None);
    }
}
