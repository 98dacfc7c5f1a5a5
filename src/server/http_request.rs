//! HTTP-shaped requests (from Envoy, nginx or a forward-auth proxy) turned
//! into a [`CheckInput`]: the key, attributes, model, modality and usage
//! estimate, found where the policy's `attributes:` section says.

use std::collections::HashMap;

use rust_decimal::Decimal;

use super::body;
use crate::telemetry::names;
use tollgate_core::engine::request::parse_amount;
use tollgate_core::engine::{Attributes, Estimate, RequestError};
use tollgate_core::gate::CheckInput;
use tollgate_core::policy::{Attr, AttributeMapping, Settle};

/// An HTTP request as a front end received it. Header names are lower case;
/// values are raw bytes, because they are not always valid UTF-8.
#[derive(Debug, Clone, Default)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Per-route settings from the proxy (Envoy's `context_extensions`, the
    /// auth endpoint's query), which the client cannot set: attributes by
    /// name, and `downgrade`.
    pub context: Option<&'a HashMap<String, String>>,
    /// The body, or the prefix of it the proxy sent.
    pub body: Option<&'a [u8]>,
    /// The proxy's own id for the request (Envoy's), trusted as the
    /// replay key.
    pub proxy_request_id: Option<&'a str>,
}

/// The route setting that says the upstream honours the model header, so
/// a downgrade can be put into effect: `downgrade: header`.
pub(crate) const DOWNGRADE_SETTING: &str = "downgrade";

/// The route setting that says whether anything settles the route's
/// calls: `settle: never` for ext_authz with no ext_proc after it.
pub(crate) const SETTLE_SETTING: &str = "settle";

/// Modalities by path, tried after the policy's own `modality_paths`.
const MODALITY_PATHS: [(&str, &str); 9] = [
    ("/v1/chat/completions", "text"),
    ("/v1/responses", "text"),
    ("/v1/messages", "text"),
    ("/v1/completions", "text"),
    ("/v1/images", "image"),
    ("/v1/video", "video"),
    ("/v1/audio", "audio"),
    ("/v1/embeddings", "embedding"),
    ("/v1/moderations", "text"),
];

/// Attributes a client might try to set with a header of its own.
const CLIENT_SETTABLE: [Attr; 9] = [
    Attr::Team,
    Attr::Workflow,
    Attr::Environment,
    Attr::Customer,
    Attr::User,
    Attr::Action,
    Attr::AttemptKind,
    Attr::Modality,
    Attr::Model,
];

/// One header as Envoy sends it, name lower-cased: current Envoy puts the
/// value in `raw_value` (with `value` empty), older Envoy in `value`; both
/// are read, and the bytes kept as they are. The name and value are moved
/// out of the message, not copied.
pub fn envoy_header(h: envoy_types::pb::envoy::config::core::v3::HeaderValue) -> (String, Vec<u8>) {
    let mut key = h.key;
    key.make_ascii_lowercase();
    let value = if h.raw_value.is_empty() {
        h.value.into_bytes()
    } else {
        h.raw_value
    };
    (key, value)
}

impl HttpRequest<'_> {
    /// A header's value; a value that is not UTF-8 is an error, never
    /// skipped, so that it can never turn into an allow.
    fn header(&self, name: &str) -> Result<Option<&str>, RequestError> {
        match self.headers.iter().find(|(n, _)| n == name) {
            None => Ok(None),
            Some((_, raw)) => std::str::from_utf8(raw)
                .map(|v| Some(v.trim()).filter(|v| !v.is_empty()))
                .map_err(|_| RequestError::invalid(format!("header `{name}` is not valid UTF-8"))),
        }
    }
}

/// Reads a request by trust. The route context and the proxy's trusted
/// headers become `attributes`, which beat the key registry; the client's
/// own `x-tollgate-*` headers count only for the attributes the policy lets
/// clients set, and only fill what the route and the registry leave empty.
/// What the body shows (the model, the usage) beats anything a header
/// claims.
pub fn check_input(
    mapping: &AttributeMapping,
    req: &HttpRequest,
) -> Result<CheckInput, RequestError> {
    let mut route = Attributes::default();
    let empty = HashMap::new();
    let context = req.context.unwrap_or(&empty);
    for (name, value) in context {
        match Attr::parse(name) {
            Some(Attr::Key | Attr::ModelFamily) | None => {}
            Some(attr) => route.set(&attr, value.clone()),
        }
    }
    for (attr, header) in &mapping.trusted_headers {
        if route.get(attr).is_none() {
            if let Some(v) = req.header(header)? {
                route.set(attr, v.to_string());
            }
        }
    }
    let trusted = |name: &str| mapping.trusted_headers.iter().any(|(_, h)| h == name);

    let path = req.path.split('?').next().unwrap_or("");
    if route.modality.is_none() {
        route.modality = modality_for(mapping, path);
    }

    // The body shows what the call really asks for; once it is seen, the
    // client's model and estimate headers are claims it cannot back.
    let partial = req.header("x-envoy-auth-partial-body")? == Some("true");
    let body = req.body.filter(|b| !b.is_empty());
    let mut estimate = Estimate::default();
    if let Some(body) = body {
        let facts = if partial {
            let length = req
                .header("content-length")?
                .and_then(|v| v.parse::<u64>().ok());
            body::read_prefix(body, length)
        } else {
            body::read(body)
        };
        estimate = facts.estimate;
        if route.model.is_none() {
            route.model = facts.model;
        }
    }
    if route.model.is_none() {
        route.model = body::model_from_path(path);
    }

    let mut client = Attributes::default();
    let ignored = |attr: &Attr| {
        let label = match attr {
            Attr::Label(_) => "label".to_string(),
            other => other.name().to_string(),
        };
        metrics::counter!(names::CLIENT_ATTRIBUTES_IGNORED, "attribute" => label).increment(1);
    };
    for attr in CLIENT_SETTABLE {
        let header = AttributeMapping::client_header(&attr);
        if trusted(&header) {
            continue;
        }
        let Some(v) = req.header(&header)? else {
            continue;
        };
        // Without a body, the declared model is all there is (nginx's
        // subrequest carries none): it is client input, at the lowest
        // precedence.
        let declared_model = attr == Attr::Model && body.is_none();
        if mapping.client_may_set(&attr) || declared_model {
            client.set(&attr, v.to_string());
        } else {
            ignored(&attr);
        }
    }
    for (name, _) in &req.headers {
        let Some(label) = name.strip_prefix("x-tollgate-label-") else {
            continue;
        };
        let attr = Attr::Label(label.to_string());
        if trusted(name) {
            continue;
        }
        if mapping.client_may_set(&attr) {
            if let Some(v) = req.header(name)? {
                client.set(&attr, v.to_string());
            }
        } else {
            ignored(&attr);
        }
    }

    if body.is_none() {
        read_estimate_headers(req, &mut estimate)?;
    }

    let api_key = match req.header("authorization")? {
        // `get`, not `[..7]`: byte 7 may fall inside a character.
        Some(v)
            if v.len() > 7
                && v.get(..7)
                    .is_some_and(|p| p.eq_ignore_ascii_case("bearer ")) =>
        {
            Some(v[7..].trim().to_string())
        }
        _ => req
            .header("x-api-key")?
            .or(req.header("x-goog-api-key")?)
            .map(str::to_string),
    };

    // Only an id the operator vouches for is a replay key: a client that
    // repeats its own x-request-id must be charged each time.
    let request_id = match &mapping.request_id_header {
        Some(h) => req.header(h)?.map(str::to_string),
        None => req
            .proxy_request_id
            .filter(|id| !id.is_empty())
            .map(str::to_string),
    };

    let can_switch_model = match context.get(DOWNGRADE_SETTING).map(String::as_str) {
        None | Some("deny") => false,
        Some("header") => true,
        Some(other) => {
            return Err(RequestError::invalid(format!(
                "the route sets `{DOWNGRADE_SETTING}: {other}`; it must be `header` (the upstream \
                 honours the model header) or `deny`"
            )))
        }
    };

    let estimate_is_final = match context.get(SETTLE_SETTING).map(String::as_str) {
        None => mapping.settle == Settle::Never,
        Some("never") => true,
        Some("always") => false,
        Some(other) => {
            return Err(RequestError::invalid(format!(
                "the route sets `{SETTLE_SETTING}: {other}`; it must be `always` (something \
                 settles each call, as ext_proc does) or `never` (the estimate is final)"
            )))
        }
    };

    Ok(CheckInput {
        attributes: route,
        client_attributes: client,
        api_key,
        estimate,
        request_id,
        can_switch_model,
        estimate_is_final,
    })
}

fn modality_for(mapping: &AttributeMapping, path: &str) -> Option<String> {
    if let Some((_, m)) = mapping
        .modality_paths
        .iter()
        .find(|(p, _)| path.starts_with(p.as_str()))
    {
        return Some(m.clone());
    }
    if path.ends_with(":generateContent") || path.ends_with(":streamGenerateContent") {
        return Some("text".to_string());
    }
    if path.ends_with(":embedContent") || path.ends_with(":batchEmbedContents") {
        return Some("embedding".to_string());
    }
    // Anywhere in the path: a route may prefix the API's own path
    // (`/agent/v1/chat/completions`, rewritten only after tollgate).
    MODALITY_PATHS
        .iter()
        .find(|(p, _)| path.contains(p))
        .map(|(_, m)| m.to_string())
}

fn read_estimate_headers(req: &HttpRequest, est: &mut Estimate) -> Result<(), RequestError> {
    let int = |name: &str| -> Result<Option<u64>, RequestError> {
        req.header(name)?
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    RequestError::invalid(format!(
                        "header `{name}` must be a whole number, got {v:?}"
                    ))
                })
            })
            .transpose()
    };
    let dec = |name: &str| -> Result<Option<Decimal>, RequestError> {
        req.header(name)?
            .map(|v| parse_amount(&format!("header {name}"), v))
            .transpose()
    };
    if let Some(v) = int("x-tollgate-input-tokens")? {
        est.input_tokens = Some(v);
    }
    if let Some(v) = int("x-tollgate-max-tokens")? {
        est.output_tokens = Some(v);
    }
    if let Some(v) = int("x-tollgate-images")? {
        est.images = Some(v);
    }
    if let Some(v) = req.header("x-tollgate-image-quality")? {
        est.image_quality = Some(v.to_string());
    }
    if let Some(v) = dec("x-tollgate-video-seconds")? {
        est.video_seconds = Some(v);
    }
    if let Some(v) = dec("x-tollgate-audio-seconds")? {
        est.audio_seconds = Some(v);
    }
    Ok(())
}
