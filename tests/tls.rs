//! TLS and mutual TLS on both listeners of a real `tollgate serve`, with
//! a CA and certificates made at test time.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{http_get, policy_dir, TollgateProcess};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate::proto::v1 as pb;
use tollgate::proto::v1::tollgate_client::TollgateClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const POLICY: &str = "
rules:
  - id: plenty
    match: { team: \"*\" }
    limit: { requests: 1000, window: daily }
";

/// A certificate and its key, as PEM.
struct Pem {
    cert: String,
    key: String,
}

/// A CA, a server certificate for 127.0.0.1 and localhost, a client
/// certificate from the same CA, and one from a CA the server does not
/// trust, all written to a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: String,
    client: Pem,
    stranger: Pem,
}

impl Pki {
    fn new() -> Pki {
        let ca = ca("tollgate test CA");
        let stranger_ca = ca_issuer("someone else's CA");
        let server = leaf(&ca, "tollgate", ExtendedKeyUsagePurpose::ServerAuth);
        let client = leaf(&ca, "caller", ExtendedKeyUsagePurpose::ClientAuth);
        let stranger = leaf(
            &stranger_ca,
            "stranger",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), &server.cert).unwrap();
        std::fs::write(dir.path().join("server.key"), &server.key).unwrap();
        Pki {
            ca: ca.pem(),
            dir,
            client,
            stranger,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `serve` arguments for TLS, and for mutual TLS when `mutual`.
    fn args(&self, mutual: bool) -> Vec<String> {
        let mut args = vec![
            "--tls-cert".to_string(),
            self.path("server.pem").display().to_string(),
            "--tls-key".to_string(),
            self.path("server.key").display().to_string(),
        ];
        if mutual {
            args.push("--tls-client-ca".to_string());
            args.push(self.path("ca.pem").display().to_string());
        }
        args
    }
}

fn ca_issuer(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    ca_issuer(name)
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> Pem {
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

fn start(pki: &Pki, mutual: bool) -> (TollgateProcess, tempfile::TempDir) {
    let dir = policy_dir(&[("p.yaml", POLICY)]);
    let mut args = vec!["--policies".to_string(), dir.path().display().to_string()];
    args.extend(pki.args(mutual));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (TollgateProcess::start(&args), dir)
}

/// A gRPC Check over TLS, presenting `identity` if given.
/// A gRPC channel over TLS to `port`, trusting the test CA and presenting
/// `identity` if given.
async fn tls_channel(port: u16, pki: &Pki, identity: Option<&Pem>) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
    }
    Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))
}

async fn grpc_check(port: u16, pki: &Pki, identity: Option<&Pem>) -> Result<(), String> {
    let channel = tls_channel(port, pki, identity).await?;
    let answer = TollgateClient::new(channel)
        .check(pb::CheckRequest {
            attributes: Some(pb::Attributes {
                team: "a".to_string(),
                model: "gpt-4o".to_string(),
                ..Default::default()
            }),
            estimate: Some(pb::Estimate::default()),
            request_id: String::new(),
        })
        .await
        .map_err(|e| format!("check: {e:?}"))?
        .into_inner();
    assert_eq!(answer.verdict, pb::Verdict::Allow as i32);
    Ok(())
}

/// `GET /readyz` over TLS; returns the status line.
async fn https_readyz(port: u16, pki: &Pki, identity: Option<&Pem>) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(id.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(id.key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let io = async {
        tls.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        tls.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = io.await.map_err(|e| format!("request: {e}"))?;
    let text = String::from_utf8_lossy(&response);
    text.lines()
        .next()
        .filter(|l| l.starts_with("HTTP/1.1"))
        .map(str::to_string)
        .ok_or_else(|| format!("no HTTP response: {text:?}"))
}

/// TLS set in a configuration file rather than by flags.
fn start_from_file(pki: &Pki) -> (TollgateProcess, tempfile::TempDir) {
    let dir = policy_dir(&[("p.yaml", POLICY)]);
    // Not in the policy directory, where it would be read as a policy.
    let config = pki.path("tollgate.yaml");
    std::fs::write(
        &config,
        format!(
            "tls-cert: {}\ntls_key: {}\n",
            pki.path("server.pem").display(),
            pki.path("server.key").display()
        ),
    )
    .unwrap();
    let policies = dir.path().display().to_string();
    let config = config.display().to_string();
    let tollgate = TollgateProcess::start(&["--policies", &policies, "--config", &config]);
    (tollgate, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_both_listeners() {
    let pki = Pki::new();
    let (tollgate, _policies) = start_from_file(&pki);
    grpc_check(tollgate.port, &pki, None).await.unwrap();
    assert_eq!(
        https_readyz(tollgate.http_port, &pki, None).await.unwrap(),
        "HTTP/1.1 200 OK"
    );
    // Plaintext is not served on a TLS listener.
    let port = tollgate.http_port;
    let plain = tokio::task::spawn_blocking(move || http_get(port, "/readyz"))
        .await
        .unwrap();
    assert!(!matches!(plain, Ok((200, _))), "{plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_ca() {
    let pki = Pki::new();
    let (tollgate, _policies) = start(&pki, true);

    grpc_check(tollgate.port, &pki, Some(&pki.client))
        .await
        .unwrap();
    assert_eq!(
        https_readyz(tollgate.http_port, &pki, Some(&pki.client))
            .await
            .unwrap(),
        "HTTP/1.1 200 OK"
    );

    for (who, identity) in [
        ("no certificate", None),
        ("untrusted CA", Some(&pki.stranger)),
    ] {
        let grpc = grpc_check(tollgate.port, &pki, identity).await;
        assert!(grpc.is_err(), "gRPC with {who} was served");
        let http = https_readyz(tollgate.http_port, &pki, identity).await;
        // Refused by the server's alert, not by some other failure.
        let refusal = http.expect_err("served without a trusted certificate");
        assert!(
            refusal.contains("CertificateRequired") || refusal.contains("UnknownCA"),
            "HTTP with {who}: {refusal}"
        );
    }

    // The server is unharmed by the refused handshakes.
    grpc_check(tollgate.port, &pki, Some(&pki.client))
        .await
        .unwrap();
}

#[test]
fn a_bad_certificate_stops_the_start() {
    let pki = Pki::new();
    std::fs::write(pki.path("empty.pem"), "").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert")
        .arg(pki.path("empty.pem"))
        .arg("--tls-key")
        .arg(pki.path("server.key"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("empty.pem: no certificate in the file"),
        "{err}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--tls-cert", "x.pem"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "--tls-cert needs --tls-key");
}

const ADMIN_TOKEN: &str = "admin-token-for-tls-tests-0123";

/// `ListApprovals` on the admin listener over TLS, with the token,
/// presenting `identity` if given; returns the number of grants.
async fn admin_list(port: u16, pki: &Pki, identity: Option<&Pem>) -> Result<usize, String> {
    let channel = tls_channel(port, pki, identity).await?;
    let mut request = tonic::Request::new(pb::ListApprovalsRequest { audit_entries: 0 });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
    let answer = pb::admin_client::AdminClient::new(channel)
        .list_approvals(request)
        .await
        .map_err(|e| format!("list: {e:?}"))?
        .into_inner();
    Ok(answer.grants.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_can_require_a_client_certificate_of_its_own() {
    let pki = Pki::new();
    let dir = policy_dir(&[("p.yaml", POLICY)]);
    let token = pki.path("admin-token");
    std::fs::write(&token, ADMIN_TOKEN).unwrap();
    let admin_port = common::free_port();
    let mut args = vec![
        "--policies".to_string(),
        dir.path().display().to_string(),
        "--admin-token-file".to_string(),
        token.display().to_string(),
        "--admin-listen".to_string(),
        format!("127.0.0.1:{admin_port}"),
        "--admin-tls-client-ca".to_string(),
        pki.path("ca.pem").display().to_string(),
    ];
    // The public listeners speak TLS without asking for certificates.
    args.extend(pki.args(false));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let tollgate = TollgateProcess::start(&args);

    grpc_check(tollgate.port, &pki, None).await.unwrap();
    assert_eq!(admin_list(admin_port, &pki, Some(&pki.client)).await, Ok(0));
    for (who, identity) in [
        ("no certificate", None),
        ("untrusted CA", Some(&pki.stranger)),
    ] {
        let refused = admin_list(admin_port, &pki, identity).await;
        assert!(refused.is_err(), "admin call with {who} was served");
    }
    // The admin API is not on the public gRPC port.
    let public = admin_list(tollgate.port, &pki, None).await;
    assert!(
        public.as_ref().is_err_and(|e| e.contains("Unimplemented")),
        "{public:?}"
    );

    // The CLI reaches it with the private CA and a client certificate,
    // and is refused without the certificate.
    std::fs::write(pki.path("client.pem"), &pki.client.cert).unwrap();
    std::fs::write(pki.path("client.key"), &pki.client.key).unwrap();
    let cli = |with_identity: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.args([
            "approvals",
            "--server",
            &format!("https://localhost:{admin_port}"),
        ])
        .args(["--token-file", token.to_str().unwrap()])
        .args(["--ca-file", pki.path("ca.pem").to_str().unwrap()])
        .env_remove("TOLLGATE_ADMIN_TOKEN");
        if with_identity {
            cmd.args(["--client-cert", pki.path("client.pem").to_str().unwrap()])
                .args(["--client-key", pki.path("client.key").to_str().unwrap()]);
        }
        cmd.output().unwrap()
    };
    // The server is another process: a blocking wait here holds up nothing.
    let ok = cli(true);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "no active approvals\n");
    let refused = cli(false);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("cannot reach the server"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// `tollgate health` or `tollgate usage` with `args`, the server named by
/// `--server`; its exit code and what it printed on stdout and stderr.
fn client_command(command: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg(command)
        .args(args)
        .env_remove("TOLLGATE_HTTP_LISTEN")
        .env_remove("TOLLGATE_CONFIG")
        .env_remove("TOLLGATE_REDIS_URL")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_usage_speak_https_with_a_private_ca() {
    let pki = Pki::new();
    let (tollgate, _policies) = start(&pki, false);
    grpc_check(tollgate.port, &pki, None).await.unwrap();
    let url = format!("https://localhost:{}", tollgate.http_port);
    let ca = pki.path("ca.pem").display().to_string();
    // The server is another process: blocking waits here hold up nothing.
    let (code, out, err) = client_command("health", &["--server", &url, "--ca-file", &ca]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"ready\":true"), "{out}");
    let (code, out, err) = client_command(
        "health",
        &["--server", &url, "--ca-file", &ca, "--path", "/healthz"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(!out.is_empty());

    let (code, out, err) = client_command("usage", &["--server", &url, "--ca-file", &ca]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("RULE"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("plenty")), "{out}");
    let (code, out, err) = client_command("usage", &["--server", &url, "--ca-file", &ca, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["counters"][0]["rule"], "plenty", "{report}");
    assert_eq!(report["counters"][0]["used"], "1", "{report}");

    // Without the private CA the certificate is not trusted; plain HTTP
    // gets no answer from a TLS listener.
    for command in ["health", "usage"] {
        let (code, _, err) = client_command(command, &["--server", &url]);
        assert_eq!(code, Some(1), "{command} trusted an unknown CA");
        assert!(err.contains("TLS handshake"), "{command}: {err}");
        let plain = format!("http://127.0.0.1:{}", tollgate.http_port);
        let (code, _, err) = client_command(command, &["--server", &plain]);
        assert_eq!(code, Some(1), "{command} over plain HTTP: {err}");
    }
    let addr = format!("127.0.0.1:{}", tollgate.http_port);
    let (code, _, _) = client_command("health", &["--http-listen", &addr]);
    assert_eq!(code, Some(1));
}

#[test]
fn health_and_usage_present_a_client_certificate_for_mutual_tls() {
    let pki = Pki::new();
    let (tollgate, _policies) = start(&pki, true);
    std::fs::write(pki.path("client.pem"), &pki.client.cert).unwrap();
    std::fs::write(pki.path("client.key"), &pki.client.key).unwrap();
    std::fs::write(pki.path("stranger.pem"), &pki.stranger.cert).unwrap();
    std::fs::write(pki.path("stranger.key"), &pki.stranger.key).unwrap();
    let url = format!("https://127.0.0.1:{}", tollgate.http_port);
    let ca = pki.path("ca.pem").display().to_string();
    let with = |command: &str, who: Option<&str>| {
        let (cert, key) = who
            .map(|w| {
                (
                    pki.path(&format!("{w}.pem")).display().to_string(),
                    pki.path(&format!("{w}.key")).display().to_string(),
                )
            })
            .unzip();
        let mut args = vec!["--server", url.as_str(), "--ca-file", ca.as_str()];
        if let (Some(cert), Some(key)) = (&cert, &key) {
            args.extend(["--client-cert", cert.as_str(), "--client-key", key.as_str()]);
        }
        client_command(command, &args)
    };
    let (code, out, err) = with("health", Some("client"));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"ready\":true"), "{out}");
    let (code, out, err) = with("usage", Some("client"));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "no counters\n");
    for command in ["health", "usage"] {
        for who in [None, Some("stranger")] {
            let (code, _, err) = with(command, who);
            assert_eq!(code, Some(1), "{command} with {who:?} was served: {err}");
        }
    }
    // A certificate needs its key.
    let cert = pki.path("client.pem").display().to_string();
    let (code, _, err) = client_command(
        "health",
        &["--server", &url, "--ca-file", &ca, "--client-cert", &cert],
    );
    assert_eq!(code, Some(2), "{err}");
}

/// A TLS connection to `port` trusting only `ca`, offering `alpn`.
async fn tls_connect(
    port: u16,
    ca: &str,
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))
}

/// The leaf certificate a new connection to `port` is shown, as DER.
async fn presented(port: u16, ca: &str, alpn: &[u8]) -> Result<Vec<u8>, String> {
    let tls = tls_connect(port, ca, alpn).await?;
    let (_, session) = tls.get_ref();
    let certs = session.peer_certificates().ok_or("no certificate")?;
    Ok(certs[0].to_vec())
}

fn der(pem: &Pem) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.cert.as_bytes())
        .unwrap()
        .to_vec()
}

/// `GET path` over TLS; the body.
async fn https_get(port: u16, ca: &str, path: &str) -> Result<String, String> {
    let mut tls = tls_connect(port, ca, b"http/1.1").await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&response).into_owned();
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// Polls every port until a new connection to each is shown `want`, up to
/// `within`; how long that took.
async fn until_presented(
    ports: &[(u16, &[u8])],
    ca: &str,
    want: &Pem,
    within: std::time::Duration,
) -> Result<std::time::Duration, String> {
    let started = std::time::Instant::now();
    let want = der(want);
    loop {
        let mut seen = Vec::new();
        for (port, alpn) in ports {
            seen.push(presented(*port, ca, alpn).await);
        }
        if seen.iter().all(|s| s.as_ref() == Ok(&want)) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            return Err(format!("after {within:?}: {seen:?}"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// Certificates are renewed on disk under a running server, as
/// cert-manager or kubelet do (a new file renamed over the old) and as a
/// person does (rewritten in place). Every TLS listener (gRPC, HTTP, the
/// admin API's own) shows the new certificate to the next connection, with
/// no restart; a pair that does not load (not a certificate, or a key that
/// is not the certificate's) keeps the one in force serving, logged and
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_reloaded_when_their_files_change() {
    use rcgen::ExtendedKeyUsagePurpose::ServerAuth;
    let issuer = ca("reload CA");
    let ca = issuer.pem();
    let [a, b, c] = ["a", "b", "c"].map(|n| leaf(&issuer, &format!("tollgate {n}"), ServerAuth));
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, &a.cert).unwrap();
    std::fs::write(&key, &a.key).unwrap();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, ADMIN_TOKEN).unwrap();
    let policies = policy_dir(&[("p.yaml", POLICY)]);
    let admin_port = common::free_port();
    let admin = format!("127.0.0.1:{admin_port}");
    let mut tollgate = TollgateProcess::start(&[
        "--policies",
        policies.path().to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--admin-token-file",
        token.to_str().unwrap(),
        "--admin-listen",
        &admin,
        // Only file events can explain a reload within the test.
        "--rescan-every",
        "1h",
    ]);
    let pid = tollgate.pid();
    let ports: [(u16, &[u8]); 3] = [
        (tollgate.port, b"h2"),
        (tollgate.http_port, b"http/1.1"),
        (admin_port, b"h2"),
    ];
    let bound = std::time::Duration::from_secs(5);
    until_presented(&ports, &ca, &a, std::time::Duration::ZERO)
        .await
        .unwrap();

    // Not a certificate, then a certificate whose key is not the one on
    // disk: both refused, and A keeps serving.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot one\n").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    until_presented(&ports, &ca, &a, std::time::Duration::ZERO)
        .await
        .unwrap();
    std::fs::write(&cert, &b.cert).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    until_presented(&ports, &ca, &a, std::time::Duration::ZERO)
        .await
        .unwrap();
    let metrics = https_get(tollgate.http_port, &ca, "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_tls_certificate_reloads_total{outcome=\"rejected\"} 2"),
        "{metrics}"
    );
    let log = tollgate.log();
    let refusals: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("TLS certificate change refused"))
        .collect();
    assert_eq!(refusals.len(), 2, "{log:#?}");
    assert!(refusals[1].contains("certificate and key"), "{refusals:?}");

    // B written beside the files and renamed over them.
    for (path, text) in [(&key, &b.key), (&cert, &b.cert)] {
        let tmp = dir.path().join(".incoming");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    let renamed = until_presented(&ports, &ca, &b, bound).await.unwrap();

    // C written into the same files.
    std::fs::write(&cert, &c.cert).unwrap();
    std::fs::write(&key, &c.key).unwrap();
    let rewritten = until_presented(&ports, &ca, &c, bound).await.unwrap();

    // A connection made now carries a real request on the new certificate.
    let body = https_get(tollgate.http_port, &ca, "/readyz").await.unwrap();
    assert!(body.contains("ready"), "{body}");
    let metrics = https_get(tollgate.http_port, &ca, "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_tls_certificate_reloads_total{outcome=\"applied\"} 2"),
        "{metrics}"
    );
    assert!(tollgate.is_running(), "the server must not have restarted");
    assert_eq!(tollgate.pid(), pid);
    println!(
        "new certificate served {renamed:?} after a rename, {rewritten:?} after an in-place write"
    );
}

/// A Kubernetes Secret volume: `tls.crt` and `tls.key` are symlinks into
/// `..data`, itself a symlink to a timestamped directory, and an update
/// writes a new directory and renames a new `..data` link over the old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_secret_update_reloads_the_certificate() {
    use rcgen::ExtendedKeyUsagePurpose::ServerAuth;
    use std::os::unix::fs::symlink;
    let issuer = ca("secret CA");
    let ca = issuer.pem();
    let [a, b] = ["a", "b"].map(|n| leaf(&issuer, &format!("tollgate {n}"), ServerAuth));
    let volume = tempfile::tempdir().unwrap();
    let path = |name: &str| volume.path().join(name);
    let version = |name: &str, pem: &Pem| {
        std::fs::create_dir(path(name)).unwrap();
        std::fs::write(path(name).join("tls.crt"), &pem.cert).unwrap();
        std::fs::write(path(name).join("tls.key"), &pem.key).unwrap();
    };
    version("..2026_03_02_a", &a);
    symlink("..2026_03_02_a", path("..data")).unwrap();
    symlink("..data/tls.crt", path("tls.crt")).unwrap();
    symlink("..data/tls.key", path("tls.key")).unwrap();
    let policies = policy_dir(&[("p.yaml", POLICY)]);
    let tollgate = TollgateProcess::start(&[
        "--policies",
        policies.path().to_str().unwrap(),
        "--tls-cert",
        path("tls.crt").to_str().unwrap(),
        "--tls-key",
        path("tls.key").to_str().unwrap(),
        "--rescan-every",
        "1h",
    ]);
    let ports: [(u16, &[u8]); 2] = [(tollgate.port, b"h2"), (tollgate.http_port, b"http/1.1")];
    until_presented(&ports, &ca, &a, std::time::Duration::ZERO)
        .await
        .unwrap();

    version("..2026_03_02_b", &b);
    symlink("..2026_03_02_b", path("..data_tmp")).unwrap();
    std::fs::rename(path("..data_tmp"), path("..data")).unwrap();
    std::fs::remove_dir_all(path("..2026_03_02_a")).unwrap();
    let took = until_presented(&ports, &ca, &b, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    println!("new certificate served {took:?} after the Secret's ..data swap");
}
