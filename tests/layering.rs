//! The modules are layered, and data flows one way: request → attributes
//! → decision → counter ops → response. Each module may use only the
//! modules this table lists for it, so a module never imports one above
//! it, and no import cycle can come back. The core crate (`core/src`) is
//! the bottom of the table; the server crate (`src`) builds on it. The
//! table is the rule; change it only with docs/ARCHITECTURE.md.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each module and the modules it may use, lowest layer first.
const ALLOWED: &[(&str, &[&str])] = &[
    // The core crate: the leaves, then counters, decisions, and the gate
    // that joins them.
    ("clock", &[]),
    ("policy", &[]),
    ("store", &["clock", "policy"]),
    ("engine", &["clock", "policy", "store"]),
    ("gate", &["clock", "engine", "policy", "store"]),
    // The server crate's leaves.
    ("status", &[]),
    ("shutdown", &[]),
    ("http_client", &[]),
    ("proto", &[]),
    // What observes the gate, and what drives it.
    (
        "telemetry",
        &["clock", "engine", "gate", "policy", "status", "store"],
    ),
    (
        "alerts",
        &[
            "clock",
            "engine",
            "gate",
            "http_client",
            "policy",
            "store",
            "telemetry",
        ],
    ),
    ("reload", &["clock", "engine", "gate", "policy", "status"]),
    ("config", &["policy"]),
    ("usage", &["clock", "engine", "http_client"]),
    ("spend", &["engine", "store"]),
    ("explain", &["clock", "engine", "gate", "policy", "store"]),
    ("admin_client", &["http_client"]),
    // The wire protocols.
    (
        "server",
        &[
            "clock",
            "engine",
            "gate",
            "policy",
            "proto",
            "reload",
            "status",
            "store",
            "spend",
            "telemetry",
            "usage",
        ],
    ),
];

/// The binary (`main.rs` and `cli/`) sits on top and may use anything.
const TOP: &str = "cli";

/// The modules of the core crate; everything else is the server's.
const CORE: &[&str] = &["clock", "policy", "store", "engine", "gate"];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file belongs to: `src/gate/scopes.rs` is `gate`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    let name = first.trim_end_matches(".rs").to_string();
    match name.as_str() {
        "main" => TOP.to_string(),
        _ => name,
    }
}

/// The code without comments and string literals, so that a path written
/// in a doc comment or a log target is not taken for an import.
fn code_only(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < bytes.len() && !(bytes[i] == b'*' && bytes[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            // A char literal such as '"' must not open a string.
            b'\'' if bytes.get(i + 2) == Some(&b'\'') => {
                i += 3;
            }
            b'\'' if bytes.get(i + 1) == Some(&b'\\') && bytes.get(i + 3) == Some(&b'\'') => {
                i += 4;
            }
            b => {
                out.push(b as char);
                i += 1;
            }
        }
    }
    out
}

/// The modules a file's code names: `crate::x` and `tollgate_core::x`,
/// and in the binary also `tollgate::x`.
fn uses(code: &str, binary: bool) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let roots: &[&str] = if binary {
        &["crate::", "tollgate_core::", "tollgate::"]
    } else {
        &["crate::", "tollgate_core::"]
    };
    for root in roots {
        let mut rest = code;
        while let Some(at) = rest.find(root) {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + root.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

#[test]
fn no_module_imports_one_above_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for crate_src in [root.join("core/src"), root.join("src")] {
        let mut found = Vec::new();
        sources(&crate_src, &mut found);
        files.extend(found.into_iter().map(|f| (crate_src.clone(), f)));
    }
    files.sort();
    for (src, file) in &files {
        let module = module_of(src, file);
        if module == "lib" {
            continue;
        }
        let in_core = src.ends_with("core/src");
        if in_core != CORE.contains(&module.as_str()) {
            problems.push(format!(
                "{}: `{module}` is in the wrong crate",
                file.display()
            ));
        }
        let binary = module == TOP;
        let code = code_only(&std::fs::read_to_string(file).unwrap());
        for used in uses(&code, binary) {
            if used == module || binary {
                continue;
            }
            match allowed.get(module.as_str()) {
                None => problems.push(format!(
                    "{}: module `{module}` is not in the layering table",
                    file.display()
                )),
                Some(deps) if !deps.contains(&used.as_str()) => problems.push(format!(
                    "{}: `{module}` uses `{used}`, which it may not",
                    file.display()
                )),
                Some(_) => {}
            }
        }
    }
    // Every table entry is a module that exists, so the table stays true.
    for (module, _) in ALLOWED {
        let src = if CORE.contains(module) {
            root.join("core/src")
        } else {
            root.join("src")
        };
        let exists = src.join(format!("{module}.rs")).exists() || src.join(module).is_dir();
        if !exists {
            problems.push(format!("the table names `{module}`, which is not in src/"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_scanner_sees_imports_and_skips_comments_and_strings() {
    let code = code_only(
        "use crate::gate::Gate; // crate::server\n/* crate::cli */ let t = \"crate::reload\"; let q = '\"'; crate::store::x();",
    );
    let found = uses(&code, false);
    assert_eq!(
        found,
        ["gate", "store"].iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(
        uses("use tollgate::server; my_crate::x", true),
        ["server"].iter().map(|s| s.to_string()).collect()
    );
}

#[test]
fn the_table_has_no_cycle() {
    // Each module's dependencies come before it in the table: then no
    // cycle is possible.
    let mut seen: Vec<&str> = Vec::new();
    for (module, deps) in ALLOWED {
        for dep in *deps {
            assert!(
                seen.contains(dep),
                "`{module}` may use `{dep}`, which is not below it in the table"
            );
        }
        seen.push(module);
    }
}
