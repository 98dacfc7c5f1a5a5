//! Policy files: reading, validating and compiling a directory of YAML into
//! a [`CompiledPolicy`] the engine can decide from.
//!
//! Loading never stops at the first problem: every file is read and every
//! error is returned, each with `file:line:column`.

pub mod catalog;
mod compile;
pub mod glob;
pub mod model;
mod parse;
mod validate;
pub mod yaml;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use compile::{same_model, AttrLookup, CompiledPolicy};
pub use model::*;
pub use parse::parse_duration;
pub use yaml::Pos;

/// One problem found in the policy files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub pos: Pos,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.pos.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}:{}: {}", self.file, self.pos, self.message)
        }
    }
}

/// Every problem found while loading, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadErrors(pub Vec<Diagnostic>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadErrors {}

/// A policy file's name and full text, as read from disk.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

/// Reads every `*.yaml` / `*.yml` file directly inside each directory,
/// following symlinks (a Kubernetes ConfigMap mount is all symlinks) and
/// skipping hidden entries such as `..data`.
pub fn read_dirs(dirs: &[PathBuf]) -> Result<Vec<SourceFile>, LoadErrors> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                errors.push(io_error(dir, &e));
                continue;
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_policy_file(p))
            .collect();
        paths.sort();
        for path in paths {
            match read_policy_file(&path) {
                Ok(text) => files.push(SourceFile {
                    name: path.display().to_string(),
                    text,
                }),
                Err(d) => errors.push(d),
            }
        }
    }
    add_catalogs(&mut files);
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(LoadErrors(errors))
    }
}

/// Reads from disk the price catalogs the policy files import, and adds
/// them to the set. One that cannot be read is left out, and compiling
/// reports it at its `import` entry.
pub fn add_catalogs(files: &mut Vec<SourceFile>) {
    let mut wanted = Vec::new();
    for f in files.iter() {
        for (path, _) in imports_of(f) {
            let name = catalog_name(&f.name, &path);
            if !wanted.contains(&name) {
                wanted.push(name);
            }
        }
    }
    for name in wanted {
        if files.iter().any(|f| f.name == name) {
            continue;
        }
        if let Ok(text) = read_bounded(Path::new(&name), catalog::MAX_CATALOG_BYTES) {
            files.push(SourceFile { name, text });
        }
    }
}

/// The `pricing.import` entries of a policy file, as written.
fn imports_of(file: &SourceFile) -> Vec<(String, Pos)> {
    let Ok(Some(root)) = yaml::parse(&file.text) else {
        return Vec::new();
    };
    let find = |node: &yaml::Node, key: &str| match &node.value {
        yaml::Value::Map(entries) => entries
            .iter()
            .find(|(k, _)| matches!(&k.value, yaml::Value::Scalar { text, .. } if text == key))
            .map(|(_, v)| v.clone()),
        _ => None,
    };
    let Some(import) = find(&root, "pricing").and_then(|p| find(&p, "import")) else {
        return Vec::new();
    };
    match import.value {
        yaml::Value::Seq(items) => items
            .into_iter()
            .filter_map(|n| match n.value {
                yaml::Value::Scalar { text, .. } => Some((text, n.pos)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A catalog's name: its path relative to the directory of the policy file
/// that imports it (or absolute).
pub fn catalog_name(importer: &str, path: &str) -> String {
    let dir = Path::new(importer).parent().unwrap_or(Path::new(""));
    dir.join(path.trim()).display().to_string()
}

fn is_catalog(file: &SourceFile) -> bool {
    file.name.to_ascii_lowercase().ends_with(".json")
}

/// The largest policy file accepted. Real policy sets are kilobytes; the
/// bound keeps a stray or hostile file from being read into memory whole.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

fn read_policy_file(path: &Path) -> Result<String, Diagnostic> {
    read_bounded(path, MAX_FILE_BYTES)
}

fn read_bounded(path: &Path, limit: u64) -> Result<String, Diagnostic> {
    let file = std::fs::File::open(path).map_err(|e| io_error(path, &e))?;
    let mut bytes = Vec::new();
    // One byte past the limit is enough to know it is exceeded.
    (&file)
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(path, &e))?;
    if bytes.len() as u64 > limit {
        let size = file
            .metadata()
            .map_or(0, |m| m.len())
            .max(bytes.len() as u64);
        return Err(Diagnostic {
            file: path.display().to_string(),
            pos: Pos::default(),
            message: format!(
                "the file is {size} bytes, over the limit of {limit} bytes ({} MiB) for a policy file; split it into smaller files",
                limit >> 20
            ),
        });
    }
    // Worded as `fs::read_to_string` words it, which this replaces.
    String::from_utf8(bytes).map_err(|_| {
        let e = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        );
        io_error(path, &e)
    })
}

fn is_policy_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml")) && path.is_file()
}

fn io_error(path: &Path, e: &std::io::Error) -> Diagnostic {
    Diagnostic {
        file: path.display().to_string(),
        pos: Pos::default(),
        message: format!("cannot read: {e}"),
    }
}

/// Parses, validates and compiles a set of files as one policy set.
pub fn compile_sources(files: &[SourceFile]) -> Result<CompiledPolicy, LoadErrors> {
    let mut diags = Vec::new();
    let mut parts = Vec::with_capacity(files.len());
    for file in files.iter().filter(|f| !is_catalog(f)) {
        match yaml::parse(&file.text) {
            Ok(Some(root)) => parts.push(parse::parse_file(&file.name, &root, &mut diags)),
            // An empty file is what a reader sees between a writer's
            // truncate and its write; taking it as "no rules" would drop
            // every rule for a moment. An intentionally empty file says
            // `rules: []`.
            Ok(None) => diags.push(Diagnostic {
                file: file.name.clone(),
                pos: Pos { line: 1, col: 1 },
                message: "the file holds no YAML document (being written?); write `rules: []` for an empty policy file"
                    .to_string(),
            }),
            Err(e) => diags.push(Diagnostic {
                file: file.name.clone(),
                pos: e.pos,
                message: format!("invalid YAML: {}", e.message),
            }),
        }
    }
    let (imported, skipped) = import_catalogs(files, &parts, &mut diags);
    let mut set = validate::merge(parts, imported, &mut diags);
    set.warnings.extend(skipped);
    if !diags.is_empty() {
        return Err(LoadErrors(diags));
    }
    Ok(CompiledPolicy::new(set, content_version(files)))
}

/// The prices of every imported catalog, first import first, and the
/// entries that could not be used.
type Imported = (Vec<(String, ModelPrice, Origin)>, Vec<(Origin, String)>);

fn import_catalogs(
    files: &[SourceFile],
    parts: &[parse::FilePolicy],
    diags: &mut Vec<Diagnostic>,
) -> Imported {
    let mut prices = Vec::new();
    let mut skipped = Vec::new();
    let mut done: Vec<String> = Vec::new();
    for (path, origin) in parts.iter().flat_map(|p| &p.imports) {
        let name = catalog_name(&origin.file, path);
        if done.contains(&name) {
            continue;
        }
        done.push(name.clone());
        let Some(file) = files.iter().find(|f| f.name == name) else {
            diags.push(Diagnostic {
                file: origin.file.clone(),
                pos: origin.pos,
                message: format!(
                    "cannot read the price catalog {path:?} (looked for {name}); catalogs are \
                     JSON files named relative to the policy file"
                ),
            });
            continue;
        };
        match catalog::read(&file.name, &file.text) {
            Ok(c) => {
                prices.extend(c.prices);
                skipped.extend(
                    c.skipped
                        .into_iter()
                        .map(|(o, why)| (o, format!("catalog entry not used: {why}"))),
                );
            }
            Err(d) => diags.push(d),
        }
    }
    (prices, skipped)
}

/// Reads and compiles the policy directories.
pub fn load_dirs(dirs: &[PathBuf]) -> Result<CompiledPolicy, LoadErrors> {
    compile_sources(&read_dirs(dirs)?)
}

/// A short hash of every file's name and content: the policy version. Two
/// reads of unchanged files give the same version, which is how a reload
/// knows there is nothing to do.
pub fn content_version(files: &[SourceFile]) -> String {
    let mut h = Sha256::new();
    for f in files {
        let base = Path::new(&f.name)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        h.update((base.len() as u64).to_le_bytes());
        h.update(base.as_bytes());
        h.update((f.text.len() as u64).to_le_bytes());
        h.update(f.text.as_bytes());
    }
    hex(&h.finalize()[..8])
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}
