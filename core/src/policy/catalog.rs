//! Price catalogs imported with `pricing.import`: LiteLLM's
//! `model_prices_and_context_window.json` and OpenRouter's models list.
//!
//! The JSON is read by a small reader of its own into the policy's
//! positioned tree, so that every entry keeps its line and column and every
//! number keeps its source text: `2.5e-06` becomes the exact decimal
//! 0.0000025, never a float. (serde_json's `arbitrary_precision` would
//! also keep the text, but a cargo feature is shared by the whole build and
//! would change how every other crate's JSON numbers behave.)

use std::collections::BTreeMap;
use std::str::FromStr;

use rust_decimal::Decimal;

use super::model::{ImagePrice, LongContext, ModelPrice, Origin};
use super::yaml::{Node, Pos, Value};
use super::Diagnostic;

/// The largest catalog accepted: LiteLLM's full catalog is a few MiB.
pub const MAX_CATALOG_BYTES: u64 = 32 * 1024 * 1024;

/// Deeper than any catalog; keeps a hostile file from overflowing the stack.
const MAX_DEPTH: usize = 32;

/// More values than any catalog holds (LiteLLM's has a few hundred
/// thousand); bounds the memory a file of tiny values can take.
pub const MAX_CATALOG_VALUES: usize = 4_000_000;

/// Which format a catalog is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogFormat {
    LiteLlm,
    OpenRouter,
}

impl CatalogFormat {
    pub fn name(self) -> &'static str {
        match self {
            CatalogFormat::LiteLlm => "LiteLLM",
            CatalogFormat::OpenRouter => "OpenRouter",
        }
    }
}

/// A catalog's usable prices, by exact model name, with where each entry is.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub format: Option<CatalogFormat>,
    pub prices: Vec<(String, ModelPrice, Origin)>,
    /// Entries that could not be used, with why: for `validate` to show.
    pub skipped: Vec<(Origin, String)>,
}

/// Reads a catalog. A file that is not JSON, or not one of the two formats,
/// is an error; an entry that cannot be used is skipped and reported.
pub fn read(file: &str, text: &str) -> Result<Catalog, Diagnostic> {
    let fail = |pos: Pos, message: String| Diagnostic {
        file: file.to_string(),
        pos,
        message,
    };
    let root = Json::new(text)
        .document()
        .map_err(|(pos, m)| fail(pos, format!("invalid JSON: {m}")))?;
    let Value::Map(entries) = &root.value else {
        return Err(fail(
            root.pos,
            "a price catalog is a JSON object: LiteLLM's model map, or OpenRouter's \
             `{\"data\": [...]}`"
                .to_string(),
        ));
    };
    let mut out = Catalog::default();
    let origin = |pos: Pos| Origin {
        file: file.to_string(),
        pos,
    };
    let data = entries
        .iter()
        .find(|(k, v)| scalar(k) == Some("data") && matches!(v.value, Value::Seq(_)));
    if let Some((_, data)) = data {
        out.format = Some(CatalogFormat::OpenRouter);
        let Value::Seq(models) = &data.value else {
            unreachable!()
        };
        for m in models {
            match openrouter_entry(m) {
                Ok((name, price)) => out.prices.push((name, price, origin(m.pos))),
                Err(why) => out.skipped.push((origin(m.pos), why)),
            }
        }
        return Ok(out);
    }
    out.format = Some(CatalogFormat::LiteLlm);
    // `{quality}/{width}-x-{height}/{model}` entries priced per pixel,
    // gathered into the model's price by quality.
    let mut images: BTreeMap<String, (BTreeMap<String, Decimal>, Pos)> = BTreeMap::new();
    for (k, v) in entries {
        let Some(name) = scalar(k) else { continue };
        if name == "sample_spec" {
            continue;
        }
        if let Some((quality, pixels, model)) = image_entry_name(name) {
            match field(v, "input_cost_per_pixel").or_else(|| field(v, "output_cost_per_pixel")) {
                Some(Ok(per_pixel)) => {
                    let slot = images
                        .entry(model.to_string())
                        .or_insert_with(|| (BTreeMap::new(), k.pos));
                    slot.0
                        .insert(quality.to_string(), per_pixel * Decimal::from(pixels));
                }
                Some(Err(why)) => out
                    .skipped
                    .push((origin(k.pos), format!("`{name}`: {why}"))),
                None => out.skipped.push((
                    origin(k.pos),
                    format!("`{name}`: an image entry with no `input_cost_per_pixel`"),
                )),
            }
            continue;
        }
        match litellm_entry(v) {
            Ok(price) => out.prices.push((name.to_string(), price, origin(k.pos))),
            Err(why) => out
                .skipped
                .push((origin(k.pos), format!("`{name}`: {why}"))),
        }
    }
    for (model, (by_quality, pos)) in images {
        if let Some((_, price, _)) = out.prices.iter_mut().find(|(n, _, _)| *n == model) {
            if price.per_image.is_none() {
                price.per_image = Some(ImagePrice::ByQuality(by_quality));
            }
        } else {
            out.prices.push((
                model,
                ModelPrice {
                    per_image: Some(ImagePrice::ByQuality(by_quality)),
                    ..ModelPrice::default()
                },
                origin(pos),
            ));
        }
    }
    Ok(out)
}

/// `low/1024-x-1024/gpt-image-1` as (quality, pixels, model).
fn image_entry_name(name: &str) -> Option<(&str, u64, &str)> {
    let mut parts = name.splitn(3, '/');
    let quality = parts.next()?;
    let size = parts.next()?;
    let model = parts.next()?;
    let (w, h) = size.split_once("-x-")?;
    let pixels = w.parse::<u64>().ok()?.checked_mul(h.parse::<u64>().ok()?)?;
    matches!(quality, "low" | "medium" | "high" | "standard" | "hd")
        .then_some((quality, pixels, model))
}

fn litellm_entry(entry: &Node) -> Result<ModelPrice, String> {
    if !matches!(entry.value, Value::Map(_)) {
        return Err(format!("expected an object, found {}", entry.kind()));
    }
    let million = Decimal::from(1_000_000);
    let mut p = ModelPrice::default();
    let per_mtok = |key: &str| {
        field(entry, key)
            .transpose()
            .map(|d| d.map(|d| (d * million).normalize()))
    };
    p.input_per_mtok = per_mtok("input_cost_per_token")?;
    p.output_per_mtok = per_mtok("output_cost_per_token")?;
    p.cached_input_per_mtok = per_mtok("cache_read_input_token_cost")?;
    p.cache_write_per_mtok = per_mtok("cache_creation_input_token_cost")?;
    p.reasoning_per_mtok = per_mtok("output_cost_per_reasoning_token")?;
    p.audio_input_per_mtok = per_mtok("input_cost_per_audio_token")?;
    p.audio_output_per_mtok = per_mtok("output_cost_per_audio_token")?;
    let long = LongContext {
        above_input_tokens: 200_000,
        input_per_mtok: per_mtok("input_cost_per_token_above_200k_tokens")?,
        cached_input_per_mtok: per_mtok("cache_read_input_token_cost_above_200k_tokens")?,
        cache_write_per_mtok: per_mtok("cache_creation_input_token_cost_above_200k_tokens")?,
        output_per_mtok: per_mtok("output_cost_per_token_above_200k_tokens")?,
    };
    if long
        != (LongContext {
            above_input_tokens: 200_000,
            ..LongContext::default()
        })
    {
        p.long_context = Some(long);
    }
    p.per_request = field(entry, "input_cost_per_request").transpose()?;
    if let Some(d) = field(entry, "output_cost_per_image").transpose()? {
        p.per_image = Some(ImagePrice::Flat(d));
    }
    p.per_video_second = field(entry, "output_cost_per_video_per_second").transpose()?;
    if let Some(per_second) = field(entry, "input_cost_per_second").transpose()? {
        p.per_audio_minute = Some((per_second * Decimal::from(60)).normalize());
    }
    if p == ModelPrice::default() {
        return Err(
            "no price tollgate can use (no per-token, per-request, per-image, \
                    per-second or video price)"
                .to_string(),
        );
    }
    Ok(p)
}

fn openrouter_entry(entry: &Node) -> Result<(String, ModelPrice), String> {
    let id = match get(entry, "id").and_then(scalar) {
        Some(id) if !id.trim().is_empty() => id.to_string(),
        _ => return Err("an entry with no `id`".to_string()),
    };
    let Some(pricing) = get(entry, "pricing") else {
        return Err(format!("`{id}`: no `pricing`"));
    };
    let million = Decimal::from(1_000_000);
    let per_mtok = |key: &str| {
        field(pricing, key)
            .transpose()
            .map(|d| d.map(|d| (d * million).normalize()))
            .map_err(|e| format!("`{id}`: {e}"))
    };
    let mut p = ModelPrice {
        input_per_mtok: per_mtok("prompt")?,
        output_per_mtok: per_mtok("completion")?,
        cached_input_per_mtok: per_mtok("input_cache_read")?,
        cache_write_per_mtok: per_mtok("input_cache_write")?,
        reasoning_per_mtok: per_mtok("internal_reasoning")?.filter(|d| !d.is_zero()),
        ..ModelPrice::default()
    };
    if let Some(fee) = field(pricing, "web_search")
        .transpose()
        .map_err(|e| format!("`{id}`: {e}"))?
    {
        if !fee.is_zero() {
            p.per_call.insert("web_search".to_string(), fee);
        }
    }
    p.per_request = field(pricing, "request")
        .transpose()
        .map_err(|e| format!("`{id}`: {e}"))?
        .filter(|d| !d.is_zero());
    if p.input_per_mtok.is_none() && p.output_per_mtok.is_none() {
        return Err(format!("`{id}`: no `prompt` or `completion` price"));
    }
    Ok((id, p))
}

fn get<'a>(node: &'a Node, key: &str) -> Option<&'a Node> {
    let Value::Map(entries) = &node.value else {
        return None;
    };
    entries
        .iter()
        .find(|(k, _)| scalar(k) == Some(key))
        .map(|(_, v)| v)
}

fn scalar(node: &Node) -> Option<&str> {
    match &node.value {
        Value::Scalar { text, .. } => Some(text),
        _ => None,
    }
}

/// A price field as an exact decimal from its text (a JSON number, or a
/// string holding one as OpenRouter writes them); `None` when absent or
/// null. Negative prices (OpenRouter's `-1` for "varies") are refused.
fn field(node: &Node, key: &str) -> Option<Result<Decimal, String>> {
    let v = get(node, key)?;
    let text = match &v.value {
        Value::Null => return None,
        Value::Scalar { text, .. } => text.trim(),
        _ => {
            return Some(Err(format!(
                "`{key}` at {} is {}, not a number",
                v.pos,
                v.kind()
            )))
        }
    };
    Some(match exact(text) {
        Some(d) if d.is_sign_negative() && !d.is_zero() => {
            Err(format!("`{key}` at {} is negative ({text})", v.pos))
        }
        Some(d) => Ok(d.normalize()),
        None => Err(format!("`{key}` at {} is not a number: {text:?}", v.pos)),
    })
}

/// A decimal from the text of a JSON number, exponent included.
pub fn exact(text: &str) -> Option<Decimal> {
    if text.contains(['e', 'E']) {
        Decimal::from_scientific(text).ok()
    } else {
        Decimal::from_str(text).ok()
    }
}

/// A JSON reader that keeps positions and numbers' text.
struct Json<'a> {
    bytes: &'a [u8],
    at: usize,
    line: u32,
    line_start: usize,
    depth: usize,
    values: usize,
    /// The last column worked out: (byte offset, characters since the
    /// line's start), so that positions on one long line (a minified
    /// catalog) cost what was read since, not the whole line again.
    col_cache: std::cell::Cell<(usize, usize)>,
}

type Fail = (Pos, String);

impl<'a> Json<'a> {
    fn new(text: &'a str) -> Json<'a> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        Json {
            bytes: text.as_bytes(),
            at: 0,
            line: 1,
            line_start: 0,
            depth: 0,
            values: 0,
            col_cache: std::cell::Cell::new((0, 0)),
        }
    }

    fn pos(&self) -> Pos {
        // Columns count characters, as the YAML reader's do: bytes that
        // do not continue a UTF-8 sequence.
        let (mut from, mut chars) = self.col_cache.get();
        if from < self.line_start || from > self.at {
            (from, chars) = (self.line_start, 0);
        }
        chars += self.bytes[from..self.at]
            .iter()
            .filter(|&&b| b & 0xc0 != 0x80)
            .count();
        self.col_cache.set((self.at, chars));
        let col = chars;
        Pos {
            line: self.line,
            col: col as u32 + 1,
        }
    }

    fn fail<T>(&self, message: impl Into<String>) -> Result<T, Fail> {
        Err((self.pos(), message.into()))
    }

    fn skip_space(&mut self) {
        while let Some(&b) = self.bytes.get(self.at) {
            match b {
                b'\n' => {
                    self.at += 1;
                    self.line += 1;
                    self.line_start = self.at;
                }
                b' ' | b'\t' | b'\r' => self.at += 1,
                _ => break,
            }
        }
    }

    fn document(mut self) -> Result<Node, Fail> {
        let node = self.value()?;
        self.skip_space();
        if self.at < self.bytes.len() {
            return self.fail("text after the end of the document");
        }
        Ok(node)
    }

    fn value(&mut self) -> Result<Node, Fail> {
        self.skip_space();
        let pos = self.pos();
        let Some(&b) = self.bytes.get(self.at) else {
            return self.fail("unexpected end of the file");
        };
        self.values += 1;
        if self.values > MAX_CATALOG_VALUES {
            return self.fail(format!(
                "more than {MAX_CATALOG_VALUES} values in one catalog"
            ));
        }
        let value = match b {
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return self.fail(format!("nested more than {MAX_DEPTH} levels deep"));
                }
                self.at += 1;
                let v = if b == b'{' {
                    self.object()?
                } else {
                    self.array()?
                };
                self.depth -= 1;
                v
            }
            b'"' => Value::Scalar {
                text: self.string()?,
                quoted: true,
            },
            b't' | b'f' | b'n' => {
                let word = [&b"true"[..], b"false", b"null"]
                    .into_iter()
                    .find(|w| self.bytes[self.at..].starts_with(w));
                let Some(word) = word else {
                    return self.fail("unexpected character");
                };
                self.at += word.len();
                if word == b"null" {
                    Value::Null
                } else {
                    Value::Scalar {
                        text: String::from_utf8_lossy(word).into_owned(),
                        quoted: false,
                    }
                }
            }
            b'-' | b'0'..=b'9' => Value::Scalar {
                text: self.number()?,
                quoted: false,
            },
            _ => return self.fail("unexpected character"),
        };
        Ok(Node { value, pos })
    }

    fn object(&mut self) -> Result<Value, Fail> {
        let mut entries = Vec::new();
        self.skip_space();
        if self.bytes.get(self.at) == Some(&b'}') {
            self.at += 1;
            return Ok(Value::Map(entries));
        }
        loop {
            self.skip_space();
            let pos = self.pos();
            if self.bytes.get(self.at) != Some(&b'"') {
                return self.fail("expected a quoted key");
            }
            let key = Node {
                value: Value::Scalar {
                    text: self.string()?,
                    quoted: true,
                },
                pos,
            };
            self.skip_space();
            if self.bytes.get(self.at) != Some(&b':') {
                return self.fail("expected `:`");
            }
            self.at += 1;
            let value = self.value()?;
            entries.push((key, value));
            self.skip_space();
            match self.bytes.get(self.at) {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(Value::Map(entries));
                }
                _ => return self.fail("expected `,` or `}`"),
            }
        }
    }

    fn array(&mut self) -> Result<Value, Fail> {
        let mut items = Vec::new();
        self.skip_space();
        if self.bytes.get(self.at) == Some(&b']') {
            self.at += 1;
            return Ok(Value::Seq(items));
        }
        loop {
            items.push(self.value()?);
            self.skip_space();
            match self.bytes.get(self.at) {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(Value::Seq(items));
                }
                _ => return self.fail("expected `,` or `]`"),
            }
        }
    }

    fn number(&mut self) -> Result<String, Fail> {
        let start = self.at;
        while let Some(&b) = self.bytes.get(self.at) {
            if b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E') {
                self.at += 1;
            } else {
                break;
            }
        }
        let text = std::str::from_utf8(&self.bytes[start..self.at]).unwrap_or_default();
        if !valid_number(text) {
            self.at = start;
            return self.fail(format!("not a JSON number: {text:?}"));
        }
        Ok(text.to_string())
    }

    fn string(&mut self) -> Result<String, Fail> {
        self.at += 1; // the opening quote
        let mut out = String::new();
        loop {
            let start = self.at;
            while let Some(&b) = self.bytes.get(self.at) {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.at += 1;
            }
            // The input is a `str` and the stops are ASCII, so this slice
            // falls on character boundaries.
            out.push_str(std::str::from_utf8(&self.bytes[start..self.at]).unwrap_or_default());
            match self.bytes.get(self.at) {
                Some(b'"') => {
                    self.at += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.at += 1;
                    let Some(&e) = self.bytes.get(self.at) else {
                        return self.fail("unterminated string");
                    };
                    self.at += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hex = |s: &Self| {
                                s.bytes
                                    .get(s.at..s.at + 4)
                                    .and_then(|h| std::str::from_utf8(h).ok())
                                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                            };
                            let Some(mut c) = hex(self) else {
                                return self.fail("bad \\u escape");
                            };
                            self.at += 4;
                            if (0xd800..0xdc00).contains(&c)
                                && self.bytes.get(self.at..self.at + 2) == Some(b"\\u")
                            {
                                self.at += 2;
                                let Some(low) = hex(self) else {
                                    return self.fail("bad \\u escape");
                                };
                                self.at += 4;
                                c = 0x10000
                                    + ((c - 0xd800) << 10)
                                    + (low.wrapping_sub(0xdc00) & 0x3ff);
                            }
                            out.push(char::from_u32(c).unwrap_or('\u{fffd}'));
                        }
                        _ => return self.fail("bad escape in a string"),
                    }
                }
                Some(_) => return self.fail("a control character in a string"),
                None => return self.fail("unterminated string"),
            }
        }
    }
}

/// JSON's number grammar: `-? int frac? exp?`.
fn valid_number(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let s = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > s
    };
    if b.get(i) == Some(&b'0') {
        i += 1;
    } else if !digits(&mut i) {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn litellm_numbers_are_exact_from_their_text() {
        let text = r#"{
  "sample_spec": { "input_cost_per_token": 0 },
  "gpt-4o": {
    "input_cost_per_token": 2.5e-06,
    "output_cost_per_token": 1e-05,
    "cache_read_input_token_cost": 1.25e-06,
    "litellm_provider": "openai",
    "supported_regions": ["global"]
  },
  "tiny": { "input_cost_per_token": 3.3333333333333333e-08, "output_cost_per_token": 0.0000001 },
  "whisper-1": { "input_cost_per_second": 0.0001, "mode": "audio_transcription" },
  "no-price": { "mode": "chat", "max_tokens": 8192 },
  "bad": { "input_cost_per_token": "cheap" }
}"#;
        let c = read("c.json", text).unwrap();
        assert_eq!(c.format, Some(CatalogFormat::LiteLlm));
        let price = |name: &str| c.prices.iter().find(|(n, _, _)| n == name).unwrap();
        let (_, gpt, origin) = price("gpt-4o");
        assert_eq!(gpt.input_per_mtok, Some(d("2.5")));
        assert_eq!(gpt.output_per_mtok, Some(d("10")));
        assert_eq!(gpt.cached_input_per_mtok, Some(d("1.25")));
        assert_eq!(origin.to_string(), "c.json:3:3");
        // 17 significant digits survive, which no f64 would keep.
        assert_eq!(
            price("tiny").1.input_per_mtok,
            Some(d("0.033333333333333333"))
        );
        assert_eq!(price("tiny").1.output_per_mtok, Some(d("0.1")));
        assert_eq!(price("whisper-1").1.per_audio_minute, Some(d("0.006")));
        let skipped: Vec<String> = c.skipped.iter().map(|(o, m)| format!("{o}: {m}")).collect();
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(
            skipped[0].starts_with("c.json:12:3: `no-price`: no price"),
            "{skipped:?}"
        );
        assert!(skipped[1].starts_with("c.json:13:3: `bad`"), "{skipped:?}");
        assert!(
            skipped[1].contains("at 13:36 is not a number"),
            "{skipped:?}"
        );
    }

    #[test]
    fn litellm_cache_writes_reasoning_audio_and_long_context() {
        let text = r#"{
  "claude-sonnet-4": {
    "input_cost_per_token": 3e-06,
    "output_cost_per_token": 1.5e-05,
    "cache_creation_input_token_cost": 3.75e-06,
    "cache_read_input_token_cost": 3e-07,
    "input_cost_per_token_above_200k_tokens": 6e-06,
    "output_cost_per_token_above_200k_tokens": 2.25e-05
  },
  "gpt-4o-audio-preview": {
    "input_cost_per_token": 2.5e-06,
    "output_cost_per_token": 1e-05,
    "input_cost_per_audio_token": 4e-05,
    "output_cost_per_audio_token": 8e-05,
    "output_cost_per_reasoning_token": 1.2e-05
  }
}"#;
        let c = read("c.json", text).unwrap();
        let sonnet = &c.prices[0].1;
        assert_eq!(sonnet.cache_write_per_mtok, Some(d("3.75")));
        assert_eq!(sonnet.cached_input_per_mtok, Some(d("0.3")));
        let long = sonnet.long_context.as_ref().unwrap();
        assert_eq!(long.above_input_tokens, 200_000);
        assert_eq!(long.input_per_mtok, Some(d("6")));
        assert_eq!(long.output_per_mtok, Some(d("22.5")));
        let audio = &c.prices[1].1;
        assert_eq!(audio.audio_input_per_mtok, Some(d("40")));
        assert_eq!(audio.audio_output_per_mtok, Some(d("80")));
        assert_eq!(audio.reasoning_per_mtok, Some(d("12")));
        assert!(audio.long_context.is_none());
    }

    #[test]
    fn openrouter_prices_are_strings_per_token() {
        let text = r#"{"data": [
 {"id": "openai/gpt-4o", "pricing": {"prompt": "0.0000025", "completion": "0.00001", "request": "0", "input_cache_read": "0.00000125"}},
 {"id": "openrouter/auto", "pricing": {"prompt": "-1", "completion": "-1"}},
 {"id": "perplexity/sonar", "pricing": {"prompt": "0.000001", "completion": "0.000001", "request": "0.005"}}
]}"#;
        let c = read("or.json", text).unwrap();
        assert_eq!(c.format, Some(CatalogFormat::OpenRouter));
        assert_eq!(c.prices.len(), 2);
        assert_eq!(c.prices[0].0, "openai/gpt-4o");
        assert_eq!(c.prices[0].1.input_per_mtok, Some(d("2.5")));
        assert_eq!(c.prices[0].1.per_request, None);
        assert_eq!(c.prices[0].2.to_string(), "or.json:2:2");
        assert_eq!(c.prices[1].1.per_request, Some(d("0.005")));
        assert_eq!(c.skipped.len(), 1);
        assert!(c.skipped[0].1.contains("negative"), "{:?}", c.skipped);
    }

    #[test]
    fn image_entries_priced_per_pixel_give_a_price_by_quality() {
        let text = r#"{
  "low/1024-x-1024/gpt-image-1": { "input_cost_per_pixel": 1.049041748046875e-08 },
  "high/1024-x-1024/gpt-image-1": { "input_cost_per_pixel": 1.5926361083984375e-07 }
}"#;
        let c = read("c.json", text).unwrap();
        let Some(ImagePrice::ByQuality(q)) = &c.prices[0].1.per_image else {
            panic!("{:?}", c.prices)
        };
        assert_eq!(q["low"], d("0.011"));
        assert_eq!(q["high"], d("0.167"));
    }

    #[test]
    fn malformed_json_is_a_positioned_error() {
        for (text, at) in [
            ("{\"a\": 1,\n \"b\": }", "2:7"),
            ("{\"a\": 01}", "1:7"),
            ("{\"é\": 01}", "1:7"),
            ("[1, 2]", "1:1"),
            ("{\"a\": \"x}", "1:10"),
            ("{\"a\": 1} x", "1:10"),
        ] {
            let e = read("c.json", text).unwrap_err();
            assert_eq!(e.pos.to_string(), at, "{text}: {}", e.message);
        }
        // One long line, as a minified catalog is: read in linear time.
        let many = format!("{{\"a\": [{}1]}}", "1,".repeat(MAX_CATALOG_VALUES));
        assert!(read("c.json", &many)
            .unwrap_err()
            .message
            .contains("more than 4000000 values"));
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        assert!(read("c.json", &deep)
            .unwrap_err()
            .message
            .contains("nested"));
        assert!(valid_number("-0.5e+3") && !valid_number("1.") && !valid_number("--1"));
    }
}
