//! Usage estimates read from AI API request bodies: OpenAI chat,
//! responses, images and embeddings, Anthropic Messages, Gemini
//! `generateContent`, and video jobs.
//!
//! Input tokens are approximated as one token per four characters of
//! prompt text (rounded up), counting every text part the request sends:
//! messages, system prompts, instructions, inputs and prompts. A whole
//! body of at most `EXACT_MAX_BYTES` of such text also keeps the text, as
//! the estimate's [`Prompt`], so that the charge can count it exactly at
//! each model whose tokenizer it has (OpenAI's); the approximation is then
//! what every other model is charged. Output tokens are the request's own
//! maximum. Anything missing or malformed is left unset, so the policy's
//! defaults apply. A body cut short by the proxy is read by
//! [`read_prefix`] instead, and is always approximated: the rest of its
//! text never arrives.

use rust_decimal::Decimal;
use serde_json::{Map, Value};

use tollgate_core::engine::tokens::{Prompt, EXACT_MAX_BYTES};
use tollgate_core::engine::Estimate;

/// What a body says about the request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyFacts {
    pub model: Option<String>,
    pub estimate: Estimate,
}

/// Characters per token in the input approximation.
pub(crate) const CHARS_PER_TOKEN: u64 = tollgate_core::engine::tokens::CHARS_PER_TOKEN;

/// Facts from a whole JSON body. A body that does not parse as a JSON
/// object yields no facts.
pub fn read(body: &[u8]) -> BodyFacts {
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return BodyFacts::default();
    };
    let Some(obj) = json.as_object() else {
        return BodyFacts::default();
    };
    let mut facts = member_facts(obj);
    let mut text = Text::default();
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
            text.parts(v);
            if matches!(field, "messages" | "input") {
                text.messages(v);
            }
        }
    }
    if text.chars > 0 {
        facts.estimate.input_tokens = Some(text.chars.div_ceil(CHARS_PER_TOKEN));
    }
    if text.chars > 0 && text.bytes <= EXACT_MAX_BYTES {
        facts.estimate.prompt = Some(Prompt::new(
            text.parts.into_iter().map(Box::from).collect(),
            text.framing.into_iter().map(Box::from).collect(),
            text.messages,
        ));
    }
    facts
}

/// The prompt's text parts (strings, and in objects their `content`,
/// `text`, `parts` and `input`, at any depth), and the
/// roles and names of its chat messages: borrowed from the body until a
/// [`Prompt`] is made of them.
#[derive(Default)]
struct Text<'a> {
    parts: Vec<&'a str>,
    framing: Vec<&'a str>,
    messages: u64,
    chars: u64,
    bytes: usize,
}

impl<'a> Text<'a> {
    fn parts(&mut self, v: &'a Value) {
        match v {
            Value::String(s) => {
                self.chars = self.chars.saturating_add(s.chars().count() as u64);
                self.keep(s);
            }
            Value::Array(items) => items.iter().for_each(|i| self.parts(i)),
            Value::Object(o) => ["content", "text", "parts", "input"]
                .iter()
                .filter_map(|k| o.get(*k))
                .for_each(|v| self.parts(v)),
            _ => {}
        }
    }

    /// The messages of a chat list: each item that has a `role`.
    fn messages(&mut self, v: &'a Value) {
        let Value::Array(items) = v else {
            return;
        };
        for item in items {
            let Some(role) = item.get("role").and_then(Value::as_str) else {
                continue;
            };
            self.messages += 1;
            self.framing_part(role);
            if let Some(name) = item.get("name").and_then(Value::as_str) {
                self.framing_part(name);
            }
        }
    }

    fn framing_part(&mut self, s: &'a str) {
        self.bytes = self.bytes.saturating_add(s.len());
        if self.bytes <= EXACT_MAX_BYTES {
            self.framing.push(s);
        }
    }

    /// Keeps a part while the prompt is small enough to count exactly;
    /// past that only its size is kept.
    fn keep(&mut self, s: &'a str) {
        self.bytes = self.bytes.saturating_add(s.len());
        if self.bytes <= EXACT_MAX_BYTES && !s.is_empty() {
            self.parts.push(s);
        }
    }
}

/// Facts from the first bytes of a body that may have been cut short, as
/// Envoy's ext_authz sends with `allow_partial_message` once a body
/// passes its limit. `content_length` is the whole body's length, when
/// the request declared one.
///
/// The model, the output cap (`max_tokens`, `max_output_tokens`,
/// `max_completion_tokens`, `generationConfig.maxOutputTokens`), and an
/// image request's `n` and `quality` and a video job's `seconds` or
/// `duration` are read as [`read`] reads them, but only from members of
/// the top-level object that are complete within the prefix: a string
/// counts once its closing quote arrives, a number or literal once a byte
/// after it does (so a cut `1024` is not taken as `10`). Members nested
/// deeper, and text inside strings, are never mistaken for top-level
/// ones. Scanning stops at the first byte that breaks the object's
/// grammar, keeping what was read before it. A member repeated at top
/// level takes its last complete value, as in [`read`].
///
/// Input tokens are one per [`CHARS_PER_TOKEN`] bytes, rounded up, of the
/// whole body: `content_length` (or the prefix's length, if longer) bounds
/// its characters from above, which errs high, the safe side for a
/// budget. Without `content_length` the prefix's own length is used,
/// which is only a lower bound for a body that was cut. Zero bytes leave
/// the input unset.
///
/// Runs in one pass, in time linear in the prefix, and never panics.
pub fn read_prefix(prefix: &[u8], content_length: Option<u64>) -> BodyFacts {
    let mut members = Map::new();
    Prefix { b: prefix, i: 0 }.object(true, &mut members);
    let mut facts = member_facts(&members);
    let bytes = content_length.unwrap_or(0).max(prefix.len() as u64);
    if bytes > 0 {
        facts.estimate.input_tokens = Some(bytes.div_ceil(CHARS_PER_TOKEN));
    }
    facts
}

/// Everything but the input tokens, from a body's top-level members.
fn member_facts(obj: &Map<String, Value>) -> BodyFacts {
    let mut facts = BodyFacts {
        model: obj.get("model").and_then(Value::as_str).map(str::to_string),
        ..Default::default()
    };
    let generation = obj.get("generationConfig");
    facts.estimate.output_tokens = OUTPUT_CAPS
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_u64))
        .or_else(|| {
            generation
                .and_then(|g| g.get(GENERATION_OUTPUT_CAP))
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

const OUTPUT_CAPS: [&str; 3] = ["max_tokens", "max_output_tokens", "max_completion_tokens"];
const GENERATION: &str = "generationConfig";
const GENERATION_OUTPUT_CAP: &str = "maxOutputTokens";

/// The top-level members [`member_facts`] looks at.
const TOP_LEVEL_KEYS: [&str; 9] = [
    "model",
    "max_tokens",
    "max_output_tokens",
    "max_completion_tokens",
    "n",
    "quality",
    "seconds",
    "duration",
    GENERATION,
];

/// A scanner over a possibly truncated JSON object. It decodes only the
/// members it wants (through `serde_json`, so escapes and UTF-8 are judged
/// exactly as [`read`] judges them) and skips every other value by
/// counting brackets outside strings, without recursion.
struct Prefix<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Prefix<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// Reads the object starting at the next non-blank byte into `out`,
    /// keeping only the wanted members: those of [`TOP_LEVEL_KEYS`] when
    /// `top`, else `maxOutputTokens` (the inside of `generationConfig`).
    /// Returns whether the object ended well; false when the prefix ran
    /// out or the grammar broke, after which nothing more is read.
    fn object(&mut self, top: bool, out: &mut Map<String, Value>) -> bool {
        self.skip_ws();
        if self.peek() != Some(b'{') {
            return false;
        }
        self.i += 1;
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return true;
        }
        let wanted: &[&'static str] = if top {
            &TOP_LEVEL_KEYS
        } else {
            &[GENERATION_OUTPUT_CAP]
        };
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return false;
            }
            let Some(key) = self.string() else {
                return false;
            };
            let key = wanted_key(key, wanted);
            self.skip_ws();
            if self.peek() != Some(b':') {
                return false;
            }
            self.i += 1;
            self.skip_ws();
            match self.peek() {
                None => return false,
                Some(b'{') if top && key == Some(GENERATION) => {
                    let mut inner = Map::new();
                    let done = self.object(false, &mut inner);
                    out.insert(GENERATION.to_string(), Value::Object(inner));
                    if !done {
                        return false;
                    }
                }
                Some(b'{' | b'[') => {
                    if !self.skip_nested() {
                        return false;
                    }
                    // The wrong type: it overrides an earlier value.
                    if let Some(k) = key {
                        out.insert(k.to_string(), Value::Null);
                    }
                }
                Some(b'"') => {
                    let Some(raw) = self.string() else {
                        return false;
                    };
                    if let Some(k) = key {
                        let v = serde_json::from_slice(raw).unwrap_or(Value::Null);
                        out.insert(k.to_string(), v);
                    }
                }
                Some(_) => {
                    // A number or literal, complete only once a byte
                    // after it has arrived.
                    let Some(raw) = self.token() else {
                        return false;
                    };
                    let Ok(v) = serde_json::from_slice::<Value>(raw) else {
                        return false;
                    };
                    if let Some(k) = key {
                        out.insert(k.to_string(), v);
                    }
                }
            }
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return true;
                }
                _ => return false,
            }
        }
    }

    /// The string starting at the current `"`, quotes and escapes
    /// included, or None if the prefix ends inside it.
    fn string(&mut self) -> Option<&'a [u8]> {
        let start = self.i;
        let mut j = start + 1;
        while let Some(&c) = self.b.get(j) {
            match c {
                b'"' => {
                    self.i = j + 1;
                    return Some(&self.b[start..=j]);
                }
                b'\\' => j += 2,
                _ => j += 1,
            }
        }
        self.i = self.b.len();
        None
    }

    /// Skips the object or array starting at the current bracket; false
    /// if the prefix ends inside it. Brackets are only counted, not
    /// matched by kind.
    fn skip_nested(&mut self) -> bool {
        let mut depth = 0usize;
        while let Some(c) = self.peek() {
            match c {
                b'"' => {
                    if self.string().is_none() {
                        return false;
                    }
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    // The first byte opened, so depth is at least one.
                    depth -= 1;
                    if depth == 0 {
                        self.i += 1;
                        return true;
                    }
                }
                _ => {}
            }
            self.i += 1;
        }
        false
    }

    /// The bare token (number or literal) at the current byte, or None if
    /// the prefix ends before anything follows it.
    fn token(&mut self) -> Option<&'a [u8]> {
        let rest = self.b.get(self.i..)?;
        let len = rest.iter().position(|c| {
            matches!(
                c,
                b' ' | b'\t' | b'\n' | b'\r' | b',' | b':' | b'"' | b'{' | b'}' | b'[' | b']'
            )
        })?;
        self.i += len;
        rest.get(..len)
    }
}

/// Which of `wanted` a raw key string (quotes included) names, if any.
/// Only a key with escapes is decoded.
fn wanted_key(raw: &[u8], wanted: &[&'static str]) -> Option<&'static str> {
    if raw.contains(&b'\\') {
        let key: String = serde_json::from_slice(raw).ok()?;
        wanted.iter().copied().find(|w| *w == key)
    } else {
        let inner = raw.get(1..raw.len().saturating_sub(1))?;
        wanted.iter().copied().find(|w| w.as_bytes() == inner)
    }
}

/// Characters of prompt text anywhere inside a value: strings, and the
/// `text`/`content` of message parts.
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

    fn prefix(body: &str, content_length: Option<u64>) -> BodyFacts {
        read_prefix(body.as_bytes(), content_length)
    }

    /// A real OpenAI chat completions body, about 300 bytes.
    const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant. Answer briefly."},{"role":"user","content":[{"type":"text","text":"What is in this \"image\"? Reply as {\"model\":\"x\"}."}]}],"temperature":0.2,"stream":true,"stream_options":{"include_usage":true},"max_tokens":1024,"user":"u-42"}"#;

    #[test]
    fn prefix_of_a_chat_body_cut_at_every_byte() {
        assert!((280..=340).contains(&CHAT.len()), "{}", CHAT.len());
        let model_end = CHAT.find(r#""gpt-4o""#).unwrap() + r#""gpt-4o""#.len();
        // The cap counts once the byte after its last digit has arrived.
        let cap_end = CHAT.find("1024").unwrap() + "1024".len() + 1;
        let whole = read(CHAT.as_bytes());
        assert_eq!(whole.model.as_deref(), Some("gpt-4o"));
        for cut in 0..=CHAT.len() {
            let bytes = &CHAT.as_bytes()[..cut];
            let f = read_prefix(bytes, Some(CHAT.len() as u64));
            let want_model = (cut >= model_end).then_some("gpt-4o");
            assert_eq!(f.model.as_deref(), want_model, "cut at {cut}");
            let want_cap = (cut >= cap_end).then_some(1024);
            assert_eq!(f.estimate.output_tokens, want_cap, "cut at {cut}");
            assert_eq!(
                f.estimate.input_tokens,
                Some((CHAT.len() as u64).div_ceil(CHARS_PER_TOKEN)),
                "cut at {cut}"
            );
            let unknown = read_prefix(bytes, None);
            assert_eq!(unknown.model, f.model, "cut at {cut}");
            assert_eq!(
                unknown.estimate.input_tokens,
                (cut > 0).then(|| (cut as u64).div_ceil(CHARS_PER_TOKEN)),
                "cut at {cut}"
            );
        }
        let f = read_prefix(CHAT.as_bytes(), None);
        assert_eq!(f.model, whole.model);
        assert_eq!(f.estimate.output_tokens, whole.estimate.output_tokens);
    }

    #[test]
    fn prefix_with_the_model_after_the_messages() {
        let text = "lorem ipsum ".repeat(10_000);
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":"{text}"}}],"model":"x","max_tokens":9}}"#
        );
        let cut = body.find(r#""model""#).unwrap();
        for at in [cut / 2, cut - 1, cut, cut + 7, cut + 9] {
            let f = prefix(&body[..at], Some(body.len() as u64));
            assert_eq!(f.model, None, "cut at {at}");
            assert_eq!(f.estimate.output_tokens, None, "cut at {at}");
        }
        let f = prefix(&body[..cut + 11], None);
        assert_eq!(f.model.as_deref(), Some("x"));
        let f = prefix(&body, None);
        assert_eq!(f.model.as_deref(), Some("x"));
        assert_eq!(f.estimate.output_tokens, Some(9));
    }

    #[test]
    fn prefix_ignores_nested_models_and_models_inside_strings() {
        let body = r#"{"messages":[{"role":"user","content":"\"model\":\"in-a-string\",\"max_tokens\":7"},{"model":"in-a-message","max_tokens":8},{"role":"user","content":"unbalanced ]} and {[ in text"}],"metadata":{"model":"in-metadata","n":3},"tools":[[{"model":"deeper"}]],"model":"top","max_tokens":5}"#;
        let top = body.rfind(r#""model":"top""#).unwrap();
        for cut in 0..top + r#""model":"top""#.len() {
            let f = prefix(&body[..cut], None);
            assert_eq!(f.model, None, "cut at {cut}: {:?}", &body[..cut]);
            assert_eq!(f.estimate.output_tokens, None, "cut at {cut}");
            assert_eq!(f.estimate.images, None, "cut at {cut}");
        }
        let f = prefix(body, None);
        assert_eq!(f.model.as_deref(), Some("top"));
        assert_eq!(f.estimate.output_tokens, Some(5));
        assert_eq!(f.estimate.images, None);
        // A string value at top level that looks like members.
        let f = prefix(r#"{"prompt":"\",\"model\":\"sneaky","user":"u"#, None);
        assert_eq!(f.model, None);
    }

    #[test]
    fn prefix_with_escaped_quotes_and_backslashes() {
        let body = r#"{"prompt":"say \"hi\" \\","input":"\\\"model\\\":\"no\"","model":"a\"b\\c\u0064","mod\u0065l2":"no","max_\u0074okens":12,"x":1}"#;
        let f = prefix(body, None);
        assert_eq!(f.model.as_deref(), Some(r#"a"b\cd"#));
        assert_eq!(f.estimate.output_tokens, Some(12));
        assert_eq!(f.model, read(body.as_bytes()).model);
        // Cut inside an escape, or just after a backslash: not complete.
        let at = body.find(r#"\\c"#).unwrap() + 1;
        assert_eq!(prefix(&body[..at], None).model, None);
        let f = prefix(r#"{"model":"ab\"#, None);
        assert_eq!(f.model, None);
        let f = prefix(r#"{"model":"ab\""#, None);
        assert_eq!(f.model, None);
        // Invalid escapes or UTF-8 in the model leave it unset.
        assert_eq!(prefix(r#"{"model":"a\qb","#, None).model, None);
        assert_eq!(read_prefix(b"{\"model\":\"a\xffb\",", None).model, None);
    }

    #[test]
    fn prefix_of_an_anthropic_body_with_max_tokens_before_messages() {
        let body = r#"{"model":"claude-opus-4","max_tokens":4096,"system":"You are terse.","messages":[{"role":"user","content":"Summarise the following document: Lorem ipsum dolor sit amet"#;
        let f = prefix(body, Some(400_000));
        assert_eq!(f.model.as_deref(), Some("claude-opus-4"));
        assert_eq!(f.estimate.output_tokens, Some(4096));
        assert_eq!(f.estimate.input_tokens, Some(100_000));
    }

    #[test]
    fn prefix_of_a_five_megabyte_prompt_cut_at_one_mebibyte() {
        let filler = "All work and no play makes Jack a dull boy. ".repeat(5_000_000 / 44 + 1);
        let head = r#"{"model":"gpt-4o","max_tokens":2048,"messages":[{"role":"user","content":""#;
        let body = format!("{head}{filler}\"}}]}}");
        assert!(body.len() > 5_000_000);
        let f = read_prefix(&body.as_bytes()[..1 << 20], Some(5_000_000));
        assert_eq!(f.model.as_deref(), Some("gpt-4o"));
        assert_eq!(f.estimate.output_tokens, Some(2048));
        assert_eq!(f.estimate.input_tokens, Some(1_250_000));
        // Without a length, the prefix bounds the input from below.
        let f = read_prefix(&body.as_bytes()[..1 << 20], None);
        assert_eq!(f.estimate.input_tokens, Some((1 << 20) / 4));
        // A declared length shorter than what arrived is not believed.
        let f = read_prefix(&body.as_bytes()[..1 << 20], Some(10));
        assert_eq!(f.estimate.input_tokens, Some((1 << 20) / 4));
    }

    #[test]
    fn prefix_numbers_count_only_when_complete() {
        assert_eq!(
            prefix(r#"{"max_tokens":1024"#, None).estimate.output_tokens,
            None
        );
        for body in [
            r#"{"max_tokens":1024,"#,
            r#"{"max_tokens":1024 "#,
            r#"{"max_tokens":1024}"#,
            "{\"max_tokens\":1024\n",
        ] {
            assert_eq!(
                prefix(body, None).estimate.output_tokens,
                Some(1024),
                "{body}"
            );
        }
        for (body, cap) in [
            (r#"{"max_output_tokens":300,"#, Some(300)),
            (r#"{"max_completion_tokens":7,"#, Some(7)),
            (r#"{"max_tokens":"lots","#, None),
            (r#"{"max_tokens":-1,"#, None),
            (r#"{"max_tokens":1.5,"#, None),
            (r#"{"max_tokens":1,"max_tokens":2,"#, Some(2)),
            (r#"{"max_tokens":1,"max_tokens":{"a":2},"#, None),
            (r#"{"max_tokens":1,"max_tokens":2"#, Some(1)),
        ] {
            assert_eq!(prefix(body, None).estimate.output_tokens, cap, "{body}");
        }
    }

    #[test]
    fn prefix_reads_gemini_images_and_video_facts() {
        let f = prefix(
            r#"{"generationConfig":{"temperature":0.1,"stopSequences":["}"],"maxOutputTokens":256},"contents":[{"parts":[{"text":"abc"#,
            None,
        );
        assert_eq!(f.estimate.output_tokens, Some(256));
        // A config cut short still gives the members it completed.
        let f = prefix(r#"{"generationConfig":{"maxOutputTokens":64,"topK":"#, None);
        assert_eq!(f.estimate.output_tokens, Some(64));
        let f = prefix(r#"{"generationConfig":{"maxOutputTokens":64"#, None);
        assert_eq!(f.estimate.output_tokens, None);
        let f = prefix(
            r#"{"model":"gpt-image-1","n":3,"quality":"high","prompt":"a red fox in the sn"#,
            None,
        );
        assert_eq!(f.estimate.images, Some(3));
        assert_eq!(f.estimate.image_quality.as_deref(), Some("high"));
        let f = prefix(r#"{"model":"sora-2","seconds":"12","prompt":"wav"#, None);
        assert_eq!(
            f.estimate.video_seconds.map(|d| d.to_string()).as_deref(),
            Some("12")
        );
        let f = prefix(r#"{"model":"sora-2","duration":8.5,"prompt":"wav"#, None);
        assert_eq!(
            f.estimate.video_seconds.map(|d| d.to_string()).as_deref(),
            Some("8.5")
        );
    }

    #[test]
    fn prefix_of_a_whole_body_agrees_with_read() {
        for body in [
            CHAT,
            r#"{"model":"gpt-5","instructions":"abcd","input":"efgh","max_output_tokens":300}"#,
            r#"{"model":"gpt-image-1","prompt":"a red fox","n":3,"quality":"high","size":"1024x1024"}"#,
            r#"{"model":"claude-opus-4","system":"You are terse.","messages":[{"role":"user","content":"Hi"}],"max_tokens":1024,"stream":true}"#,
            r#"{"contents":[{"role":"user","parts":[{"text":"abcdefgh"}]}],"generationConfig":{"maxOutputTokens":256}}"#,
            r#"{"model":"sora-2","prompt":"waves","seconds":"12"}"#,
            r#" { "model" : "sora-2" , "duration" : 8.5 } "#,
            r#"{"model":42,"max_tokens":"lots","n":-1,"seconds":-5}"#,
            r#"{}"#,
        ] {
            let mut whole = read(body.as_bytes());
            let f = prefix(body, None);
            // The input differs by design: a prefix is approximated from
            // its length and keeps no prompt.
            whole.estimate.input_tokens = f.estimate.input_tokens;
            whole.estimate.prompt = None;
            assert_eq!(f, whole, "{body}");
        }
    }

    #[test]
    fn prefix_of_garbage_and_deep_nesting() {
        for body in [
            "",
            "not json",
            "[1,2,3]",
            "\"model\"",
            r#"{"model""#,
            r#"{"model":"#,
            r#"{"model" "x","#,
            r#"{model:"x","#,
            r#"{"a":1 "model":"x","#,
            r#"{"a":bogus,"model":"x","#,
            r#"{"a":,"model":"x","#,
            "}}}]]]\"\\",
        ] {
            let f = prefix(body, None);
            assert_eq!(f.model, None, "{body}");
            assert_eq!(f.estimate.output_tokens, None, "{body}");
        }
        // A megabyte of brackets is skipped without recursion.
        let deep = format!(r#"{{"max_tokens":3,"messages":{}"#, "[{".repeat(1 << 19));
        let f = prefix(&deep, None);
        assert_eq!(f.estimate.output_tokens, Some(3));
        let closed = format!(
            r#"{{"messages":{}{},"model":"m","#,
            "[".repeat(1 << 19),
            "]".repeat(1 << 19)
        );
        assert_eq!(prefix(&closed, None).model.as_deref(), Some("m"));
        let slashes = format!(r#"{{"prompt":"{}","model":"m","#, "\\\\".repeat(1 << 19));
        assert_eq!(prefix(&slashes, None).model.as_deref(), Some("m"));
    }

    #[test]
    fn prefix_of_random_bytes_never_panics() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        const JSONISH: &[u8] = b"{}[]\":,\\ \nmodel_tokens0123456789.-eE\xff\xc3";
        let seeds = [
            CHAT.as_bytes(),
            br#"{"model":"m","max_tokens":5}"#.as_slice(),
        ];
        for round in 0..4_000 {
            let len = (next() % 200) as usize;
            let bytes: Vec<u8> = match round % 3 {
                // Uniform bytes.
                0 => (0..len).map(|_| next() as u8).collect(),
                // Bytes drawn from JSON's punctuation and the keys.
                1 => (0..len)
                    .map(|_| JSONISH[(next() % JSONISH.len() as u64) as usize])
                    .collect(),
                // A real body, cut and with a few bytes changed.
                _ => {
                    let seed = seeds[(next() % 2) as usize];
                    let mut b = seed[..(next() as usize % (seed.len() + 1))].to_vec();
                    for _ in 0..(next() % 4) {
                        if !b.is_empty() {
                            let at = next() as usize % b.len();
                            b[at] = JSONISH[(next() % JSONISH.len() as u64) as usize];
                        }
                    }
                    b
                }
            };
            let f = read_prefix(&bytes, Some(next() % 10_000_000));
            assert!(f.estimate.input_tokens.is_some() || bytes.is_empty());
            let _ = read_prefix(&bytes, None);
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

    #[test]
    fn a_whole_body_keeps_its_prompt_for_an_exact_count() {
        use tollgate_core::policy::Tokenizer;
        // Chat: two messages, their contents as parts, their roles and the
        // name as framing.
        let f = est(
            r#"{"model":"gpt-4o","messages":[{"role":"system","content":"Hello, world!"},{"role":"user","name":"ann","content":[{"type":"text","text":"hello"},{"type":"image_url","image_url":{"url":"https://x"}}]}]}"#,
        );
        let p = f.estimate.prompt.expect("a prompt");
        assert_eq!(
            p,
            Prompt::new(
                vec!["Hello, world!".into(), "hello".into()],
                vec!["system".into(), "user".into(), "ann".into()],
                2
            )
        );
        assert_eq!(f.estimate.input_tokens, Some(18u64.div_ceil(4)));
        assert_eq!(p.approximate(), 5);
        // "Hello, world!" 4, "hello" 1, "system" "user" "ann" 3 (each one
        // token in both encodings), 3 a message, 3 for the reply.
        assert_eq!(p.count(Tokenizer::O200kBase), 4 + 1 + 3 + 6 + 3);

        // Responses: instructions and input text; no messages, no framing.
        let f = est(r#"{"model":"gpt-5","instructions":"hello","input":"Hello, world!"}"#);
        let p = f.estimate.prompt.expect("a prompt");
        assert_eq!(p.messages(), 0);
        assert_eq!(p.count(Tokenizer::O200kBase), 5);

        // A body with no text has no prompt, so the default applies.
        let f = est(r#"{"model":"gpt-4o","messages":[{"role":"user","content":""}]}"#);
        assert_eq!(f.estimate.prompt, None);
        assert_eq!(f.estimate.input_tokens, None);
    }

    #[test]
    fn a_large_or_cut_prompt_is_only_approximated() {
        let text = "a".repeat(EXACT_MAX_BYTES);
        let at =
            format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{text}"}}]}}"#);
        // The role's four bytes put it past the size.
        assert_eq!(est(&at).estimate.prompt, None);
        assert_eq!(
            est(&at).estimate.input_tokens,
            Some((EXACT_MAX_BYTES as u64).div_ceil(4))
        );
        let under = &text[..EXACT_MAX_BYTES - 4];
        let under =
            format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{under}"}}]}}"#);
        let p = est(&under).estimate.prompt.expect("a prompt");
        assert_eq!(p.bytes(), EXACT_MAX_BYTES);
        // The prefix of a cut body never carries its prompt.
        assert_eq!(prefix(&under, Some(1 << 20)).estimate.prompt, None);
    }
}
