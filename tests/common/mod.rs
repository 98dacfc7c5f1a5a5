#![allow(dead_code)]

pub mod envoy_authz;
pub mod envoy_ext_proc;
pub mod nginx;
pub mod sdk;

use std::sync::Arc;

use tollgate_core::engine::window::days_from_civil;
use tollgate_core::gate::{Gate, GateConfig, ManualClock};
use tollgate_core::policy::{compile_sources, CompiledPolicy, LoadErrors, SourceFile};
use tollgate_core::store::{CounterStore, MemoryStore};

pub fn sources(files: &[(&str, &str)]) -> Vec<SourceFile> {
    files
        .iter()
        .map(|(name, text)| SourceFile {
            name: name.to_string(),
            text: text.to_string(),
        })
        .collect()
}

pub fn compile(files: &[(&str, &str)]) -> Result<CompiledPolicy, LoadErrors> {
    compile_sources(&sources(files))
}

pub fn policy(yaml: &str) -> CompiledPolicy {
    match compile(&[("p.yaml", yaml)]) {
        Ok(p) => p,
        Err(e) => panic!("policy should load:\n{e}"),
    }
}

/// Milliseconds at a UTC date and time.
pub fn at(y: i64, m: u32, d: u32, hh: i64, mm: i64) -> i64 {
    days_from_civil(y, m, d) * 86_400_000 + hh * 3_600_000 + mm * 60_000
}

pub fn gate_with(
    policy: CompiledPolicy,
    store: Arc<dyn CounterStore>,
    clock: Arc<ManualClock>,
) -> Gate {
    // These gates test what the stores decide, not how fast: 64 contending
    // tasks beside dozens of redis-servers on a busy two-core machine can
    // take longer than the production default of 50 ms, which the
    // timeout tests against real processes cover.
    let config = GateConfig {
        store_timeout: std::time::Duration::from_secs(5),
        ..GateConfig::default()
    };
    Gate::new(policy, store, clock, config)
}

pub fn memory_gate(yaml: &str, now: i64) -> (Gate, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(now));
    let gate = gate_with(
        policy(yaml),
        Arc::new(MemoryStore::default()),
        clock.clone(),
    );
    (gate, clock)
}

/// A `redis-server` of the test's own on a free port, killed on drop.
/// A missing `redis-server` fails the test: it is never skipped.
pub struct RedisServer {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    pub fn start() -> RedisServer {
        // Another test's server can take the free port first; then this
        // one exits at once, and would otherwise be mistaken for ready.
        for _ in 0..5 {
            if let Some(server) = Self::try_start(free_port(), &[]) {
                return server;
            }
        }
        panic!("redis-server did not start on any of five free ports");
    }

    pub fn start_on(port: u16) -> RedisServer {
        Self::start_with(port, &[])
    }

    /// Starts with extra `redis-server` arguments, such as `--requirepass`.
    pub fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        Self::try_start(port, extra)
            .unwrap_or_else(|| panic!("redis-server exited at start on port {port}"))
    }

    /// A server on `port`, or `None` if it exited before it answered (the
    /// port was taken).
    fn try_start(port: u16, extra: &[&str]) -> Option<RedisServer> {
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(extra)
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server must be installed for these tests: {e}"));
        let mut server = RedisServer {
            child,
            port,
            _dir: dir,
        };
        server.wait_ready().then_some(server)
    }

    /// Whether it answers; `false` if it exited first.
    fn wait_ready(&mut self) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if self.child.try_wait().ok().flatten().is_some() {
                return false;
            }
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"PING\r\n");
                let mut buf = [0u8; 7];
                // Without the password the server answers NOAUTH, which
                // still shows it is up.
                if s.read(&mut buf).is_ok_and(|n| n > 0) && (buf[0] == b'+' || buf[0] == b'-') {
                    // Answered, but perhaps by another test's server on
                    // the same port: this one must still be running.
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    return self.child.try_wait().ok().flatten().is_none();
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A store on this server; call inside a Tokio runtime.
    pub async fn store(&self) -> tollgate_core::store::RedisStore {
        tollgate_core::store::RedisStore::connect(&tollgate_core::store::RedisConfig::new(
            self.url(),
        ))
        .await
        .unwrap()
    }

    /// Kills the server at once, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `tollgate serve` process of the test's own, killed on drop.
pub struct TollgateProcess {
    child: std::process::Child,
    pub port: u16,
    pub http_port: u16,
    _data: tempfile::TempDir,
    /// The process's log lines so far (the first [`MAX_LOG_LINES`]).
    log: Arc<std::sync::Mutex<Vec<String>>>,
}

/// Log lines a [`TollgateProcess`] keeps for [`TollgateProcess::log`].
pub const MAX_LOG_LINES: usize = 10_000;

impl TollgateProcess {
    /// Starts the binary with `args` on a free port and waits until it serves.
    pub fn start(args: &[&str]) -> TollgateProcess {
        Self::start_env(args, &[])
    }

    /// [`start`](Self::start) with extra environment variables.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> TollgateProcess {
        // A free port can be taken by another test between `free_port` and
        // the bind: a process that exits for that is started again on
        // other ports; anything else fails the test with its log.
        for _ in 0..5 {
            match Self::try_start(args, env) {
                Ok(p) => return p,
                Err(log) if log.iter().any(|l| l.contains("cannot listen on")) => continue,
                Err(log) => panic!("tollgate did not start serving:\n{}", log.join("\n")),
            }
        }
        panic!("tollgate found no free ports in five tries");
    }

    fn try_start(args: &[&str], env: &[(&str, &str)]) -> Result<TollgateProcess, Vec<String>> {
        use std::io::BufRead;
        let port = free_port();
        let http_port = free_port();
        // Each process its own data directory (a flag or `env` may name
        // another): processes never share one, nor leave one behind.
        let data = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
            .args(args)
            .env("TOLLGATE_DATA_DIR", data.path())
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if !sent && line.contains("serving gRPC") {
                    let _ = tx.send(());
                    sent = true;
                }
                let mut kept = kept.lock().unwrap();
                if kept.len() < MAX_LOG_LINES {
                    kept.push(line);
                }
            }
        });
        if rx.recv_timeout(std::time::Duration::from_secs(20)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            // The reader thread ends with the process; give it a moment
            // to keep the last lines.
            std::thread::sleep(std::time::Duration::from_millis(100));
            let lines = log.lock().unwrap().clone();
            return Err(lines);
        }
        Ok(TollgateProcess {
            child,
            port,
            http_port,
            _data: data,
            log,
        })
    }

    /// The log lines written so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Whether the process is still running (it has not exited or
    /// restarted).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The process id, to signal it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `within` for the process to exit by itself.
    pub fn wait_exit(&mut self, within: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Sends a signal by name (TERM, INT, KILL) and waits for the exit status.
    pub fn signal_and_wait(&mut self, signal: &str) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for TollgateProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `files` into a fresh directory and returns it.
pub fn policy_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// A local Redis Cluster of three masters, made with `redis-cli --cluster
/// create`, stopped on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                let port = free_port();
                RedisServer::start_with(
                    port,
                    &["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
                )
            })
            .collect();
        form_cluster(&nodes.iter().map(|n| n.port).collect::<Vec<_>>());
        RedisCluster { nodes }
    }

    /// Every node's URL, comma-separated, as `--redis` takes it.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub async fn store(&self) -> tollgate_core::store::RedisStore {
        let config = tollgate_core::store::RedisConfig {
            cluster: true,
            ..tollgate_core::store::RedisConfig::new(self.urls())
        };
        tollgate_core::store::RedisStore::connect(&config)
            .await
            .unwrap()
    }
}

/// Makes a cluster of the cluster-enabled servers on `ports`, all masters,
/// and waits until every node reports it ready.
fn form_cluster(ports: &[u16]) {
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let out = std::process::Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap_or_else(|e| panic!("redis-cli must be installed for these tests: {e}"));
    assert!(
        out.status.success(),
        "cluster create failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for port in ports {
        loop {
            let info = std::process::Command::new("redis-cli")
                .args(["-p", &port.to_string(), "cluster", "info"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "cluster did not become ready"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl RedisServer {
    /// A TLS-only server whose certificate for 127.0.0.1 is signed by a CA
    /// made now with `openssl`. Returns the server and the CA to trust.
    pub fn start_tls() -> (RedisServer, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        std::fs::write(
            path("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap_or_else(|e| panic!("openssl must be installed for this test: {e}"));
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "key.pem",
            "-out",
            "req.csr",
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "req.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "cert.pem",
        ]);
        let (cert, key, ca) = (path("cert.pem"), path("key.pem"), path("ca.pem"));
        let port = free_port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--tls-cert-file")
            .arg(&cert)
            .arg("--tls-key-file")
            .arg(&key)
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server must be installed for these tests: {e}"));
        // Built first, so that a failed start still kills the process.
        let server = RedisServer {
            child,
            port,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let ping = std::process::Command::new("redis-cli")
                .args(["--tls", "-p", &port.to_string()])
                .arg("--cacert")
                .arg(&ca)
                .arg("ping")
                .output()
                .unwrap();
            if String::from_utf8_lossy(&ping.stdout).contains("PONG") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "TLS redis-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        (server, ca)
    }
}

/// Reload settings for tests: a short debounce, and a rescan far enough
/// away that only real file events can explain a reload.
pub fn reload_config(dirs: &[&std::path::Path]) -> tollgate::reload::ReloadConfig {
    tollgate::reload::ReloadConfig {
        dirs: dirs.iter().map(|d| d.to_path_buf()).collect(),
        debounce: std::time::Duration::from_millis(100),
        rescan_every: std::time::Duration::from_secs(3600),
        allow_empty: false,
    }
}

/// A plain HTTP/1.1 GET on 127.0.0.1: the status code and the body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let code = response
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// Polls `check` every 50 ms until it holds or `within` passes.
pub fn eventually(within: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The `redis-server` shared by every test of one test binary, started on
/// first use. Tests on it keep to key prefixes of their own
/// ([`SharedRedisServer::store`]), so they may run in parallel.
pub fn shared_redis() -> &'static SharedRedisServer {
    static SERVER: std::sync::LazyLock<SharedRedisServer> =
        std::sync::LazyLock::new(|| SharedRedisServer::start(&[]));
    &SERVER
}

/// The three-master Redis Cluster shared by every test of one test binary,
/// started on first use; as for [`shared_redis`], tests keep to key
/// prefixes of their own.
pub fn shared_cluster() -> &'static SharedRedisCluster {
    static CLUSTER: std::sync::LazyLock<SharedRedisCluster> =
        std::sync::LazyLock::new(SharedRedisCluster::start);
    &CLUSTER
}

/// Runs `redis-server "$@"` in a directory of its own until its standard
/// input reaches end of file, then stops it and removes the directory. It
/// ignores SIGINT so that a Ctrl-C (which stops the server, in the same
/// process group) still leaves it to clean up.
const SHARED_REDIS_SCRIPT: &str = r#"
trap '' INT
command -v redis-server >/dev/null || exit 127
dir=$(mktemp -d) || exit 1
redis-server "$@" --dir "$dir" &
server=$!
read -r _ignored
kill "$server" 2>/dev/null
wait "$server"
rm -rf "$dir"
"#;

/// A `redis-server` that lives as long as the test binary, for the shared
/// servers, which sit in statics and so are never dropped.
///
/// The server is the child of a small `sh` ([`SHARED_REDIS_SCRIPT`]) whose
/// standard input is a pipe that only this process writes to (std opens
/// pipes close-on-exec, so no other child inherits it). The kernel closes
/// the pipe when the test binary exits, however it exits, even on SIGKILL;
/// the shell then reads end of file, stops the server and removes its
/// directory. Dropping the value (as a panic part-way through starting a
/// cluster does) closes the pipe too.
pub struct SharedRedisServer {
    pub port: u16,
    /// Holds the pipe's write end, as the shell's `stdin`.
    _shell: std::process::Child,
}

impl SharedRedisServer {
    fn start(extra: &[&str]) -> SharedRedisServer {
        let port = free_port();
        let mut shell = std::process::Command::new("sh")
            .args(["-c", SHARED_REDIS_SCRIPT, "sh"])
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("sh must be installed for these tests: {e}"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !answers_ping(port) {
            if let Some(status) = shell.try_wait().unwrap() {
                panic!("redis-server must be installed for these tests: the shell exited {status}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "shared redis-server did not start on {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        SharedRedisServer {
            port,
            _shell: shell,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A store whose every key starts with `prefix`; call inside a Tokio
    /// runtime (each test's own: the connection belongs to it).
    pub async fn store(&self, prefix: &str) -> tollgate_core::store::RedisStore {
        let config = tollgate_core::store::RedisConfig {
            prefix: prefix.to_string(),
            ..tollgate_core::store::RedisConfig::new(self.url())
        };
        tollgate_core::store::RedisStore::connect(&config)
            .await
            .unwrap()
    }
}

/// Whether a Redis on `port` answers a PING (NOAUTH counts as an answer).
fn answers_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.write_all(b"PING\r\n");
    let mut buf = [0u8; 7];
    s.read(&mut buf).is_ok_and(|n| n > 0) && (buf[0] == b'+' || buf[0] == b'-')
}

/// A three-master Redis Cluster of [`SharedRedisServer`]s, stopped the same
/// way when the test binary exits.
pub struct SharedRedisCluster {
    pub nodes: Vec<SharedRedisServer>,
}

impl SharedRedisCluster {
    fn start() -> SharedRedisCluster {
        let nodes: Vec<SharedRedisServer> = (0..3)
            .map(|_| {
                SharedRedisServer::start(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        form_cluster(&nodes.iter().map(|n| n.port).collect::<Vec<_>>());
        SharedRedisCluster { nodes }
    }

    /// Every node's URL, comma-separated.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A cluster store whose every key starts with `prefix`; call inside a
    /// Tokio runtime.
    pub async fn store(&self, prefix: &str) -> tollgate_core::store::RedisStore {
        let config = tollgate_core::store::RedisConfig {
            cluster: true,
            prefix: prefix.to_string(),
            ..tollgate_core::store::RedisConfig::new(self.urls())
        };
        tollgate_core::store::RedisStore::connect(&config)
            .await
            .unwrap()
    }
}

impl RedisServer {
    /// The server's process id, to signal it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (STOP, CONT, KILL...) to the server.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// Runs `redis-cli` against this server; its standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }
}

/// Runs `redis-cli -p port args...`; its standard output.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("redis-cli must be installed for these tests: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl RedisCluster {
    /// A cluster of three masters each with one replica, made with
    /// `redis-cli --cluster create ... --cluster-replicas 1`, with
    /// `cluster-node-timeout` at `node_timeout_ms` so that a replica takes
    /// over soon after its master dies. Returns once every node reports
    /// the cluster ok and every replica is in sync.
    pub fn start_with_replicas(node_timeout_ms: u64) -> RedisCluster {
        let timeout = node_timeout_ms.to_string();
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                RedisServer::start_with(
                    free_port(),
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-node-timeout",
                        &timeout,
                    ],
                )
            })
            .collect();
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        form_cluster_with_replicas(&ports, 1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        for port in &ports {
            loop {
                let role = redis_cli(*port, &["info", "replication"]);
                if role.contains("role:master") || role.contains("master_link_status:up") {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "replica on {port} did not sync: {role}"
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        RedisCluster { nodes }
    }

    /// The node serving `slot` as master now, as `node` sees it.
    pub fn master_of_slot(&self, slot: u16, node: usize) -> Option<u16> {
        master_of_slot(self.nodes[node].port, slot)
    }

    /// Whether every node still running reports `cluster_state:ok`.
    pub fn is_ok(&self) -> bool {
        self.nodes
            .iter()
            .filter(|n| answers_ping(n.port))
            .all(|n| redis_cli(n.port, &["cluster", "info"]).contains("cluster_state:ok"))
    }
}

/// The port of the master serving `slot`, as the node on `port` sees it
/// (`CLUSTER NODES`), if one not marked failed does.
pub fn master_of_slot(port: u16, slot: u16) -> Option<u16> {
    let nodes = redis_cli(port, &["cluster", "nodes"]);
    nodes.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
            return None;
        }
        let serves = fields[8..].iter().any(|range| {
            let mut ends = range.splitn(2, '-').map(|n| n.parse::<u16>());
            match (ends.next(), ends.next()) {
                (Some(Ok(lo)), Some(Ok(hi))) => (lo..=hi).contains(&slot),
                (Some(Ok(one)), None) => one == slot,
                _ => false,
            }
        });
        let port = fields[1].split(['@', ':']).nth(1)?.parse().ok()?;
        serves.then_some(port)
    })
}

/// `redis-cli --cluster create` with `replicas` replicas per master, then
/// waits until every node reports the cluster ok.
fn form_cluster_with_replicas(ports: &[u16], replicas: u32) {
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let out = std::process::Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
        .output()
        .unwrap_or_else(|e| panic!("redis-cli must be installed for these tests: {e}"));
    assert!(
        out.status.success(),
        "cluster create failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for port in ports {
        while !redis_cli(*port, &["cluster", "info"]).contains("cluster_state:ok") {
            assert!(
                std::time::Instant::now() < deadline,
                "cluster did not become ready"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// An HTTP/1.1 answer: status, headers and body.
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request to 127.0.0.1 over a fresh connection, with
/// `headers` and `body`.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<HttpReply> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(HttpReply {
        status,
        headers,
        body: body.to_string(),
    })
}

/// The value of the Prometheus sample `series` (the name and labels as
/// `/metrics` prints them, e.g. `x_total{kind="full"}`) on the plain HTTP
/// port, or 0 when it is not there yet.
pub fn metric(http_port: u16, series: &str) -> f64 {
    let (_, body) = http_get(http_port, "/metrics").unwrap();
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// A native-API client connected to each of `servers`, in order.
pub async fn grpc_clients(
    servers: &[TollgateProcess],
) -> Vec<tollgate::proto::v1::tollgate_client::TollgateClient<tonic::transport::Channel>> {
    let mut clients = Vec::new();
    for s in servers {
        let channel = tonic::transport::Channel::from_shared(s.endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap();
        clients.push(tollgate::proto::v1::tollgate_client::TollgateClient::new(
            channel,
        ));
    }
    clients
}

/// A native-API check of `model` for `team`, estimating `input` tokens in
/// and `output` out.
pub fn native_check(
    team: &str,
    model: &str,
    input: u64,
    output: u64,
) -> tollgate::proto::v1::CheckRequest {
    tollgate::proto::v1::CheckRequest {
        attributes: Some(tollgate::proto::v1::Attributes {
            team: team.to_string(),
            model: model.to_string(),
            ..Default::default()
        }),
        estimate: Some(tollgate::proto::v1::Estimate {
            input_tokens: Some(input),
            output_tokens: Some(output),
            ..Default::default()
        }),
        ..Default::default()
    }
}
