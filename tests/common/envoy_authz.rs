//! An ext_authz `CheckRequest` as Envoy builds it: lower-cased headers
//! with the pseudo-headers, the body as raw bytes, the route's
//! `context_extensions`, and Envoy's own request id in `http.id`.

use std::collections::HashMap;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Request as AttrRequest,
};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};

pub fn check_request(
    id: String,
    path: &str,
    headers: HashMap<String, String>,
    body: &str,
    context: &[(&str, &str)],
) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    id,
                    method: "POST".to_string(),
                    path: path.to_string(),
                    host: "api.example.com".to_string(),
                    headers,
                    raw_body: body.as_bytes().to_vec(),
                    size: body.len() as i64,
                    protocol: "HTTP/1.1".to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: context
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
    }
}
