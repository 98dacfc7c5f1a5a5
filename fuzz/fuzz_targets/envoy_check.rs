//! Envoy's ext_authz `Check` (`server::envoy`), end to end on a fresh
//! gate over the embedded store: the CheckRequest is either decoded from
//! the fuzz bytes as protobuf, or built from a request in the text form
//! of `tollgate_fuzz::TextRequest` (headers as Envoy's `headers` map or,
//! with `encode_raw_headers`, as raw bytes in `header_map`).
//!
//! Checks: nothing panics; the embedded store never faults, so every
//! request gets a decision, never a gRPC error; an allow carries gRPC
//! OK; a denial carries an HTTP error status and a JSON error body; an
//! `authorization` header that is not UTF-8 is never allowed.
#![no_main]

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tollgate::server::envoy::EnvoyAuthz;
use tollgate_fuzz::TextRequest;

fn from_text(req: &TextRequest, raw_headers: bool, raw_body: bool) -> CheckRequest {
    let mut http = HttpRequest {
        id: req.proxy_request_id.clone().unwrap_or_default(),
        method: req.method.clone(),
        path: req.path.clone(),
        ..Default::default()
    };
    if raw_headers {
        let headers = req
            .headers
            .iter()
            .map(|(k, v)| HeaderValue {
                key: k.clone(),
                raw_value: v.clone(),
                ..Default::default()
            })
            .collect();
        http.header_map = Some(HeaderMap { headers });
    } else {
        for (k, v) in &req.headers {
            http.headers
                .insert(k.clone(), String::from_utf8_lossy(v).into_owned());
        }
    }
    if let Some(body) = &req.body {
        if raw_body {
            http.raw_body = body.clone();
        } else {
            http.body = String::from_utf8_lossy(body).into_owned();
        }
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(http),
                ..Default::default()
            }),
            context_extensions: req.context.clone(),
            ..Default::default()
        }),
    }
}

/// The headers the front end reads, as it chooses between the two forms.
fn headers(check: &CheckRequest) -> Vec<(String, Vec<u8>)> {
    let http = check
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref());
    let Some(http) = http else {
        return Vec::new();
    };
    match &http.header_map {
        Some(map) if !map.headers.is_empty() => map
            .headers
            .iter()
            .cloned()
            .map(tollgate::server::http_request::envoy_header)
            .collect(),
        _ => http
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec()))
            .collect(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let check = if flags & 2 == 0 {
        match CheckRequest::decode(rest) {
            Ok(c) => c,
            Err(_) => return,
        }
    } else {
        from_text(&TextRequest::parse(rest), flags & 4 != 0, flags & 8 != 0)
    };
    let bad_key = headers(&check)
        .iter()
        .find(|(k, _)| k == "authorization")
        .is_some_and(|(_, v)| std::str::from_utf8(v).is_err());

    let policy = tollgate_fuzz::fresh_policy(flags & 1 == 1);
    let authz = EnvoyAuthz::new(std::sync::Arc::new(tollgate_fuzz::gate(policy)));
    let answer = tollgate_fuzz::block_on(authz.check(tonic::Request::new(check)));
    let response = match answer {
        Ok(r) => r.into_inner(),
        Err(status) => panic!("a gRPC error from the embedded store: {status:?}"),
    };
    let code = response.status.as_ref().map(|s| s.code);
    match response.http_response {
        Some(HttpResponse::OkResponse(_)) => {
            assert_eq!(code, Some(0), "an allow without gRPC OK");
            assert!(!bad_key, "a key that is not UTF-8 was allowed");
        }
        Some(HttpResponse::DeniedResponse(denied)) => {
            assert_ne!(code, Some(0), "a denial with gRPC OK");
            let http = denied.status.map(|s| s.code).unwrap_or_default();
            assert!((400..600).contains(&http), "a denial with HTTP {http}");
            let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap_or_else(|e| {
                panic!("a denial body that is not JSON ({e}): {}", denied.body)
            });
            assert!(
                body.get("error").is_some(),
                "a denial body without `error`: {body}"
            );
            if bad_key {
                assert_eq!(http, 400, "a key that is not UTF-8 got {http}");
            }
        }
        other => panic!("a response with no allow or denial: {other:?}"),
    }
});
