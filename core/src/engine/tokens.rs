//! Input tokens of a prompt: counted exactly with OpenAI's encodings for
//! the models that use them, approximated at one token per four
//! characters for every other model.
//!
//! A front end that reads a prompt's text keeps it in the estimate as a
//! [`Prompt`]; the charge counts it at each model the plan prices, with
//! that model's [`Tokenizer`]: the one its price entry names, else the one
//! its name implies ([`tokenizer_for`]). A prompt of more than
//! [`EXACT_MAX_BYTES`] of text is approximated whatever the model.
//!
//! *Invariant: a count is a pure function of the text, the message framing
//! and the tokenizer; each exact count of a prompt is made at most once
//! (kept in the prompt, shared by its clones), so a decision that prices
//! several candidates, and its spend account, count it once per encoding.*

use std::sync::{Arc, OnceLock};

use crate::policy::{ModelPrice, Tokenizer};

/// Characters per token in the approximation.
pub const CHARS_PER_TOKEN: u64 = 4;

/// Prompts with more text than this are approximated: an exact count
/// costs 7 to 15 µs a KiB on a busy two-core machine (docs/PERFORMANCE.md),
/// so this bounds what one decision spends counting to about a
/// millisecond, while the prompts of most chat calls are far below it.
pub const EXACT_MAX_BYTES: usize = 64 * 1024;

/// Tokens OpenAI adds for each chat message (its start and end markers
/// and the separator after the role), and to prime the reply: the rule
/// of OpenAI's published token-counting guide for the gpt-4, gpt-4o and
/// later chat models.
pub const TOKENS_PER_MESSAGE: u64 = 3;
pub const TOKENS_PER_REPLY: u64 = 3;

/// The text of a request's prompt, as a front end read it: the text parts
/// (message contents, system prompts, instructions, inputs), and for chat
/// messages their roles and names. Cheap to clone.
#[derive(Clone)]
pub struct Prompt(Arc<Inner>);

struct Inner {
    parts: Vec<Box<str>>,
    framing: Vec<Box<str>>,
    messages: u64,
    chars: u64,
    bytes: usize,
    o200k: OnceLock<u64>,
    cl100k: OnceLock<u64>,
}

impl Prompt {
    /// `parts`: the text counted as input. `framing`: the roles (and
    /// names) of `messages` chat messages, counted only by an exact
    /// tokenizer, with [`TOKENS_PER_MESSAGE`] each and
    /// [`TOKENS_PER_REPLY`] once.
    pub fn new(parts: Vec<Box<str>>, framing: Vec<Box<str>>, messages: u64) -> Prompt {
        let chars = parts
            .iter()
            .map(|p| p.chars().count() as u64)
            .fold(0, u64::saturating_add);
        let bytes = parts
            .iter()
            .chain(&framing)
            .map(|p| p.len())
            .fold(0, usize::saturating_add);
        Prompt(Arc::new(Inner {
            parts,
            framing,
            messages,
            chars,
            bytes,
            o200k: OnceLock::new(),
            cl100k: OnceLock::new(),
        }))
    }

    /// A prompt of one text part and no messages.
    pub fn text(text: &str) -> Prompt {
        Prompt::new(vec![text.into()], Vec::new(), 0)
    }

    /// Bytes of text, framing included.
    pub fn bytes(&self) -> usize {
        self.0.bytes
    }

    /// Characters of the text parts.
    pub fn chars(&self) -> u64 {
        self.0.chars
    }

    pub fn messages(&self) -> u64 {
        self.0.messages
    }

    /// The approximation: one token per [`CHARS_PER_TOKEN`] characters of
    /// the text parts, rounded up.
    pub fn approximate(&self) -> u64 {
        self.0.chars.div_ceil(CHARS_PER_TOKEN)
    }

    /// How this prompt is counted under `tokenizer`: exactly, unless the
    /// tokenizer is the approximation or the prompt is over
    /// [`EXACT_MAX_BYTES`].
    pub fn method(&self, tokenizer: Tokenizer) -> Tokenizer {
        if self.0.bytes > EXACT_MAX_BYTES {
            Tokenizer::Approximate
        } else {
            tokenizer
        }
    }

    /// The input tokens of this prompt under `tokenizer` (see
    /// [`Prompt::method`]).
    pub fn count(&self, tokenizer: Tokenizer) -> u64 {
        let (memo, encoding) = match self.method(tokenizer) {
            Tokenizer::Approximate => return self.approximate(),
            Tokenizer::O200kBase => (&self.0.o200k, o200k()),
            Tokenizer::Cl100kBase => (&self.0.cl100k, cl100k()),
        };
        *memo.get_or_init(|| {
            let text = self
                .0
                .parts
                .iter()
                .chain(&self.0.framing)
                .map(|p| encoding.count(p) as u64)
                .fold(0, u64::saturating_add);
            let framing = if self.0.messages > 0 {
                self.0
                    .messages
                    .saturating_mul(TOKENS_PER_MESSAGE)
                    .saturating_add(TOKENS_PER_REPLY)
            } else {
                0
            };
            text.saturating_add(framing)
        })
    }
}

impl PartialEq for Prompt {
    fn eq(&self, other: &Prompt) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.parts == other.0.parts
                && self.0.framing == other.0.framing
                && self.0.messages == other.0.messages)
    }
}

impl Eq for Prompt {}

impl std::fmt::Debug for Prompt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the text: a prompt is the caller's data.
        f.debug_struct("Prompt")
            .field("bytes", &self.0.bytes)
            .field("messages", &self.0.messages)
            .finish()
    }
}

/// The exact count of one text under an encoding, without message
/// framing; the approximation for [`Tokenizer::Approximate`]. Any length.
pub fn count_text(tokenizer: Tokenizer, text: &str) -> u64 {
    match tokenizer {
        Tokenizer::O200kBase => o200k().count(text) as u64,
        Tokenizer::Cl100kBase => cl100k().count(text) as u64,
        Tokenizer::Approximate => (text.chars().count() as u64).div_ceil(CHARS_PER_TOKEN),
    }
}

/// The tokenizer of a model: its price entry's `tokenizer`, else the one
/// its name implies.
pub fn tokenizer_for(model: Option<&str>, price: Option<&ModelPrice>) -> Tokenizer {
    price
        .and_then(|p| p.tokenizer)
        .or_else(|| model.map(tokenizer_by_name))
        .unwrap_or(Tokenizer::Approximate)
}

/// The encoding OpenAI's models use, by name: `o200k_base` for gpt-4o,
/// gpt-4.1, gpt-4.5, gpt-5, gpt-oss, the o-series (o1, o3, o4) and codex;
/// `cl100k_base` for gpt-4, gpt-3.5 (Azure's `gpt-35`), text-embedding-3
/// and text-embedding-ada-002. A provider prefix (`openai/gpt-4o`) and a
/// fine-tune's `ft:` are looked through. Every other model (Anthropic's,
/// Google's, Mistral's, Meta's...) is approximated: their tokenizers are
/// not published as OpenAI's are, or not in a form compiled in here.
pub fn tokenizer_by_name(model: &str) -> Tokenizer {
    let name = model.rsplit('/').next().unwrap_or(model);
    let name = name
        .strip_prefix("ft:")
        .unwrap_or(name)
        .to_ascii_lowercase();
    // The family name, then the end, a `-` or a `.`: `gpt-4` is not
    // `gpt-4o`, and `o1` is not `o10x`.
    let family = |prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['-', '.', ':']))
    };
    const O200K: [&str; 11] = [
        "gpt-4o",
        "chatgpt-4o",
        "gpt-4.1",
        "gpt-4.5",
        "gpt-5",
        "gpt-oss",
        "o1",
        "o3",
        "o4",
        "codex",
        "codex-mini",
    ];
    const CL100K: [&str; 5] = [
        "gpt-4",
        "gpt-3.5",
        "gpt-35",
        "text-embedding-3",
        "text-embedding-ada-002",
    ];
    if O200K.iter().any(|p| family(p)) {
        Tokenizer::O200kBase
    } else if CL100K.iter().any(|p| family(p)) {
        Tokenizer::Cl100kBase
    } else {
        Tokenizer::Approximate
    }
}

/// Loads both vocabularies (about 0.2 s, once per process), so that the
/// first request that needs one does not wait for it.
pub fn warm() {
    let _ = (o200k(), cl100k());
}

fn o200k() -> &'static tiktoken::CoreBpe {
    tiktoken::get_encoding("o200k_base").expect("o200k_base is compiled in")
}

fn cl100k() -> &'static tiktoken::CoreBpe {
    tiktoken::get_encoding("cl100k_base").expect("cl100k_base is compiled in")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Counts agreed by three independent implementations (tiktoken-rs,
    // GitHub's bpe-openai and tiktoken) over the comparison of
    // docs/PERFORMANCE.md; none is taken from this crate's own output.
    const KNOWN: [(&str, u64, u64); 16] = [
        // (text, o200k_base, cl100k_base)
        ("", 0, 0),
        ("hello", 1, 1),
        ("Hello, world!", 4, 4),
        ("The quick brown fox jumps over the lazy dog.", 10, 10),
        ("tabs\tand\nnewlines\r\n\r\n\n", 7, 7),
        ("numbers 1234567890 3.14159 -42 1e-9 0x1F", 23, 23),
        ("I'm we'll they've she'd IT'S DON'T", 7, 12),
        ("日本語のテキストです。東京は大きい都市です。", 16, 21),
        ("مرحبا بالعالم، هذا نص عربي", 8, 20),
        ("Привет, мир! Ёжик", 8, 11),
        (
            "emoji 😀🎉👍🏽 👨\u{200d}👩\u{200d}👧\u{200d}👦 🏳\u{fe0f}\u{200d}🌈 ❤\u{fe0f}",
            26,
            39,
        ),
        ("café naïve résumé e\u{301} a\u{308}", 9, 12),
        (
            "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{x:?}\");\n}\n",
            36,
            36,
        ),
        (
            "{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
            21,
            20,
        ),
        // Special tokens are text in a prompt, never markers.
        ("<|endoftext|> special looking text <|im_start|>", 16, 15),
        ("\u{200b}\u{feff}zero width\u{a0}nbsp", 6, 6),
    ];

    #[test]
    fn exact_counts_of_known_strings() {
        for (text, o200k, cl100k) in KNOWN {
            assert_eq!(count_text(Tokenizer::O200kBase, text), o200k, "{text:?}");
            assert_eq!(count_text(Tokenizer::Cl100kBase, text), cl100k, "{text:?}");
            let prompt = Prompt::text(text);
            assert_eq!(prompt.count(Tokenizer::O200kBase), o200k, "{text:?}");
            assert_eq!(prompt.count(Tokenizer::Cl100kBase), cl100k, "{text:?}");
            assert_eq!(
                prompt.count(Tokenizer::Approximate),
                (text.chars().count() as u64).div_ceil(4)
            );
        }
    }

    #[test]
    fn parts_are_counted_apart_and_messages_framed() {
        // Two messages: each part alone, each role, 3 a message, 3 for the
        // reply.
        let p = Prompt::new(
            vec!["Hello, world!".into(), "hello".into()],
            vec!["system".into(), "user".into()],
            2,
        );
        let roles =
            count_text(Tokenizer::O200kBase, "system") + count_text(Tokenizer::O200kBase, "user");
        assert_eq!(roles, 2);
        assert_eq!(p.count(Tokenizer::O200kBase), 4 + 1 + 2 + 2 * 3 + 3);
        // The approximation counts the text parts only, as it always has.
        assert_eq!(p.count(Tokenizer::Approximate), 18u64.div_ceil(4));
        // Counted once, then read back.
        assert_eq!(p.clone().count(Tokenizer::O200kBase), 16);
    }

    #[test]
    fn encoding_by_model_family() {
        for m in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4o-2024-08-06",
            "chatgpt-4o-latest",
            "gpt-4.1",
            "gpt-4.1-nano",
            "gpt-4.5-preview",
            "gpt-5",
            "gpt-5-mini",
            "gpt-5.1",
            "o1",
            "o1-mini",
            "o3",
            "o3-mini",
            "o4-mini",
            "openai/gpt-4o",
            "ft:gpt-4o-mini:acme::abc",
            "GPT-4o",
        ] {
            assert_eq!(tokenizer_by_name(m), Tokenizer::O200kBase, "{m}");
        }
        for m in [
            "gpt-4",
            "gpt-4-turbo",
            "gpt-4-0613",
            "gpt-4-32k",
            "gpt-3.5-turbo",
            "gpt-35-turbo",
            "text-embedding-3-small",
            "text-embedding-ada-002",
            "azure/gpt-4",
        ] {
            assert_eq!(tokenizer_by_name(m), Tokenizer::Cl100kBase, "{m}");
        }
        for m in [
            "claude-sonnet-4-5",
            "claude-3-5-haiku",
            "gemini-2.5-pro",
            "mistral-large",
            "llama-3.1-70b",
            "o10x",
            "gpt-4oo",
            "gpt",
            "",
        ] {
            assert_eq!(tokenizer_by_name(m), Tokenizer::Approximate, "{m}");
        }
    }

    #[test]
    fn a_price_entry_names_the_tokenizer_over_the_name() {
        let price = ModelPrice {
            tokenizer: Some(Tokenizer::Cl100kBase),
            ..Default::default()
        };
        assert_eq!(
            tokenizer_for(Some("gpt-4o"), Some(&price)),
            Tokenizer::Cl100kBase
        );
        assert_eq!(
            tokenizer_for(Some("my-proxy-model"), Some(&price)),
            Tokenizer::Cl100kBase
        );
        assert_eq!(
            tokenizer_for(Some("gpt-4o"), Some(&ModelPrice::default())),
            Tokenizer::O200kBase
        );
        assert_eq!(tokenizer_for(None, None), Tokenizer::Approximate);
    }

    #[test]
    fn a_prompt_over_the_size_is_approximated() {
        // "hello " is one token a repeat in o200k_base ("hello" then
        // " hello"...), far from four characters a token.
        let at = "hello ".repeat(EXACT_MAX_BYTES / 6);
        assert!(at.len() <= EXACT_MAX_BYTES);
        let p = Prompt::text(&at);
        assert_eq!(p.method(Tokenizer::O200kBase), Tokenizer::O200kBase);
        let exact = p.count(Tokenizer::O200kBase);
        assert_eq!(exact, count_text(Tokenizer::O200kBase, &at));
        assert_ne!(exact, p.approximate());

        let over = "hello ".repeat(EXACT_MAX_BYTES / 6 + 1);
        assert!(over.len() > EXACT_MAX_BYTES);
        let p = Prompt::text(&over);
        assert_eq!(p.method(Tokenizer::O200kBase), Tokenizer::Approximate);
        assert_eq!(
            p.count(Tokenizer::O200kBase),
            (over.len() as u64).div_ceil(4)
        );
    }
}
