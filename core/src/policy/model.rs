//! The policy set as the rest of tollgate sees it: plain data, already
//! validated. Nothing here knows about YAML.

use std::collections::BTreeMap;
use std::fmt;

use rust_decimal::Decimal;

use super::glob::Pattern;
use super::yaml::Pos;

/// Where a piece of policy was written, for messages.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    pub file: String,
    pub pos: Pos,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.pos)
    }
}

#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub pricing: Pricing,
    pub keys: Vec<KeyEntry>,
    pub defaults: Defaults,
    pub attributes: AttributeMapping,
    pub notifiers: Vec<Notifier>,
    pub rules: Vec<Rule>,
    /// Problems that do not stop the set from loading, for `validate` and
    /// `/status` to show.
    pub warnings: Vec<(Origin, String)>,
}

/// The notifier every set has: alerts as structured log lines.
pub const LOG_NOTIFIER: &str = "log";

/// The store log that holds the approvals audit trail; no alert stream may
/// take its name.
pub const APPROVALS_LOG: &str = "approvals";

/// Where alert crossings go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notifier {
    pub id: String,
    pub kind: NotifierKind,
    /// Rules without `notify` use every notifier marked default (or the
    /// built-in `log` notifier when none is).
    pub default: bool,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifierKind {
    /// A structured log line on the server's log output.
    Log,
    /// An HTTP POST of the alert as JSON, signed with HMAC-SHA256.
    Webhook {
        url: String,
        /// The environment variable holding the signing secret; read when
        /// a delivery is made, never stored in the policy.
        secret_env: String,
        timeout_ms: u64,
        max_attempts: u32,
    },
    /// An entry in an append-only stream of the counter store (`XADD` on
    /// Redis).
    Stream { name: String },
}

impl PolicySet {
    /// What happens to an unregistered key: as the policy says, else
    /// denied once any key is registered (a registry that lets unknown
    /// keys through protects nothing), else allowed.
    pub fn unknown_keys(&self) -> UnknownKeys {
        match self.attributes.unknown_keys {
            Some(mode) => mode,
            None if self.keys.is_empty() => UnknownKeys::Allow,
            None => UnknownKeys::Deny,
        }
    }

    /// The notifiers a rule's alerts go to.
    pub fn notifiers_for<'a>(&'a self, rule: &'a Rule) -> Vec<&'a str> {
        if !rule.notify.is_empty() {
            return rule.notify.iter().map(String::as_str).collect();
        }
        let defaults: Vec<&str> = self
            .notifiers
            .iter()
            .filter(|n| n.default)
            .map(|n| n.id.as_str())
            .collect();
        if defaults.is_empty() {
            vec![LOG_NOTIFIER]
        } else {
            defaults
        }
    }

    /// A notifier by id, including the built-in `log`.
    pub fn notifier(&self, id: &str) -> Option<NotifierKind> {
        if id == LOG_NOTIFIER {
            return Some(NotifierKind::Log);
        }
        self.notifiers
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.kind.clone())
    }
}

/// How HTTP front ends (Envoy, nginx, forward auth) find a request's
/// attributes, and which of them a client may set. The defaults work
/// untouched and are safe: a client sets only what cannot raise another
/// budget's headroom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeMapping {
    /// `None` when the policy does not say: then an unregistered key is
    /// denied as soon as the policy registers any key.
    pub unknown_keys: Option<UnknownKeys>,
    /// How many unregistered keys get counters of their own at once;
    /// later ones share one bucket, so a flood of random keys cannot fill
    /// the store.
    pub max_unknown_keys: usize,
    /// Attributes a client may set with its own `x-tollgate-*` headers.
    /// They have the lowest precedence: route context and the key
    /// registry win over them.
    pub client_attributes: Vec<Attr>,
    /// Headers the edge proxy sets, and strips from clients: trusted
    /// sources of attributes, ranked with the route context.
    pub trusted_headers: Vec<(Attr, String)>,
    /// A header the proxy sets with its own request id, trusted as the
    /// replay key. Without it, a client's `x-request-id` never dedups.
    pub request_id_header: Option<String>,
    /// Path prefixes mapped to a modality, tried before the built-in ones.
    pub modality_paths: Vec<(String, String)>,
    /// The header that carries the model to call after a downgrade.
    pub model_header: String,
    /// Whether something settles the calls of the HTTP front ends, unless
    /// a route says otherwise.
    pub settle: Settle,
    /// What ext_proc charges for a call the upstream answered with an
    /// error (4xx, 5xx).
    pub on_upstream_error: OnUpstreamError,
}

/// What a call the upstream refused or failed is charged, when ext_proc
/// settles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUpstreamError {
    /// What the error response reports (providers bill no tokens for most
    /// errors, and report none), and the attempt itself.
    #[default]
    ChargeReported,
    /// The estimate, as if the call had run: for upstreams that bill
    /// failed calls.
    KeepEstimate,
}

/// Whether the calls of a route are settled when they end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Settle {
    /// ext_proc, or a caller of `/v1/settle`, settles each call.
    #[default]
    Always,
    /// Nothing does: the estimate is the charge (ext_authz alone).
    Never,
}

/// What a client may set by default: which attempt of which action a call
/// is. Neither can move a call out of a team, key or customer budget.
pub const DEFAULT_CLIENT_ATTRIBUTES: [Attr; 2] = [Attr::Action, Attr::AttemptKind];

/// Unregistered keys counted apart, by default, per process.
pub const DEFAULT_MAX_UNKNOWN_KEYS: usize = 1000;

/// The key attribute every unregistered key past `max_unknown_keys` shares.
pub const SHARED_UNKNOWN_KEY: &str = "sha256:shared";

impl Default for AttributeMapping {
    fn default() -> Self {
        AttributeMapping {
            unknown_keys: None,
            max_unknown_keys: DEFAULT_MAX_UNKNOWN_KEYS,
            client_attributes: DEFAULT_CLIENT_ATTRIBUTES.to_vec(),
            trusted_headers: Vec::new(),
            request_id_header: None,
            modality_paths: Vec::new(),
            model_header: "x-tollgate-model".to_string(),
            settle: Settle::Always,
            on_upstream_error: OnUpstreamError::ChargeReported,
        }
    }
}

impl AttributeMapping {
    /// The header a client sets an attribute with. Read for every
    /// request, so the well-known names are not built each time.
    pub fn client_header(attr: &Attr) -> std::borrow::Cow<'static, str> {
        use std::borrow::Cow;
        Cow::Borrowed(match attr {
            Attr::Key => "x-tollgate-key",
            Attr::Team => "x-tollgate-team",
            Attr::Workflow => "x-tollgate-workflow",
            Attr::Environment => "x-tollgate-environment",
            Attr::Model => "x-tollgate-model",
            Attr::ModelFamily => "x-tollgate-model-family",
            Attr::Modality => "x-tollgate-modality",
            Attr::Customer => "x-tollgate-customer",
            Attr::User => "x-tollgate-user",
            Attr::Action => "x-tollgate-action-id",
            Attr::AttemptKind => "x-tollgate-attempt",
            Attr::Label(name) => return Cow::Owned(format!("x-tollgate-label-{name}")),
        })
    }

    pub fn client_may_set(&self, attr: &Attr) -> bool {
        self.client_attributes.contains(attr)
    }
}

/// What happens to a request whose API key is not in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownKeys {
    /// Counted under `sha256:<prefix>` like any other key, up to
    /// `max_unknown_keys` of them; the rest share [`SHARED_UNKNOWN_KEY`].
    Allow,
    /// Denied with 403 `unknown_key`.
    Deny,
}

#[derive(Debug, Clone, Default)]
pub struct Pricing {
    /// Model name (or glob) to price, in declaration order; exact names win
    /// over globs at lookup time.
    pub models: Vec<(Pattern, ModelPrice, Origin)>,
    pub families: BTreeMap<String, (Vec<Pattern>, Origin)>,
    /// With `reject`, a spend rule may match models that have no price;
    /// requests for such models are then refused at check time.
    pub unpriced_models: UnpricedModels,
    /// Prices read from the catalogs of `pricing.import`, by exact model
    /// name, first import first. Any price written in `models` other than
    /// the `"*"` catch-all wins over them.
    pub imported: Vec<(String, ModelPrice, Origin)>,
}

/// Where the price charged for a model comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriceSource {
    /// Written in `pricing.models` under the model's own name.
    Policy,
    /// A glob in `pricing.models`; the catch-all `"*"` among them.
    PolicyGlob,
    /// An entry of an imported catalog.
    Catalog,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnpricedModels {
    /// A spend rule that could match an unpriced model is a validation error.
    #[default]
    Error,
    Reject,
}

/// Prices in USD. Token prices are per million tokens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelPrice {
    pub input_per_mtok: Option<Decimal>,
    pub cached_input_per_mtok: Option<Decimal>,
    pub output_per_mtok: Option<Decimal>,
    pub per_request: Option<Decimal>,
    pub per_image: Option<ImagePrice>,
    pub per_video_second: Option<Decimal>,
    pub per_audio_minute: Option<Decimal>,
    /// Output tokens assumed when a request names no maximum.
    pub default_output_tokens: Option<u64>,
    /// Input tokens written to a prompt cache (Anthropic's
    /// `cache_creation_input_tokens`); else charged as input.
    pub cache_write_per_mtok: Option<Decimal>,
    /// Output tokens spent reasoning; else charged as output.
    pub reasoning_per_mtok: Option<Decimal>,
    /// Audio input and output tokens; else charged as text tokens.
    pub audio_input_per_mtok: Option<Decimal>,
    pub audio_output_per_mtok: Option<Decimal>,
    /// Higher token prices for a request whose input is above a size.
    pub long_context: Option<LongContext>,
    /// The fraction taken off the token parts of a batch call (0.5 is half
    /// price).
    pub batch_discount: Option<Decimal>,
    /// A fee per named call made within the request (`web_search`).
    pub per_call: BTreeMap<String, Decimal>,
    /// How the input tokens of a request's prompt are counted; unset, the
    /// model's name decides (`engine::tokens::tokenizer_for`). Not a price:
    /// an entry with only a tokenizer names no price.
    pub tokenizer: Option<Tokenizer>,
}

/// How a prompt's input tokens are counted before the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tokenizer {
    /// OpenAI's `o200k_base`, exact: gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1,
    /// o3, o4.
    O200kBase,
    /// OpenAI's `cl100k_base`, exact: gpt-4, gpt-3.5, the text-embedding-3
    /// models and ada-002.
    Cl100kBase,
    /// One token per four characters, rounded up.
    Approximate,
}

impl Tokenizer {
    pub const ALL: [Tokenizer; 3] = [
        Tokenizer::O200kBase,
        Tokenizer::Cl100kBase,
        Tokenizer::Approximate,
    ];

    /// The name written in a policy's `tokenizer:`.
    pub fn name(self) -> &'static str {
        match self {
            Tokenizer::O200kBase => "o200k_base",
            Tokenizer::Cl100kBase => "cl100k_base",
            Tokenizer::Approximate => "approximate",
        }
    }

    pub fn parse(name: &str) -> Option<Tokenizer> {
        Tokenizer::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl std::fmt::Display for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Token prices that replace the base ones when a request's input tokens
/// (cached ones included) are above `above_input_tokens`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LongContext {
    pub above_input_tokens: u64,
    pub input_per_mtok: Option<Decimal>,
    pub cached_input_per_mtok: Option<Decimal>,
    pub cache_write_per_mtok: Option<Decimal>,
    pub output_per_mtok: Option<Decimal>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ImagePrice {
    Flat(Decimal),
    ByQuality(BTreeMap<String, Decimal>),
}

/// One registered API key. Only the SHA-256 of the raw key is ever held.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub id: String,
    pub sha256: [u8; 32],
    /// Attributes the key stands for; a request's own values take precedence.
    pub attributes: Vec<(Attr, String)>,
    pub owner: Option<String>,
    pub origin: Origin,
}

/// Estimates used when a request does not say.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub images: u64,
    pub image_quality: String,
    pub video_seconds: Decimal,
    pub audio_seconds: Decimal,
    /// `output_tokens: learned`: reserve what settled calls used instead
    /// of `output_tokens`, once enough were settled.
    pub learn_output: Option<LearnOutput>,
}

/// How output tokens are learned from settled calls: the `percentile` of
/// the output tokens of each model's calls in each workflow, used once
/// `min_samples` calls of that model and workflow have settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LearnOutput {
    pub percentile: u8,
    pub min_samples: u32,
}

/// The most settled calls `min_samples` may ask for: what the gate's
/// learned table keeps of each model and workflow (`gate::learned`).
pub const MAX_MIN_SAMPLES: u64 = 256;

impl Default for LearnOutput {
    fn default() -> Self {
        LearnOutput {
            percentile: 95,
            min_samples: 20,
        }
    }
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            input_tokens: 1_000,
            output_tokens: 1_000,
            images: 1,
            image_quality: "medium".to_string(),
            video_seconds: Decimal::from(8),
            audio_seconds: Decimal::from(60),
            learn_output: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    pub description: Option<String>,
    pub owner: Option<String>,
    pub conditions: Vec<Condition>,
    pub per: Vec<Attr>,
    pub limit: Limit,
    pub enforcement: Enforcement,
    pub on_exceed: OnExceed,
    /// What a streamed response does once it has used what its
    /// reservation covered and no more fits (Envoy ext_proc only).
    pub on_overrun: OnOverrun,
    /// Percentages of the limit, ascending.
    pub alerts: Vec<u32>,
    /// Notifier ids for this rule's alerts; empty means the defaults.
    pub notify: Vec<String>,
    pub on_store_error: StoreFailure,
    pub origin: Origin,
}

/// `attr` must be present and match one of `patterns`.
#[derive(Debug, Clone)]
pub struct Condition {
    pub attr: Attr,
    pub patterns: Vec<Pattern>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attr {
    Key,
    Team,
    Workflow,
    Environment,
    Model,
    ModelFamily,
    Modality,
    Customer,
    User,
    Action,
    AttemptKind,
    Label(String),
}

impl Attr {
    /// The well-known attributes, in the order the index prefers them as
    /// anchors: the ones most likely to split traffic finely come first.
    pub const WELL_KNOWN: [Attr; 11] = [
        Attr::Key,
        Attr::Customer,
        Attr::User,
        Attr::Action,
        Attr::Workflow,
        Attr::Team,
        Attr::Model,
        Attr::ModelFamily,
        Attr::Environment,
        Attr::Modality,
        Attr::AttemptKind,
    ];

    pub fn parse(name: &str) -> Option<Attr> {
        Some(match name {
            "key" => Attr::Key,
            "team" => Attr::Team,
            "workflow" => Attr::Workflow,
            "environment" => Attr::Environment,
            "model" => Attr::Model,
            "model_family" => Attr::ModelFamily,
            "modality" => Attr::Modality,
            "customer" => Attr::Customer,
            "user" => Attr::User,
            "action" => Attr::Action,
            "attempt_kind" => Attr::AttemptKind,
            other => {
                let label = other.strip_prefix("labels.")?;
                if label.is_empty() {
                    return None;
                }
                Attr::Label(label.to_string())
            }
        })
    }

    pub fn name(&self) -> &str {
        match self {
            Attr::Key => "key",
            Attr::Team => "team",
            Attr::Workflow => "workflow",
            Attr::Environment => "environment",
            Attr::Model => "model",
            Attr::ModelFamily => "model_family",
            Attr::Modality => "modality",
            Attr::Customer => "customer",
            Attr::User => "user",
            Attr::Action => "action",
            Attr::AttemptKind => "attempt_kind",
            Attr::Label(name) => name,
        }
    }
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attr::Label(name) => write!(f, "labels.{name}"),
            other => f.write_str(other.name()),
        }
    }
}

pub const MODALITIES: [&str; 5] = ["text", "image", "video", "audio", "embedding"];
pub const ATTEMPT_KINDS: [&str; 3] = ["primary", "retry", "fallback"];

#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    pub unit: Unit,
    /// In the unit's natural scale (USD for spend).
    pub amount: Decimal,
    pub window: Window,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Unit {
    Requests,
    InputTokens,
    OutputTokens,
    Tokens,
    Images,
    VideoJobs,
    VideoSeconds,
    AudioSeconds,
    Spend,
    Concurrent,
}

impl Unit {
    pub const ALL: [Unit; 10] = [
        Unit::Requests,
        Unit::InputTokens,
        Unit::OutputTokens,
        Unit::Tokens,
        Unit::Images,
        Unit::VideoJobs,
        Unit::VideoSeconds,
        Unit::AudioSeconds,
        Unit::Spend,
        Unit::Concurrent,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Unit::Requests => "requests",
            Unit::InputTokens => "input_tokens",
            Unit::OutputTokens => "output_tokens",
            Unit::Tokens => "tokens",
            Unit::Images => "images",
            Unit::VideoJobs => "video_jobs",
            Unit::VideoSeconds => "video_seconds",
            Unit::AudioSeconds => "audio_seconds",
            Unit::Spend => "spend",
            Unit::Concurrent => "concurrent",
        }
    }

    pub fn parse(name: &str) -> Option<Unit> {
        Unit::ALL.into_iter().find(|u| u.name() == name)
    }

    /// Counters hold integers; this is how many counter units make one
    /// natural unit. Spend is counted in micro-USD.
    pub fn scale(self) -> i64 {
        10_i64.pow(self.decimals())
    }

    /// The decimal places of one counter step: 6 for spend (a counter
    /// counts millionths of a dollar), 0 for whole units.
    pub fn decimals(self) -> u32 {
        match self {
            Unit::Spend => 6,
            _ => 0,
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Calendar windows in UTC, reset at the start of each period.
    Calendar(CalendarPeriod),
    /// A day, week or month in a time zone, or starting on another day
    /// than the 1st or Monday: a billing period.
    Local(LocalCalendar),
    /// Starts at the counter's first use and lasts this many seconds.
    Rolling(u64),
    /// Never resets.
    Lifetime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalendarPeriod {
    Minute,
    Hour,
    Day,
    Week,
    Month,
}

/// A daily, weekly or monthly window in a time zone, from an anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalCalendar {
    /// `Day`, `Week` or `Month`.
    pub period: CalendarPeriod,
    pub zone: Zone,
    /// Monthly: the billing day, 1 to 31 (past a short month's end, its
    /// last day). Weekly: the first day, 1 (Monday) to 7 (Sunday). Daily: 0.
    pub anchor: u8,
}

/// The weekday names an `anchor` takes, Monday first.
pub const WEEKDAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// An IANA time zone from the tz database bundled into the binary (never
/// the host's zoneinfo). Each distinct zone is loaded once per process and
/// kept, so a window stays `Copy`; there are only a few hundred names.
#[derive(Clone, Copy)]
pub struct Zone(&'static (String, jiff::tz::TimeZone));

impl Zone {
    /// `UTC` or an IANA name such as `Europe/Berlin`.
    pub fn get(name: &str) -> Result<Zone, String> {
        use std::sync::{Mutex, OnceLock};
        type Loaded = Mutex<BTreeMap<String, &'static (String, jiff::tz::TimeZone)>>;
        static LOADED: OnceLock<Loaded> = OnceLock::new();
        let (canonical, tz) = if name.eq_ignore_ascii_case("utc") {
            ("UTC".to_string(), jiff::tz::TimeZone::UTC)
        } else {
            let tz = jiff::tz::TimeZone::get(name).map_err(|_| {
                format!(
                    "{name:?} is not an IANA time zone such as Europe/Berlin or America/New_York"
                )
            })?;
            (tz.iana_name().unwrap_or(name).to_string(), tz)
        };
        let mut loaded = LOADED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let entry = loaded
            .entry(canonical.clone())
            .or_insert_with(|| Box::leak(Box::new((canonical, tz))));
        Ok(Zone(entry))
    }

    pub fn utc() -> Zone {
        Zone::get("UTC").expect("UTC is always known")
    }

    pub fn name(&self) -> &'static str {
        &self.0 .0
    }

    pub fn tz(&self) -> &'static jiff::tz::TimeZone {
        &self.0 .1
    }
}

impl PartialEq for Zone {
    fn eq(&self, other: &Zone) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Zone {}

impl fmt::Debug for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Window::Local(l) => match l.period {
                CalendarPeriod::Week => write!(
                    f,
                    "weekly (from {}, {})",
                    WEEKDAYS[usize::from(l.anchor.clamp(1, 7)) - 1],
                    l.zone.name()
                ),
                CalendarPeriod::Month => {
                    write!(f, "monthly (from day {}, {})", l.anchor, l.zone.name())
                }
                _ => write!(f, "daily ({})", l.zone.name()),
            },
            Window::Calendar(CalendarPeriod::Minute) => f.write_str("minute"),
            Window::Calendar(CalendarPeriod::Hour) => f.write_str("hour"),
            Window::Calendar(CalendarPeriod::Day) => f.write_str("daily"),
            Window::Calendar(CalendarPeriod::Week) => f.write_str("weekly"),
            Window::Calendar(CalendarPeriod::Month) => f.write_str("monthly"),
            Window::Rolling(secs) => write!(f, "{secs}s from first use"),
            Window::Lifetime => f.write_str("lifetime"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    Hard,
    /// Counts and alerts, never denies.
    Soft,
    /// Denies every request in scope until a grant covers it.
    Approval,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnExceed {
    Deny,
    Downgrade(String),
    Approval,
}

/// What a response that streams past its reservation does when a top-up
/// finds no room left under the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnOverrun {
    /// The stream runs to its end and is charged what it used, which may
    /// pass the limit.
    #[default]
    Finish,
    /// The stream is ended at the next chunk with an error event.
    Cut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    FailClosed,
    FailOpen,
}
