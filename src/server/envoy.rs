//! Envoy's external authorization (`envoy.service.auth.v3.Authorization`),
//! served on the same port as the native API.
//!
//! Every request Envoy sends gets a decision: allowed, or denied with an
//! HTTP status and an OpenAI-style JSON body. Only a counter-store fault is
//! answered with a gRPC error (UNAVAILABLE), so that Envoy's own
//! `failure_mode_allow` / `status_on_error` decide what an outage means.
//! Malformed input, including header values that are not UTF-8, is a 400
//! denial: it can never become an allow through a failure mode.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

use super::http_request::{check_input, HttpRequest};
use super::status::{allowance, denial, http_gate_error, request_denial, HttpDenial};
use crate::engine::Verdict;
use crate::gate::Gate;

#[derive(Debug, Clone)]
pub struct EnvoyAuthz {
    gate: Arc<Gate>,
}

impl EnvoyAuthz {
    pub fn new(gate: Arc<Gate>) -> EnvoyAuthz {
        EnvoyAuthz { gate }
    }
}

#[tonic::async_trait]
impl Authorization for EnvoyAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let attrs = request.into_inner().attributes.unwrap_or_default();
        let http = attrs.request.and_then(|r| r.http).unwrap_or_default();
        // With `encode_raw_headers`, values arrive as bytes in `header_map`;
        // otherwise as strings in `headers`.
        let headers: Vec<(String, Vec<u8>)> = match &http.header_map {
            Some(map) if !map.headers.is_empty() => map
                .headers
                .iter()
                .map(|h| {
                    let value = if h.raw_value.is_empty() {
                        h.value.as_bytes().to_vec()
                    } else {
                        h.raw_value.clone()
                    };
                    (h.key.to_ascii_lowercase(), value)
                })
                .collect(),
            _ => http
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec()))
                .collect(),
        };
        let body: &[u8] = if !http.raw_body.is_empty() {
            &http.raw_body
        } else {
            http.body.as_bytes()
        };
        let path = headers
            .iter()
            .find(|(k, _)| k == ":path")
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .unwrap_or(&http.path)
            .to_string();
        let view = HttpRequest {
            method: &http.method,
            path: &path,
            headers,
            context: Some(&attrs.context_extensions),
            body: Some(body),
            proxy_request_id: Some(&http.id),
        };
        let policy = self.gate.policy();
        let mapping = &policy.set.attributes;
        let input = match check_input(mapping, &view) {
            Ok(input) => input,
            Err(e) => return Ok(Response::new(denied(request_denial(&e)))),
        };
        match self.gate.check(input).await {
            Ok(d) if d.verdict == Verdict::Deny => Ok(Response::new(denied(denial(&d)))),
            Ok(d) => {
                let a = allowance(&d, &mapping.model_header, self.gate.now());
                // Only tollgate says which model the upstream should call:
                // a client's own model header is removed, or an upstream
                // that honours it would run a model other than the one
                // charged.
                let headers_to_remove = if d.verdict == Verdict::Downgrade {
                    Vec::new()
                } else {
                    vec![mapping.model_header.clone()]
                };
                Ok(Response::new(CheckResponse {
                    status: Some(rpc::Status {
                        code: tonic::Code::Ok as i32,
                        ..Default::default()
                    }),
                    http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                        headers: a.upstream.into_iter().map(header).collect(),
                        response_headers_to_add: a.downstream.into_iter().map(header).collect(),
                        headers_to_remove,
                        ..Default::default()
                    })),
                    ..Default::default()
                }))
            }
            Err(e) => match http_gate_error(&e) {
                Ok(d) => Ok(Response::new(denied(d))),
                Err(store) => Err(Status::unavailable(store.to_string())),
            },
        }
    }
}

fn header((key, value): (String, String)) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key,
            value,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn denied(d: HttpDenial) -> CheckResponse {
    let code = match d.status {
        400 => tonic::Code::InvalidArgument,
        403 => tonic::Code::PermissionDenied,
        404 => tonic::Code::NotFound,
        _ => tonic::Code::ResourceExhausted,
    };
    let mut headers: Vec<(String, String)> = d.headers;
    headers.push(("content-type".to_string(), "application/json".to_string()));
    CheckResponse {
        status: Some(rpc::Status {
            code: code as i32,
            message: String::new(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(d.status),
            }),
            headers: headers.into_iter().map(header).collect(),
            body: d.body,
        })),
        ..Default::default()
    }
}
