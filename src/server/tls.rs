//! TLS, and mutual TLS, for any listener.
//!
//! One function builds the rustls configuration from PEM files, and one
//! accept loop turns a TCP listener into a stream of finished handshakes
//! that both tonic (as its incoming stream) and axum (as a `Listener`)
//! serve from. Handshakes run in their own tasks, so one slow or hostile
//! client never holds up the accept loop.
//!
//! Every listener presents the one [`ServerCert`], which is reloaded when
//! its files change: each new handshake takes the pair in force, so a
//! renewed certificate is served with no restart, and a pair that does not
//! load leaves the one in force serving.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// ALPN for gRPC, which needs HTTP/2.
pub const ALPN_H2: &[&[u8]] = &[b"h2"];
/// ALPN for the HTTP port, which speaks HTTP/1.1.
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];
/// ALPN for the admin listener, which serves gRPC and HTTP/1.1 alike.
pub const ALPN_H2_AND_HTTP1: &[&[u8]] = &[b"h2", b"http/1.1"];

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The PEM files of a listener's TLS setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, every client must present a certificate signed by one of
    /// these CAs.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_error(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_error(path, e))?;
    certificates_in(path, &pem)
}

fn certificates_in(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side of TLS for one listener, with ring as the provider and
/// `alpn` as its protocols, presenting whatever pair `cert` holds at each
/// handshake. With `client_ca`, a client without a certificate signed by
/// that CA fails the handshake.
pub fn server_config(
    files: &TlsFiles,
    cert: &Arc<ServerCert>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca)? {
                roots.add(cert).map_err(|e| file_error(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| file_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(cert.clone());
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// What a look at the certificate files found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertReload {
    /// The files hold the pair in force (or the pair last refused).
    Unchanged,
    /// A new pair loaded and is now presented to new connections.
    Applied,
    /// The files do not make a usable pair; the one in force stays.
    Rejected(String),
}

/// The certificate chain and key that every TLS listener presents, read
/// from `--tls-cert` and `--tls-key` and swapped whole when they change.
///
/// A new pair is only swapped in when the chain parses, the key parses
/// and the key is the certificate's; otherwise the pair in force keeps
/// serving, and the refusal is logged and counted once per content.
/// Connections already open keep the certificate they shook hands with.
#[derive(Debug)]
pub struct ServerCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    /// The file contents last looked at: in force, and last refused.
    seen: Mutex<SeenFiles>,
}

#[derive(Debug, Default)]
struct SeenFiles {
    in_force: (Vec<u8>, Vec<u8>),
    refused: Option<(Vec<u8>, Vec<u8>)>,
    /// Why the files could not be read at the last look, if they could not.
    unreadable: Option<String>,
}

/// The quiet time after a file event before the files are read, so that a
/// certificate and key written one after the other load as one pair.
pub const CERT_RELOAD_DEBOUNCE: Duration = Duration::from_millis(200);

impl ServerCert {
    /// Loads the pair now; a pair that does not load is an error, so that
    /// a bad certificate is a refusal to start.
    pub fn load(files: &TlsFiles) -> Result<Arc<ServerCert>, TlsError> {
        let contents = read_pair(&files.cert, &files.key)?;
        let key = certified_key(&files.cert, &files.key, &contents)?;
        Ok(Arc::new(ServerCert {
            cert: files.cert.clone(),
            key: files.key.clone(),
            current: ArcSwap::from_pointee(key),
            seen: Mutex::new(SeenFiles {
                in_force: contents,
                ..SeenFiles::default()
            }),
        }))
    }

    /// The pair new handshakes are given.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// Reads both files, and swaps in the pair they hold if it differs
    /// from the one in force and loads.
    pub fn reload_now(&self) -> CertReload {
        let contents = match read_pair(&self.cert, &self.key) {
            Ok(contents) => contents,
            Err(e) => return self.refuse(None, e),
        };
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.unreadable = None;
        if seen.in_force == contents || seen.refused.as_ref() == Some(&contents) {
            if seen.in_force == contents {
                seen.refused = None;
            }
            return CertReload::Unchanged;
        }
        drop(seen);
        match certified_key(&self.cert, &self.key, &contents) {
            Ok(key) => {
                self.current.store(Arc::new(key));
                let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                seen.in_force = contents;
                seen.refused = None;
                drop(seen);
                metrics::counter!(TLS_RELOADS, "outcome" => "applied").increment(1);
                tracing::info!(cert = %self.cert.display(), key = %self.key.display(), "TLS certificate reloaded; new connections get the new one");
                CertReload::Applied
            }
            Err(e) => self.refuse(Some(contents), e),
        }
    }

    /// Logs and counts a refused pair once per content, and unreadable
    /// files once per reason, until the files change again.
    fn refuse(&self, contents: Option<(Vec<u8>, Vec<u8>)>, e: TlsError) -> CertReload {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match contents {
            Some(contents) => seen.refused = Some(contents),
            None => {
                let reason = e.to_string();
                if seen.unreadable.as_ref() == Some(&reason) {
                    return CertReload::Unchanged;
                }
                seen.unreadable = Some(reason);
            }
        }
        drop(seen);
        metrics::counter!(TLS_RELOADS, "outcome" => "rejected").increment(1);
        tracing::error!(error = %e, "TLS certificate change refused; still serving the certificate in force");
        CertReload::Rejected(e.to_string())
    }

    /// Watches the certificate's and the key's directories (where renames
    /// over a file, in-place writes and the Kubernetes `..data` symlink
    /// swap all show), and reloads `debounce` after the last event, and
    /// every `rescan_every` in case an event was missed. Stops when
    /// `shutdown` resolves.
    pub fn spawn_watch(
        self: &Arc<Self>,
        debounce: Duration,
        rescan_every: Duration,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let watcher = self.watch_dirs(tx);
        let this = self.clone();
        tokio::spawn(async move {
            let _watcher = watcher;
            let mut rescan = tokio::time::interval(rescan_every);
            rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            rescan.tick().await;
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    _ = &mut shutdown => break,
                    Some(()) = rx.recv() => {
                        tokio::time::sleep(debounce).await;
                        while rx.try_recv().is_ok() {}
                    }
                    _ = rescan.tick() => {}
                }
                let cert = this.clone();
                let _ = tokio::task::spawn_blocking(move || cert.reload_now()).await;
            }
        })
    }

    /// A watcher of the files' directories that says "look again" on `tx`,
    /// or `None` (and a warning) when the platform will not watch them.
    fn watch_dirs(&self, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reading the files (ours included) is no change.
            if event.is_ok_and(|e| !crate::reload::is_read_event(&e.kind)) {
                let _ = tx.try_send(());
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the TLS certificate files; relying on the periodic rescan");
                return None;
            }
        };
        let mut dirs: Vec<PathBuf> = [&self.cert, &self.key]
            .into_iter()
            .map(|p| match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .collect();
        dirs.dedup();
        for dir in &dirs {
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(path = %dir.display(), error = %e, "cannot watch the TLS certificate's directory; relying on the periodic rescan");
            }
        }
        Some(watcher)
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Counted by outcome: `applied` or `rejected`.
const TLS_RELOADS: &str = crate::telemetry::names::TLS_RELOADS;

fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| file_error(p, e));
    Ok((read(cert)?, read(key)?))
}

/// The chain and key in `contents`, refused unless the key is the leaf
/// certificate's.
fn certified_key(
    cert: &Path,
    key: &Path,
    (cert_pem, key_pem): &(Vec<u8>, Vec<u8>),
) -> Result<CertifiedKey, TlsError> {
    let chain = certificates_in(cert, cert_pem)?;
    let private = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| file_error(key, e))?;
    CertifiedKey::from_der(chain, private, &provider())
        .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))
}

/// Connections on `listener` that completed a TLS handshake, in the order
/// they completed. The accept loop stops when this is dropped.
pub struct TlsIncoming {
    rx: mpsc::Receiver<TlsStream<TcpStream>>,
    local_addr: Option<SocketAddr>,
}

/// Accepts on `listener` and runs each handshake in its own task.
pub fn accept(listener: TcpListener, config: Arc<ServerConfig>) -> TlsIncoming {
    let local_addr = listener.local_addr().ok();
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off
                    // rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(stream).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    TlsIncoming { rx, local_addr }
}

impl tokio_stream::Stream for TlsIncoming {
    type Item = Result<TlsStream<TcpStream>, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|s| s.map(Ok))
    }
}

impl axum::serve::Listener for TlsIncoming {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.rx.recv().await {
                Some(stream) => {
                    let peer = stream.get_ref().0.peer_addr();
                    match peer {
                        Ok(peer) => return (stream, peer),
                        // Gone already; nothing to serve.
                        Err(_) => continue,
                    }
                }
                // The accept loop only ends when this is dropped, so this
                // is unreachable; park rather than spin if it ever is.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.local_addr
            .ok_or_else(|| std::io::Error::other("listener has no local address"))
    }
}
