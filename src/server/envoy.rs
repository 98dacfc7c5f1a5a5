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

use super::authorize::{authorize, Answer, FrontEnd};
use super::http_request::{envoy_header, HttpRequest};
use super::status::Refusal;
use tollgate_core::gate::Gate;

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
        let mut http = attrs.request.and_then(|r| r.http).unwrap_or_default();
        // With `encode_raw_headers`, values arrive as bytes in `header_map`;
        // otherwise as strings in `headers`. Either way they are moved out
        // of the message, not copied.
        let headers: Vec<(String, Vec<u8>)> = match http.header_map.take() {
            Some(map) if !map.headers.is_empty() => {
                map.headers.into_iter().map(envoy_header).collect()
            }
            _ => std::mem::take(&mut http.headers)
                .into_iter()
                .map(|(mut k, v)| {
                    k.make_ascii_lowercase();
                    (k, v.into_bytes())
                })
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
        match authorize(&self.gate, &view, FrontEnd::default()).await {
            Answer::Allowed(allowed) => Ok(Response::new(CheckResponse {
                status: Some(rpc::Status {
                    code: tonic::Code::Ok as i32,
                    ..Default::default()
                }),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                    headers: allowed.allowance.upstream.into_iter().map(header).collect(),
                    response_headers_to_add: allowed
                        .allowance
                        .downstream
                        .into_iter()
                        .map(header)
                        .collect(),
                    headers_to_remove: allowed.allowance.remove,
                    ..Default::default()
                })),
                ..Default::default()
            })),
            // A store fault stays a gRPC error, so that Envoy's own
            // `failure_mode_allow` decides what an outage means.
            Answer::Refused(r) if r.is_store_fault() => Err(r.grpc_status()),
            Answer::Refused(r) => Ok(Response::new(denied(r))),
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

fn denied(r: Refusal) -> CheckResponse {
    let body = r.body();
    let mut headers = r.headers;
    headers.push(("content-type".to_string(), "application/json".to_string()));
    CheckResponse {
        status: Some(rpc::Status {
            code: r.grpc as i32,
            message: String::new(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(r.http),
            }),
            headers: headers.into_iter().map(header).collect(),
            body,
        })),
        ..Default::default()
    }
}
