//! A minimal HTTP/1.1 client for the few requests tollgate itself makes:
//! alert webhooks and the client commands of the CLI (`health`, `usage
//! --server`, the admin commands). One connection per
//! request: both are rare, and a pool would only hold sockets to peers that
//! may be gone by the next call.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Responses larger than this are cut off with an error.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Where a request goes: `http://host:port`, `https://host:port`, or
/// `unix:/path/to.sock` (a local admin socket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp {
        tls: bool,
        host: String,
        port: u16,
        /// What the `host` header says.
        authority: String,
        /// The URL's own path, which request paths are appended to.
        base_path: String,
    },
    Unix(std::path::PathBuf),
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        if let Some(path) = url.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(
                    "`unix:` needs a socket path, such as unix:/run/tollgate/admin.sock"
                        .to_string(),
                );
            }
            return Ok(Target::Unix(path.into()));
        }
        let uri: Uri = url.parse().map_err(|e| format!("bad URL {url:?}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "{url:?} is not an http://, https:// or unix: address"
                ))
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("{url:?} names no host"))?
            .trim_matches(['[', ']'])
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_else(|| host.clone());
        let base_path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("")
            .trim_end_matches('/')
            .to_string();
        Ok(Target::Tcp {
            tls,
            host,
            port,
            authority,
            base_path,
        })
    }
}

/// A response's status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// Sends one request to `target` + `path` and reads the whole answer, all
/// within `timeout`. HTTPS trusts the public web roots.
pub async fn send(
    target: &Target,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: Bytes,
    timeout: Duration,
) -> Result<Answer, String> {
    send_with(target, None, method, path, headers, body, timeout).await
}

/// [`send`] with a TLS setup of the caller's (a private CA, a client
/// certificate) for `https://`.
pub async fn send_with(
    target: &Target,
    tls: Option<Arc<rustls::ClientConfig>>,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: Bytes,
    timeout: Duration,
) -> Result<Answer, String> {
    tokio::time::timeout(
        timeout,
        send_unbounded(target, tls, method, path, headers, body),
    )
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {} ms", timeout.as_millis())))
}

/// A client TLS setup from PEM files: `ca` replaces the public web roots,
/// and `identity` (certificate chain, key) is presented to servers that
/// ask for a client certificate.
pub fn client_tls(
    ca: Option<&std::path::Path>,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read_certs = |path: &std::path::Path| {
        CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let roots = match ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            roots
        }
        None => rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = read_certs(cert)?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))?
        }
    };
    Ok(Arc::new(config))
}

async fn send_unbounded(
    target: &Target,
    tls_config: Option<Arc<rustls::ClientConfig>>,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: Bytes,
) -> Result<Answer, String> {
    let (authority, full_path) = match target {
        Target::Tcp {
            authority,
            base_path,
            ..
        } => (authority.clone(), format!("{base_path}{path}")),
        Target::Unix(_) => ("localhost".to_string(), path.to_string()),
    };
    let full_path = if full_path.is_empty() {
        "/".to_string()
    } else {
        full_path
    };
    let mut request = Request::builder()
        .method(method)
        .uri(full_path)
        .header("host", authority)
        .header(
            "user-agent",
            concat!("tollgate/", env!("CARGO_PKG_VERSION")),
        );
    for (name, value) in headers {
        request = request.header(*name, value.as_str());
    }
    let request = request
        .body(Full::new(body))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    match target {
        Target::Unix(path) => {
            #[cfg(unix)]
            {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
                exchange(stream, request).await
            }
            #[cfg(not(unix))]
            {
                Err(format!(
                    "unix sockets are not available here: {}",
                    path.display()
                ))
            }
        }
        Target::Tcp {
            tls, host, port, ..
        } => {
            let tcp = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            if *tls {
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|_| format!("{host:?} is not a valid TLS server name"))?;
                let config = match tls_config {
                    Some(c) => c,
                    None => public_roots()?,
                };
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake with {host}:{port} failed: {e}"))?;
                exchange(stream, request).await
            } else {
                exchange(tcp, request).await
            }
        }
    }
}

async fn exchange<S>(stream: S, request: Request<Full<Bytes>>) -> Result<Answer, String>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    let driver = tokio::spawn(conn);
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| format!("cannot read the answer: {e}"))?
            .to_bytes();
        Ok(Answer { status, body })
    }
    .await;
    driver.abort();
    result
}

/// Public web roots: a receiver with a private CA should sit behind a
/// proxy that presents a public certificate, or be reached over HTTP on a
/// private network.
fn public_roots() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    if let Some(config) = CONFIG.get() {
        return Ok(config.clone());
    }
    let config = client_tls(None, None)?;
    Ok(CONFIG.get_or_init(|| config).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_their_defaults() {
        assert_eq!(
            Target::parse("https://hooks.example.com/t/1").unwrap(),
            Target::Tcp {
                tls: true,
                host: "hooks.example.com".to_string(),
                port: 443,
                authority: "hooks.example.com".to_string(),
                base_path: "/t/1".to_string(),
            }
        );
        assert_eq!(
            Target::parse("unix:/run/tollgate/admin.sock").unwrap(),
            Target::Unix("/run/tollgate/admin.sock".into())
        );
        assert!(Target::parse("ftp://example.com").is_err());
        assert!(Target::parse("unix:").is_err());
    }
}
