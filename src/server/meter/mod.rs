//! Metering an AI API response as it streams past: what the call really
//! used, read from the body chunk by chunk, in bounded memory, without
//! I/O.
//!
//! A [`Meter`] is made per response from its API (by request path) and
//! whether it is an event stream (content type `text/event-stream`), fed
//! every body chunk, split anywhere, and finished at the end of the
//! stream or when it is cut. It reads two things:
//!
//! - **What the API reported**: the usage record(s) of the body or of its
//!   events, and the model that served. Each count takes the latest value
//!   any record gave it (records repeat and refine counts as a stream
//!   goes on); see [`Reported`] for what each API's counts become.
//! - **What it counted**: the characters of generated text (message
//!   content, text deltas, tool-call arguments, reasoning text where the
//!   API streams it), one token per four characters, rounded up: the
//!   same rule the request estimate uses. This is the
//!   fallback for a response that reports nothing (a stream without
//!   `stream_options.include_usage`, one cut before its usage arrived).
//!
//! Memory: the meter holds no body bytes. SSE framing is read by
//! [`sse`]'s reader and each event's data is fed, as it arrives, to a
//! streaming JSON scanner that keeps only a key, a model name and an
//! event `type` (at most [`MAX_HELD`] bytes in all, in fixed arrays) and
//! skips everything else by counting brackets. An event or body of any
//! size (a 100 MB event, a base64 image, a million floats, no newline at
//! all) costs time linear in its bytes and no memory; invalid JSON ends
//! the reading of that event only (the next event is read afresh), and
//! invalid UTF-8 is never decoded. Nothing in it panics on any input.
//!
//! [`sse::Splitter`] is the piece for rewriting a stream: it yields whole
//! events and holds back an incomplete one, up to a bound.

mod json;
pub mod sse;

#[cfg(test)]
mod tests;

use json::{Member, Node, Scanner, Slot, SHORT_MAX};

use super::body::CHARS_PER_TOKEN;

/// The APIs a response can be metered for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    OpenAiChat,
    OpenAiCompletions,
    OpenAiResponses,
    OpenAiEmbeddings,
    OpenAiImages,
    Anthropic,
    Gemini,
}

impl Api {
    /// The API a request path calls, by its end (any prefix before it, as
    /// Azure's `/openai/deployments/{d}` or a gateway's `/api`, and any
    /// query are ignored): `/v1/chat/completions`, `/v1/completions`,
    /// `/v1/responses`, `/v1/embeddings`, `/v1/images/generations`,
    /// `/edits` or `/variations`, `/v1/messages`, a Gemini
    /// `…/models/{model}:generateContent` or `:streamGenerateContent`,
    /// and Anthropic on Vertex (`…/publishers/anthropic/models/{model}:rawPredict`
    /// or `:streamRawPredict`). None for anything else.
    pub fn from_path(path: &str) -> Option<Api> {
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let path = path.trim_end_matches('/');
        let last = path.rsplit('/').next().unwrap_or_default();
        if let Some((_, method)) = last.split_once(':') {
            return match method {
                "generateContent" | "streamGenerateContent" if path.contains("/models/") => {
                    Some(Api::Gemini)
                }
                "rawPredict" | "streamRawPredict" if path.contains("/publishers/anthropic/") => {
                    Some(Api::Anthropic)
                }
                _ => None,
            };
        }
        let ends = |tail: &str| path.ends_with(tail);
        if ends("/chat/completions") {
            Some(Api::OpenAiChat)
        } else if ends("/completions") {
            Some(Api::OpenAiCompletions)
        } else if ends("/responses") {
            Some(Api::OpenAiResponses)
        } else if ends("/embeddings") {
            Some(Api::OpenAiEmbeddings)
        } else if ends("/images/generations") || ends("/images/edits") || ends("/images/variations")
        {
            Some(Api::OpenAiImages)
        } else if ends("/messages") {
            Some(Api::Anthropic)
        } else {
            None
        }
    }

    /// What this API's bodies and events are read for.
    fn schema(self) -> &'static Node {
        match self {
            Api::OpenAiChat => &CHAT,
            Api::OpenAiCompletions => &COMPLETIONS,
            Api::OpenAiResponses => &RESPONSES,
            Api::OpenAiEmbeddings => &EMBEDDINGS,
            Api::OpenAiImages => &IMAGES,
            Api::Anthropic => &ANTHROPIC,
            Api::Gemini => &GEMINI,
        }
    }
}

/// What a response used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metered {
    /// What the API reported; None when it reported nothing (no usage
    /// record closed and no image was seen).
    pub reported: Option<Reported>,
    /// The model that served, as the response names it (`model`;
    /// Gemini's `modelVersion`).
    pub model: Option<String>,
    /// Output tokens counted from the generated text.
    pub counted_output_tokens: u64,
    /// Body bytes fed.
    pub bytes: u64,
    /// The response reached the mark the API sends once the output is
    /// complete: a final usage record, OpenAI's `data: [DONE]`, Gemini's
    /// `finishReason`, or the end of a JSON body's value. False for a
    /// stream cut short.
    pub complete: bool,
}

/// Usage the API reported, in tollgate's terms: `input_tokens` includes
/// the cached ones, and `output_tokens` includes reasoning.
///
/// | API | input_tokens | cached_input_tokens | output_tokens |
/// | --- | --- | --- | --- |
/// | OpenAI chat, completions, embeddings | `prompt_tokens` | `prompt_tokens_details.cached_tokens` | `completion_tokens` (reasoning included; embeddings: 0) |
/// | OpenAI responses, images | `input_tokens` | `input_tokens_details.cached_tokens` | `output_tokens` (reasoning included) |
/// | Anthropic | `input_tokens + cache_creation_input_tokens + cache_read_input_tokens` | `cache_read_input_tokens` | `output_tokens` |
/// | Gemini | `promptTokenCount + toolUsePromptTokenCount` | `cachedContentTokenCount` | `candidatesTokenCount + thoughtsTokenCount` |
///
/// Anthropic's `input_tokens` excludes both cache counts, so they are
/// added. Cache writes are priced above plain input (1.25× or 2×), but the
/// settle form has no price for them: they count as uncached input, the
/// nearest it can say (under by the write premium). Gemini's
/// `promptTokenCount` already includes the cached tokens; tool-use prompt
/// tokens are billed as input, and thoughts as output. Embeddings without
/// `prompt_tokens` take `total_tokens`.
///
/// Where the only record read comes before the output (Anthropic's
/// `message_start`, a Gemini chunk before `finishReason`), the stream was
/// cut and its output figure is a lower bound: `output_tokens` is then the
/// greater of it and the counted estimate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reported {
    pub input_tokens: u64,
    /// Never more than `input_tokens`.
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    /// Of `output_tokens`, those spent reasoning, where reported.
    pub reasoning_tokens: u64,
    /// Of `input_tokens`, those written to the prompt cache (Anthropic's
    /// `cache_creation_input_tokens`), billed at their own rate.
    pub cache_write_tokens: u64,
    /// Images generated: the entries of an images response's `data`, or
    /// its stream's `image_generation.completed` / `image_edit.completed`
    /// events.
    pub images: u64,
}

/// The most bytes a meter holds of a response at any time: a JSON key,
/// a model name or `type` in progress, an SSE field and event name.
pub const MAX_HELD: usize = json::KEY_MAX + SHORT_MAX + sse::FIELD_MAX + sse::NAME_MAX;

/// Reads one response: see the module's documentation.
#[derive(Debug, Clone)]
pub struct Meter {
    api: Api,
    /// Some for an event stream.
    events: Option<sse::Reader>,
    scan: Scanner,
    totals: Totals,
    bytes: u64,
}

/// What a stream's events add up to, beyond what the scanner keeps.
#[derive(Debug, Clone, Default)]
struct Totals {
    /// Characters of generated text in the events done.
    chars: u64,
    /// Images from `*.completed` events.
    images: u64,
    /// The current event's data, while it is short enough to be `[DONE]`.
    head: json::Short<8>,
    /// The current event's data is longer than `head`.
    long: bool,
}

impl Meter {
    /// `event_stream`: the response is `text/event-stream`; otherwise it is
    /// one JSON value (for Gemini also a JSON array of responses, as
    /// `streamGenerateContent` sends without `alt=sse`).
    pub fn new(api: Api, event_stream: bool) -> Meter {
        Meter {
            api,
            events: event_stream.then(sse::Reader::default),
            scan: Scanner::new(api.schema(), !event_stream && api == Api::Gemini),
            totals: Totals::default(),
            bytes: 0,
        }
    }

    /// Reads the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.bytes = self.bytes.saturating_add(chunk.len() as u64);
        match &mut self.events {
            None => self.scan.feed(chunk),
            Some(reader) => reader.feed(
                chunk,
                &mut Events {
                    scan: &mut self.scan,
                    totals: &mut self.totals,
                },
            ),
        }
    }

    /// Output tokens counted so far from the generated text, the event in
    /// progress included: for checking an overrun while the stream runs.
    pub fn counted_output_tokens(&self) -> u64 {
        self.totals
            .chars
            .saturating_add(self.scan.found.text_chars)
            .div_ceil(CHARS_PER_TOKEN)
    }

    /// What the response used, at the end of the stream or when it was cut.
    pub fn finish(mut self) -> Metered {
        let complete = match &mut self.events {
            None => {
                self.totals.chars = self.totals.chars.saturating_add(self.scan.found.text_chars);
                self.scan.done()
            }
            Some(reader) => {
                reader.finish(&mut Events {
                    scan: &mut self.scan,
                    totals: &mut self.totals,
                });
                false
            }
        };
        let found = &self.scan.found;
        let complete = complete || found.finished;
        let counted = self.totals.chars.div_ceil(CHARS_PER_TOKEN);
        Metered {
            reported: report(
                self.api,
                found,
                found.images.saturating_add(self.totals.images),
                complete,
                counted,
            ),
            model: decode(found.model.as_bytes()),
            counted_output_tokens: counted,
            bytes: self.bytes,
            complete,
        }
    }

    /// Bytes of the response held right now; never more than [`MAX_HELD`].
    #[doc(hidden)]
    pub fn held_bytes(&self) -> usize {
        self.scan.held() + self.events.as_ref().map_or(0, sse::Reader::held)
    }
}

/// Events of a stream, as the meter takes them.
struct Events<'a> {
    scan: &'a mut Scanner,
    totals: &'a mut Totals,
}

/// Responses stream events whose `delta` is not generated text.
const NOT_TEXT: [&[u8]; 1] = [b"response.audio.delta"];
/// Image stream events that each deliver one image.
const IMAGE_DONE: [&[u8]; 2] = [b"image_generation.completed", b"image_edit.completed"];

impl sse::Sink for Events<'_> {
    fn data(&mut self, bytes: &[u8]) {
        self.scan.feed(bytes);
        let totals = &mut *self.totals;
        if !totals.long {
            totals.long = !totals.head.push(bytes);
        }
    }

    fn dispatch(&mut self, name: &[u8]) {
        let totals = &mut *self.totals;
        let found = &mut self.scan.found;
        let kind = match found.kind.as_bytes() {
            [] => name,
            kind => kind,
        };
        if !NOT_TEXT.contains(&kind) {
            totals.chars = totals.chars.saturating_add(found.text_chars);
        }
        if IMAGE_DONE.contains(&kind) {
            totals.images = totals.images.saturating_add(1);
        }
        // OpenAI's streams end with `data: [DONE]`.
        if !totals.long && totals.head.as_bytes() == b"[DONE]" {
            found.finished = true;
        }
        totals.head.clear();
        totals.long = false;
        self.scan.reset();
    }
}

/// What the counts read mean for `api`: see [`Reported`].
fn report(
    api: Api,
    found: &json::Found,
    images: u64,
    complete: bool,
    counted: u64,
) -> Option<Reported> {
    if !found.usage && images == 0 {
        return None;
    }
    let get = |slot: Slot| found.counts[slot as usize];
    let n = |slot: Slot| get(slot).unwrap_or(0);
    let (input, output, reasoning) = match api {
        Api::Anthropic => (
            n(Slot::Input)
                .saturating_add(n(Slot::CacheWrite))
                .saturating_add(n(Slot::Cached)),
            n(Slot::Output),
            0,
        ),
        Api::Gemini => (
            n(Slot::Input).saturating_add(n(Slot::ToolPrompt)),
            n(Slot::Output).saturating_add(n(Slot::Reasoning)),
            n(Slot::Reasoning),
        ),
        Api::OpenAiEmbeddings => (get(Slot::Input).or(get(Slot::Total)).unwrap_or(0), 0, 0),
        _ => (n(Slot::Input), n(Slot::Output), n(Slot::Reasoning)),
    };
    let output = if complete {
        output
    } else {
        output.max(counted)
    };
    Some(Reported {
        input_tokens: input,
        cached_input_tokens: n(Slot::Cached).min(input),
        output_tokens: output,
        reasoning_tokens: reasoning.min(output),
        cache_write_tokens: match api {
            Api::Anthropic => n(Slot::CacheWrite).min(input),
            _ => 0,
        },
        images,
    })
}

/// A model name from its raw JSON string bytes; None if empty or not
/// valid (bad UTF-8, a bad escape).
fn decode(raw: &[u8]) -> Option<String> {
    let text = if raw.contains(&b'\\') {
        let mut quoted = Vec::with_capacity(raw.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(raw);
        quoted.push(b'"');
        serde_json::from_slice::<String>(&quoted).ok()?
    } else {
        std::str::from_utf8(raw).ok()?.to_string()
    };
    (!text.is_empty()).then_some(text)
}

// The schemas: which members of each API's bodies and events are read.
// One schema per API serves both its JSON body and its stream events
// (their members do not collide).

const OPENAI_USAGE: &[Member] = &[
    ("prompt_tokens", Node::Count(Slot::Input)),
    ("completion_tokens", Node::Count(Slot::Output)),
    ("total_tokens", Node::Count(Slot::Total)),
    (
        "prompt_tokens_details",
        Node::Object(&[("cached_tokens", Node::Count(Slot::Cached))]),
    ),
    (
        "completion_tokens_details",
        Node::Object(&[("reasoning_tokens", Node::Count(Slot::Reasoning))]),
    ),
];

const RESPONSES_USAGE: &[Member] = &[
    ("input_tokens", Node::Count(Slot::Input)),
    ("output_tokens", Node::Count(Slot::Output)),
    ("total_tokens", Node::Count(Slot::Total)),
    (
        "input_tokens_details",
        Node::Object(&[("cached_tokens", Node::Count(Slot::Cached))]),
    ),
    (
        "output_tokens_details",
        Node::Object(&[("reasoning_tokens", Node::Count(Slot::Reasoning))]),
    ),
];

const ANTHROPIC_USAGE: &[Member] = &[
    ("input_tokens", Node::Count(Slot::Input)),
    ("output_tokens", Node::Count(Slot::Output)),
    ("cache_read_input_tokens", Node::Count(Slot::Cached)),
    ("cache_creation_input_tokens", Node::Count(Slot::CacheWrite)),
];

const GEMINI_USAGE: &[Member] = &[
    ("promptTokenCount", Node::Count(Slot::Input)),
    ("cachedContentTokenCount", Node::Count(Slot::Cached)),
    ("candidatesTokenCount", Node::Count(Slot::Output)),
    ("thoughtsTokenCount", Node::Count(Slot::Reasoning)),
    ("toolUsePromptTokenCount", Node::Count(Slot::ToolPrompt)),
    ("totalTokenCount", Node::Count(Slot::Total)),
];

/// A chat message (`choices[].message`) or its stream delta
/// (`choices[].delta`). `reasoning_content` is what OpenAI-compatible
/// servers stream reasoning as.
const CHAT_MESSAGE: &[Member] = &[
    ("content", Node::Text),
    ("refusal", Node::Text),
    ("reasoning_content", Node::Text),
    (
        "tool_calls",
        Node::Array(&Node::Object(&[(
            "function",
            Node::Object(&[("arguments", Node::Text)]),
        )])),
    ),
];

/// Chat completions: the body, or each `chat.completion.chunk` (whose
/// `usage` is null but in the last, with `stream_options.include_usage`).
static CHAT: Node = Node::Object(&[
    ("model", Node::Model),
    (
        "usage",
        Node::Usage {
            members: OPENAI_USAGE,
            last: true,
        },
    ),
    (
        "choices",
        Node::Array(&Node::Object(&[
            ("message", Node::Object(CHAT_MESSAGE)),
            ("delta", Node::Object(CHAT_MESSAGE)),
        ])),
    ),
]);

static COMPLETIONS: Node = Node::Object(&[
    ("model", Node::Model),
    (
        "usage",
        Node::Usage {
            members: OPENAI_USAGE,
            last: true,
        },
    ),
    (
        "choices",
        Node::Array(&Node::Object(&[("text", Node::Text)])),
    ),
]);

/// Responses: the body (`output[]` items: message content, reasoning
/// summaries, function-call arguments), or each event: the terminal
/// `response.completed`, `response.incomplete` and `response.failed`
/// carry `response.usage`; the `*.delta` events carry text in `delta`.
static RESPONSES: Node = Node::Object(&[
    ("model", Node::Model),
    (
        "usage",
        Node::Usage {
            members: RESPONSES_USAGE,
            last: true,
        },
    ),
    (
        "output",
        Node::Array(&Node::Object(&[
            (
                "content",
                Node::Array(&Node::Object(&[
                    ("text", Node::Text),
                    ("refusal", Node::Text),
                ])),
            ),
            (
                "summary",
                Node::Array(&Node::Object(&[("text", Node::Text)])),
            ),
            ("arguments", Node::Text),
        ])),
    ),
    ("type", Node::Kind),
    ("delta", Node::Text),
    (
        "response",
        Node::Object(&[
            ("model", Node::Model),
            (
                "usage",
                Node::Usage {
                    members: RESPONSES_USAGE,
                    last: true,
                },
            ),
        ]),
    ),
]);

static EMBEDDINGS: Node = Node::Object(&[
    ("model", Node::Model),
    (
        "usage",
        Node::Usage {
            members: OPENAI_USAGE,
            last: true,
        },
    ),
]);

/// Images: the body's `data` entries, or the stream's events.
static IMAGES: Node = Node::Object(&[
    ("model", Node::Model),
    (
        "usage",
        Node::Usage {
            members: RESPONSES_USAGE,
            last: true,
        },
    ),
    ("data", Node::Array(&Node::Image)),
    ("type", Node::Kind),
]);

/// Anthropic Messages: the body, or each event: `message_start` carries
/// `message.usage` (input counts, output so far), `content_block_delta`
/// the text (`text_delta`, `thinking_delta`, `input_json_delta`), and
/// `message_delta` the cumulative `usage`.
static ANTHROPIC: Node = Node::Object(&[
    ("model", Node::Model),
    (
        "usage",
        Node::Usage {
            members: ANTHROPIC_USAGE,
            last: true,
        },
    ),
    (
        "content",
        Node::Array(&Node::Object(&[
            ("text", Node::Text),
            ("thinking", Node::Text),
        ])),
    ),
    (
        "message",
        Node::Object(&[
            ("model", Node::Model),
            (
                "usage",
                Node::Usage {
                    members: ANTHROPIC_USAGE,
                    last: false,
                },
            ),
        ]),
    ),
    (
        "delta",
        Node::Object(&[
            ("text", Node::Text),
            ("thinking", Node::Text),
            ("partial_json", Node::Text),
        ]),
    ),
]);

/// Gemini: a `GenerateContentResponse`, the body or each chunk of a
/// stream. Every chunk may carry `usageMetadata`; the one with a
/// `finishReason` is the last.
static GEMINI: Node = Node::Object(&[
    ("modelVersion", Node::Model),
    (
        "usageMetadata",
        Node::Usage {
            members: GEMINI_USAGE,
            last: false,
        },
    ),
    (
        "candidates",
        Node::Array(&Node::Object(&[
            (
                "content",
                Node::Object(&[("parts", Node::Array(&Node::Object(&[("text", Node::Text)])))]),
            ),
            ("finishReason", Node::End),
        ])),
    ),
]);
