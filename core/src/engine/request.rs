//! What a decision is made about: the request's attributes and its usage
//! estimate, both already free of raw secrets.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

use super::RequestError;
use crate::policy::{hex, Attr, AttrLookup, CompiledPolicy, ATTEMPT_KINDS, MODALITIES};

/// The longest attribute value accepted; longer ones are refused, not cut.
pub const MAX_VALUE_LEN: usize = 256;
pub const MAX_LABELS: usize = 32;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// The key's registry id, or `sha256:<prefix>` for an unregistered key.
    /// Never a raw key.
    pub key: Option<String>,
    pub team: Option<String>,
    pub workflow: Option<String>,
    pub environment: Option<String>,
    pub model: Option<String>,
    pub modality: Option<String>,
    pub customer: Option<String>,
    pub user: Option<String>,
    pub action: Option<String>,
    pub attempt_kind: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Filled from the policy's families for `model`; not set by callers.
    pub families: Vec<String>,
}

impl Attributes {
    pub fn get(&self, attr: &Attr) -> Option<&str> {
        match attr {
            Attr::Key => self.key.as_deref(),
            Attr::Team => self.team.as_deref(),
            Attr::Workflow => self.workflow.as_deref(),
            Attr::Environment => self.environment.as_deref(),
            Attr::Model => self.model.as_deref(),
            Attr::ModelFamily => self.families.first().map(String::as_str),
            Attr::Modality => self.modality.as_deref(),
            Attr::Customer => self.customer.as_deref(),
            Attr::User => self.user.as_deref(),
            Attr::Action => self.action.as_deref(),
            Attr::AttemptKind => self.attempt_kind.as_deref(),
            Attr::Label(name) => self.labels.get(name).map(String::as_str),
        }
    }

    pub fn slot(&mut self, attr: &Attr) -> Option<&mut Option<String>> {
        Some(match attr {
            Attr::Key => &mut self.key,
            Attr::Team => &mut self.team,
            Attr::Workflow => &mut self.workflow,
            Attr::Environment => &mut self.environment,
            Attr::Model => &mut self.model,
            Attr::Modality => &mut self.modality,
            Attr::Customer => &mut self.customer,
            Attr::User => &mut self.user,
            Attr::Action => &mut self.action,
            Attr::AttemptKind => &mut self.attempt_kind,
            Attr::ModelFamily | Attr::Label(_) => return None,
        })
    }

    /// Sets an attribute by name, treating empty values as absent.
    pub fn set(&mut self, attr: &Attr, value: String) {
        if value.is_empty() {
            return;
        }
        match attr {
            Attr::Label(name) => {
                self.labels.insert(name.clone(), value);
            }
            Attr::ModelFamily => {}
            other => {
                if let Some(slot) = self.slot(other) {
                    *slot = Some(value);
                }
            }
        }
    }

    /// Refuses empty requests, and values that are oversized or outside
    /// their closed sets.
    pub fn validate(&self) -> Result<(), RequestError> {
        let named =
            Attr::WELL_KNOWN.iter().any(|a| self.get(a).is_some()) || !self.labels.is_empty();
        if !named {
            return Err(RequestError::invalid(
                "the request carries no attributes; give at least a key, team, model or another \
                 attribute so that its budgets can be found",
            ));
        }
        for attr in Attr::WELL_KNOWN.iter().filter(|a| **a != Attr::ModelFamily) {
            if let Some(v) = self.get(attr) {
                check_len(attr.name(), v)?;
            }
        }
        if self.labels.len() > MAX_LABELS {
            return Err(RequestError::invalid(format!(
                "{} labels given; at most {MAX_LABELS} are accepted",
                self.labels.len()
            )));
        }
        for (name, value) in &self.labels {
            check_len("a label name", name)?;
            check_len(name, value)?;
        }
        if let Some(m) = &self.modality {
            if !MODALITIES.contains(&m.as_str()) {
                return Err(RequestError::invalid(format!(
                    "modality {m:?} is not one of {}",
                    MODALITIES.join(", ")
                )));
            }
        }
        if let Some(k) = &self.attempt_kind {
            if !ATTEMPT_KINDS.contains(&k.as_str()) {
                return Err(RequestError::invalid(format!(
                    "attempt_kind {k:?} is not one of {}",
                    ATTEMPT_KINDS.join(", ")
                )));
            }
        }
        Ok(())
    }
}

fn check_len(name: &str, value: &str) -> Result<(), RequestError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(RequestError::invalid(format!(
            "attribute `{name}` is {} bytes long; at most {MAX_VALUE_LEN} are accepted",
            value.len()
        )));
    }
    // Values travel in store records, keys and account rows, which a
    // newline or another control character would break.
    if value.chars().any(char::is_control) {
        return Err(RequestError::invalid(format!(
            "attribute `{name}` holds a control character; attribute values are text on one line"
        )));
    }
    Ok(())
}

impl AttrLookup for Attributes {
    fn value(&self, attr: &Attr) -> Option<&str> {
        self.get(attr)
    }

    fn families(&self) -> &[String] {
        &self.families
    }
}

/// The SHA-256 of a raw API key. The raw key goes no further than this.
pub fn hash_key(raw: &str) -> [u8; 32] {
    Sha256::digest(raw.trim().as_bytes()).into()
}

/// Where an attribute's value came from, most trusted first. A value from
/// a more trusted source is never replaced by a less trusted one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// The route (Envoy `context_extensions`, the auth endpoint's query),
    /// a header the edge proxy sets, or a trusted service on the native API.
    Route,
    /// The key registry entry of the request's API key.
    Registry,
    /// A header the client set itself.
    Client,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Route => "route",
            Source::Registry => "registry",
            Source::Client => "client",
        }
    }
}

/// Resolves a hashed key against the registry: the key attribute becomes
/// the registered id, and the registry fills attributes the route left
/// empty. An unregistered key is known by a prefix of its hash. Returns
/// the attributes the registry filled.
pub fn apply_key(
    policy: &CompiledPolicy,
    attrs: &mut Attributes,
    sha256: &[u8; 32],
) -> Option<Vec<Attr>> {
    match policy.key_by_hash(sha256) {
        Some(entry) => {
            attrs.key = Some(entry.id.clone());
            let mut filled = Vec::new();
            for (attr, value) in &entry.attributes {
                if attrs.get(attr).is_none() {
                    attrs.set(attr, value.clone());
                    filled.push(attr.clone());
                }
            }
            Some(filled)
        }
        None => {
            attrs.key = Some(format!("sha256:{}", hex(&sha256[..8])));
            None
        }
    }
}

/// Fills what is still empty from the client's own attributes, the least
/// trusted source. Returns the attributes it filled.
pub fn fill_from_client(attrs: &mut Attributes, client: &Attributes) -> Vec<Attr> {
    let mut filled = Vec::new();
    let named = Attr::WELL_KNOWN
        .iter()
        .cloned()
        .chain(client.labels.keys().map(|l| Attr::Label(l.clone())));
    for attr in named {
        if attr == Attr::Key || attr == Attr::ModelFamily || attrs.get(&attr).is_some() {
            continue;
        }
        if let Some(v) = client.get(&attr) {
            attrs.set(&attr, v.to_string());
            filled.push(attr);
        }
    }
    filled
}

/// What the caller expects a request to use. Absent fields are filled from
/// the policy's defaults by modality.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Estimate {
    pub input_tokens: Option<u64>,
    pub cached_input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub images: Option<u64>,
    pub image_quality: Option<String>,
    pub video_seconds: Option<Decimal>,
    pub audio_seconds: Option<Decimal>,
    /// Cache writes, reasoning and audio tokens, batch, calls with a fee.
    pub detail: super::charge::Detail,
    /// The prompt's text, when the front end read it: counted at each
    /// model priced with that model's tokenizer, in place of
    /// `input_tokens` (which then holds the approximation).
    pub prompt: Option<super::tokens::Prompt>,
}

/// Upper bounds on one request's usage; anything larger is refused as
/// absurd rather than risk overflow or a budget-wiping typo.
pub const MAX_TOKENS: u64 = 100_000_000;
pub const MAX_IMAGES: u64 = 10_000;
pub const MAX_MEDIA_SECONDS: u64 = 7 * 86_400;
/// Kinds of calls with a fee one request may name.
pub const MAX_CALL_KINDS: usize = 16;

impl Estimate {
    pub fn validate(&self) -> Result<(), RequestError> {
        let tokens = [
            ("input_tokens", self.input_tokens),
            ("cached_input_tokens", self.cached_input_tokens),
            ("output_tokens", self.output_tokens),
        ];
        for (name, v) in tokens {
            bound(name, v, MAX_TOKENS)?;
        }
        if let (Some(cached), Some(input)) = (self.cached_input_tokens, self.input_tokens) {
            if cached > input {
                return Err(RequestError::invalid(format!(
                    "cached_input_tokens ({cached}) exceeds input_tokens ({input})"
                )));
            }
        }
        let d = &self.detail;
        for (name, v) in [
            ("cache_write_tokens", d.cache_write_tokens),
            ("reasoning_tokens", d.reasoning_tokens),
            ("audio_input_tokens", d.audio_input_tokens),
            ("audio_output_tokens", d.audio_output_tokens),
        ] {
            bound(name, Some(v), MAX_TOKENS)?;
        }
        if d.calls.len() > MAX_CALL_KINDS {
            return Err(RequestError::invalid(format!(
                "more than {MAX_CALL_KINDS} kinds of calls with a fee"
            )));
        }
        for (name, n) in &d.calls {
            check_len("calls", name)?;
            bound("calls", Some(*n), MAX_IMAGES)?;
        }
        bound("images", self.images, MAX_IMAGES)?;
        if let Some(q) = &self.image_quality {
            check_len("image_quality", q)?;
        }
        for (name, v) in [
            ("video_seconds", self.video_seconds),
            ("audio_seconds", self.audio_seconds),
        ] {
            if let Some(v) = v {
                if v.is_sign_negative() && !v.is_zero() {
                    return Err(RequestError::invalid(format!(
                        "{name} must not be negative, got {v}"
                    )));
                }
                if v > Decimal::from(MAX_MEDIA_SECONDS) {
                    return Err(RequestError::invalid(format!(
                        "{name} of {v} is beyond the accepted maximum of {MAX_MEDIA_SECONDS}"
                    )));
                }
            }
        }
        Ok(())
    }
}

fn bound(name: &str, v: Option<u64>, max: u64) -> Result<(), RequestError> {
    match v {
        Some(v) if v > max => Err(RequestError::invalid(format!(
            "{name} of {v} is beyond the accepted maximum of {max}"
        ))),
        _ => Ok(()),
    }
}

/// The longest decimal text accepted: more digits than any real amount
/// has, and a bound on what a hostile caller can make us parse.
const MAX_AMOUNT_TEXT: usize = 40;

/// The one reader of decimal amounts a caller sends (seconds of video or
/// audio, a grant's extra): exact, non-negative, `-0` taken as zero.
pub fn parse_amount(field: &str, text: &str) -> Result<Decimal, RequestError> {
    let text = text.trim();
    if text.len() > MAX_AMOUNT_TEXT {
        return Err(RequestError::invalid(format!(
            "`{field}` is too long for a number"
        )));
    }
    match text.parse::<Decimal>() {
        Ok(d) if d.is_zero() => Ok(Decimal::ZERO),
        Ok(d) if d.is_sign_negative() => Err(RequestError::invalid(format!(
            "`{field}` must not be negative, got {text}"
        ))),
        Ok(d) => Ok(d),
        Err(_) => Err(RequestError::invalid(format!(
            "`{field}` must be a decimal number, got {text:?}"
        ))),
    }
}

#[cfg(test)]
mod amount_tests {
    use super::*;

    #[test]
    fn amounts_are_exact_non_negative_and_bounded() {
        assert_eq!(parse_amount("x", "0.1").unwrap().to_string(), "0.1");
        assert_eq!(parse_amount("x", " 12 ").unwrap(), Decimal::from(12));
        assert_eq!(parse_amount("x", "-0").unwrap(), Decimal::ZERO);
        assert_eq!(parse_amount("x", "-0.000").unwrap(), Decimal::ZERO);
        for bad in ["-1", "-0.5", "abc", "1,5", "", &"9".repeat(41)] {
            let e = parse_amount("usage.video_seconds", bad).unwrap_err();
            assert!(
                e.to_string().contains("`usage.video_seconds`"),
                "{bad}: {e}"
            );
        }
    }
}
