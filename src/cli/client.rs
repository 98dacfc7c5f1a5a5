//! What the client commands (`health`, `usage`, `spend`, the admin
//! commands) share: how they reach a server over HTTP or HTTPS, or its
//! Redis directly.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tollgate::http_client::{self, Target};
use tollgate_core::store::{RedisConfig, RedisStore};

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

/// How a report command reads Redis straight, as `serve` does.
#[derive(clap::Args)]
pub(super) struct RedisArgs {
    /// Read straight from Redis.
    #[arg(long, env = "TOLLGATE_REDIS_URL")]
    pub redis: Option<String>,
    #[arg(long, env = "TOLLGATE_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    #[arg(long, env = "TOLLGATE_REDIS_CLUSTER")]
    pub redis_cluster: bool,
    #[arg(long, env = "TOLLGATE_REDIS_PREFIX", default_value = "tollgate:")]
    pub redis_prefix: String,
}

impl RedisArgs {
    /// Connects to `url` with these options.
    pub async fn connect(&self, url: &str) -> Result<RedisStore, String> {
        let config = RedisConfig {
            prefix: self.redis_prefix.clone(),
            cluster: self.redis_cluster,
            ca_file: self.redis_ca_file.clone(),
            ..RedisConfig::new(url.to_string())
        };
        RedisStore::connect(&config)
            .await
            .map_err(|e| e.to_string())
    }
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
