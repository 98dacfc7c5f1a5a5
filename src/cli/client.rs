//! What the client commands (`health`, `usage --server`, the admin
//! commands) share: how they reach a server over HTTP or HTTPS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tollgate::http_client::{self, Target};

/// TLS options for reaching a server's HTTP listener over `https://`.
#[derive(clap::Args)]
pub(super) struct ServerTlsArgs {
    /// For https://: the CA (PEM) that signed the server's certificate, in
    /// place of the public web roots.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// For https://: a client certificate (PEM) to present, for a listener
    /// that requires one (`serve --tls-client-ca`).
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The private key (PEM) of `--client-cert`.
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
}

/// A server to send requests to, with the TLS setup for `https://`.
pub(super) struct Server {
    pub target: Target,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Server {
    pub fn new(url: &str, tls: &ServerTlsArgs) -> Result<Server, String> {
        let target = Target::parse(url)?;
        let tls = client_tls(
            tls.ca_file.as_deref(),
            tls.client_cert.as_deref(),
            tls.client_key.as_deref(),
        )?;
        Ok(Server { target, tls })
    }
}

/// The TLS setup the TLS flags ask for; `None` (the public web roots, no
/// client certificate) when none is given.
pub(super) fn client_tls(
    ca_file: Option<&Path>,
    client_cert: Option<&Path>,
    client_key: Option<&Path>,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if ca_file.is_none() && client_cert.is_none() {
        return Ok(None);
    }
    http_client::client_tls(ca_file, client_cert.zip(client_key)).map(Some)
}
