//! HTTP-shaped requests (from Envoy, nginx or a forward-auth proxy) turned
//! into a [`CheckInput`]: the key, attributes, model, modality and usage
//! estimate, found where the policy's `attributes:` section says.

use std::collections::HashMap;
use std::str::FromStr;

use rust_decimal::Decimal;

use super::body;
use crate::engine::{Attributes, Estimate, RequestError};
use crate::gate::CheckInput;
use crate::policy::{Attr, AttributeMapping};

/// An HTTP request as a front end received it. Header names are lower case;
/// values are raw bytes, because they are not always valid UTF-8.
#[derive(Debug, Clone, Default)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Per-route settings from the proxy (Envoy's `context_extensions`),
    /// which win over headers: the client cannot set them.
    pub context: Option<&'a HashMap<String, String>>,
    /// The body, when the proxy sent all of it.
    pub body: Option<&'a [u8]>,
}

/// Estimate headers, for proxies that cannot send a body (nginx).
pub const ESTIMATE_HEADERS: [&str; 6] = [
    "x-tollgate-input-tokens",
    "x-tollgate-max-tokens",
    "x-tollgate-images",
    "x-tollgate-image-quality",
    "x-tollgate-video-seconds",
    "x-tollgate-audio-seconds",
];

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

pub fn check_input(
    mapping: &AttributeMapping,
    req: &HttpRequest,
) -> Result<CheckInput, RequestError> {
    let mut attributes = Attributes::default();
    let from_context = |attr: &Attr| {
        req.context
            .and_then(|c| c.get(&attr.to_string()).or_else(|| c.get(attr.name())))
    };
    for attr in [
        Attr::Team,
        Attr::Workflow,
        Attr::Environment,
        Attr::Customer,
        Attr::User,
        Attr::Action,
        Attr::AttemptKind,
        Attr::Modality,
        Attr::Model,
    ] {
        let value = match from_context(&attr) {
            Some(v) => Some(v.as_str()),
            None => req.header(&mapping.header_for(&attr))?,
        };
        if let Some(v) = value {
            attributes.set(&attr, v.to_string());
        }
    }
    if let Some(context) = req.context {
        for (k, v) in context {
            if let Some(label) = k.strip_prefix("labels.") {
                attributes.set(&Attr::Label(label.to_string()), v.clone());
            }
        }
    }
    for (name, _) in &req.headers {
        if let Some(label) = name.strip_prefix("x-tollgate-label-") {
            let attr = Attr::Label(label.to_string());
            if attributes.get(&attr).is_none() {
                if let Some(v) = req.header(name)? {
                    attributes.set(&attr, v.to_string());
                }
            }
        }
    }

    let path = req.path.split('?').next().unwrap_or("");
    if attributes.modality.is_none() {
        attributes.modality = modality_for(mapping, path);
    }

    let mut estimate = Estimate::default();
    let partial = req.header("x-envoy-auth-partial-body")? == Some("true");
    if let Some(body) = req.body.filter(|b| !b.is_empty() && !partial) {
        let facts = body::read(body);
        estimate = facts.estimate;
        if attributes.model.is_none() {
            attributes.model = facts.model;
        }
    }
    if attributes.model.is_none() {
        attributes.model = body::model_from_path(path);
    }
    read_estimate_headers(req, &mut estimate)?;

    let api_key = match req.header("authorization")? {
        Some(v) if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") => {
            Some(v[7..].trim().to_string())
        }
        _ => req
            .header("x-api-key")?
            .or(req.header("x-goog-api-key")?)
            .map(str::to_string),
    };

    Ok(CheckInput {
        attributes,
        api_key,
        estimate,
        request_id: req.header("x-request-id")?.map(str::to_string),
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
    MODALITY_PATHS
        .iter()
        .find(|(p, _)| path.starts_with(p))
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
            .map(|v| {
                Decimal::from_str(v).map_err(|_| {
                    RequestError::invalid(format!("header `{name}` must be a number, got {v:?}"))
                })
            })
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
