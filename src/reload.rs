//! Live policy reload: watch the policy directories, and swap in a new
//! policy set when, and only when, the whole new set is valid.
//!
//! Events only say "look again". Every look reads every file, hashes the
//! contents, and does nothing if the hash equals the policy in force, so
//! duplicate or spurious events cost one directory read. Watching each
//! directory *and its parent* catches in-place writes, renames over a file,
//! the Kubernetes `..data` symlink swap, and a directory symlink being
//! re-pointed; a periodic rescan catches anything an event missed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

pub use crate::status::PolicyStatus;
use tollgate_core::engine::window::{format_utc, Millis};
use tollgate_core::gate::Gate;
use tollgate_core::policy::{self, CompiledPolicy, LoadErrors};

#[derive(Debug, Clone)]
pub struct ReloadConfig {
    pub dirs: Vec<PathBuf>,
    /// Quiet time after an event before reading, so a burst of events
    /// (an editor's save, a ConfigMap swap) becomes one reload.
    pub debounce: Duration,
    /// How often the directories are read even without events.
    pub rescan_every: Duration,
    /// Accept directories with no policy files (no rules at all).
    pub allow_empty: bool,
}

/// Reads and compiles the directories, refusing an empty set unless asked.
pub fn load(dirs: &[PathBuf], allow_empty: bool) -> Result<CompiledPolicy, LoadErrors> {
    let files = match policy::read_dirs(dirs) {
        Ok(files) => files,
        Err(_) if allow_empty && dirs.iter().all(|d| !d.exists()) => Vec::new(),
        Err(e) => return Err(e),
    };
    if files.is_empty() && !allow_empty {
        let names: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        return Err(LoadErrors(vec![policy::Diagnostic {
            file: names.join(", "),
            pos: Default::default(),
            message:
                "no policy files (*.yaml, *.yml) found; pass --allow-empty to run with no rules"
                    .to_string(),
        }]));
    }
    policy::compile_sources(&files)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    Unchanged,
    Applied { version: String, rules: usize },
    Rejected { version: String, errors: LoadErrors },
}

#[derive(Debug)]
pub struct Reloader {
    gate: Arc<Gate>,
    config: ReloadConfig,
    status: Mutex<PolicyStatus>,
    /// The content hash last rejected, so the same bad edit is logged once.
    rejected: Mutex<Option<String>>,
}

impl Reloader {
    pub fn new(gate: Arc<Gate>, config: ReloadConfig) -> Arc<Reloader> {
        let policy = gate.policy();
        let status = PolicyStatus {
            version: policy.version.to_string(),
            loaded_at: format_utc(gate.now()),
            rules: policy.rules().len(),
            reloads: 0,
            failed_reloads: 0,
            last_error: None,
            error_since: None,
        };
        Arc::new(Reloader {
            gate,
            config,
            status: Mutex::new(status),
            rejected: Mutex::new(None),
        })
    }

    pub fn status(&self) -> PolicyStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads everything, and swaps in the result if it differs from the
    /// policy in force and is valid as a whole.
    pub fn reload_now(&self) -> ReloadOutcome {
        let now = self.gate.now();
        let files = match policy::read_dirs(&self.config.dirs) {
            Ok(files) => files,
            Err(errors) => return self.reject("unreadable".to_string(), errors, now),
        };
        let version = policy::content_version(&files);
        if *version == *self.gate.policy().version {
            self.clear_error_if_back_in_force();
            return ReloadOutcome::Unchanged;
        }
        if files.is_empty() && !self.config.allow_empty {
            let errors = LoadErrors(vec![policy::Diagnostic {
                file: self.dir_names(),
                pos: Default::default(),
                message: "no policy files left; keeping the rules in force (pass --allow-empty to accept an empty set)"
                    .to_string(),
            }]);
            return self.reject(version, errors, now);
        }
        match policy::compile_sources(&files) {
            Ok(compiled) => {
                let rules = compiled.rules().len();
                self.gate.replace_policy(compiled);
                let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
                status.version = version.clone();
                status.loaded_at = format_utc(now);
                status.rules = rules;
                status.reloads += 1;
                status.last_error = None;
                status.error_since = None;
                drop(status);
                *self.rejected.lock().unwrap_or_else(|e| e.into_inner()) = None;
                tracing::info!(%version, rules, "policy reloaded");
                ReloadOutcome::Applied { version, rules }
            }
            Err(errors) => self.reject(version, errors, now),
        }
    }

    fn reject(&self, version: String, errors: LoadErrors, now: Millis) -> ReloadOutcome {
        let mut rejected = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        let first_time = rejected.as_deref() != Some(version.as_str());
        if first_time {
            *rejected = Some(version.clone());
            drop(rejected);
            tracing::error!(
                %version,
                errors = errors.0.len(),
                "policy edit rejected; keeping the policy in force:\n{errors}"
            );
            let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
            status.failed_reloads += 1;
            status.last_error = Some(errors.to_string());
            status.error_since = Some(format_utc(now));
        }
        ReloadOutcome::Rejected { version, errors }
    }

    /// A rejected edit that was undone on disk is no longer an error.
    fn clear_error_if_back_in_force(&self) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if status.last_error.is_some() {
            status.last_error = None;
            status.error_since = None;
            *self.rejected.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    fn dir_names(&self) -> String {
        self.config
            .dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Starts watching; reloads run off the async workers so that a large
    /// policy never stalls decisions. Stops when `shutdown` resolves.
    pub fn spawn(
        self: &Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<tokio::task::JoinHandle<()>, notify::Error> {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Reading a file is no change; this look's own reads
                // would otherwise ask for the next look, forever.
                if event.is_ok_and(|e| !is_read_event(&e.kind)) {
                    // A full channel already holds a pending "look again".
                    let _ = tx.try_send(());
                }
            })?;
        let mut watched = WatchSet::default();
        watched.refresh(&mut watcher, &self.config.dirs);
        let this = self.clone();
        Ok(tokio::spawn(async move {
            let mut rescan = tokio::time::interval(this.config.rescan_every);
            rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            rescan.tick().await;
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    _ = &mut shutdown => break,
                    Some(()) = rx.recv() => {
                        tokio::time::sleep(this.config.debounce).await;
                        while rx.try_recv().is_ok() {}
                    }
                    _ = rescan.tick() => {}
                }
                // Watch what the directories resolve to before reading
                // them, so that an edit made once the new set is in force
                // lands where the watch already is.
                watched.refresh(&mut watcher, &this.config.dirs);
                let worker = this.clone();
                let _ = tokio::task::spawn_blocking(move || worker.reload_now()).await;
            }
        }))
    }
}

/// Whether a watch event only says a file was opened or read, which a
/// watch of a directory reports for every reader, the watcher included.
pub fn is_read_event(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    matches!(
        kind,
        notify::EventKind::Access(
            AccessKind::Open(_) | AccessKind::Read | AccessKind::Close(AccessMode::Read)
        )
    )
}

/// The paths watched: each policy directory (as resolved now) and its
/// parent. Re-resolved after every look, so a re-pointed directory symlink
/// moves the watch with it.
#[derive(Default)]
struct WatchSet {
    paths: Vec<(PathBuf, Option<PathBuf>)>,
}

impl WatchSet {
    fn refresh(&mut self, watcher: &mut impl Watcher, dirs: &[PathBuf]) {
        let wanted: Vec<(PathBuf, Option<PathBuf>)> = dirs
            .iter()
            .flat_map(|d| {
                let parent = d
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(Path::to_path_buf);
                [d.clone()].into_iter().chain(parent)
            })
            .map(|p| {
                let resolved = std::fs::canonicalize(&p).ok();
                (p, resolved)
            })
            .collect();
        for (path, resolved) in &wanted {
            if self.paths.iter().any(|(p, r)| p == path && r == resolved) {
                continue;
            }
            let _ = watcher.unwatch(path);
            if resolved.is_some() {
                if let Err(e) = watcher.watch(path, RecursiveMode::NonRecursive) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot watch; relying on the periodic rescan");
                }
            }
        }
        self.paths = wanted;
    }
}

/// The default quiet time and rescan period.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(150);
pub const DEFAULT_RESCAN: Duration = Duration::from_secs(10);
