//! The policy loader against its security limits: no anchors or aliases,
//! at most `MAX_DEPTH` (64) levels, `MAX_NODES` (200,000) values and
//! `MAX_FILE_BYTES` (4 MiB) a file. The fuzz bytes choose a shape
//! (nesting of block or flow collections, long lists and mappings,
//! anchors and alias bombs, several documents, a file around the size
//! limit) and its size, right up to and past each limit.
//!
//! Checks: a file past a limit is refused with the error that names that
//! limit, also through `compile_sources`; a file within every limit is
//! never refused by one; nothing panics, overflows the stack or blows up
//! in time or memory (libFuzzer's `-timeout` and `-rss_limit_mb` watch
//! those).
#![no_main]

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use tollgate_core::policy::yaml::{self, MAX_DEPTH, MAX_NODES};
use tollgate_core::policy::{compile_sources, read_dirs, SourceFile, MAX_FILE_BYTES};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Within every limit: no limit's error.
    Within,
    Deep,
    Many,
    Anchor,
    /// Refused, for a reason of its own (several documents, an unknown alias).
    Refused(&'static str),
}

/// A nesting of `depth` flow collections, each a list or a mapping as
/// `pick` says, around one scalar.
fn flow(depth: usize, pick: &[u8]) -> String {
    let mut open = String::with_capacity(depth * 4);
    let mut close = String::with_capacity(depth);
    for i in 0..depth {
        let map = pick
            .get(i % pick.len().max(1))
            .is_some_and(|b| (b >> (i % 8)) & 1 == 1);
        if map {
            open.push_str("{k: ");
            close.push('}');
        } else {
            open.push('[');
            close.push(']');
        }
    }
    let close: String = close.chars().rev().collect();
    format!("{open}x{close}")
}

/// A nesting of `depth` block collections: mappings, or lists when `seq`.
fn block(depth: usize, seq: bool) -> String {
    let mut s = String::new();
    for i in 0..depth {
        let indent = "  ".repeat(i);
        if seq {
            s.push_str(&format!("{indent}-\n"));
        } else {
            s.push_str(&format!("{indent}k:\n"));
        }
    }
    s.push_str(&"  ".repeat(depth));
    s.push_str("x\n");
    s
}

/// The nodes and depth a policy prefix adds around a flow value:
/// `{rules: [{id: r, match: VALUE}]}`.
fn in_a_rule(value: &str) -> String {
    format!("rules:\n  - id: r\n    match: {value}\n")
}
const RULE_NODES: usize = 7;
const RULE_DEPTH: usize = 3;

fn expect_for(depth: usize, nodes: usize) -> Expect {
    if depth > MAX_DEPTH {
        Expect::Deep
    } else if nodes > MAX_NODES {
        Expect::Many
    } else {
        Expect::Within
    }
}

fn check(text: &str, expect: Expect) {
    let parsed = yaml::parse(text);
    let limit_error = |m: &str| {
        m.contains("nested more than 64 levels")
            || m.contains("more than 200000 values")
            || m.contains("anchors and aliases are not accepted")
    };
    let message = match &parsed {
        Ok(_) => None,
        Err(e) => Some(e.message.clone()),
    };
    match expect {
        Expect::Within => {
            if let Some(m) = &message {
                assert!(!limit_error(m), "refused within the limits: {m}");
            }
        }
        Expect::Deep => assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains("nested more than 64 levels deep")),
            "too deep, got {message:?}"
        ),
        Expect::Many => assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains("more than 200000 values in one file")),
            "too many values, got {message:?}"
        ),
        Expect::Anchor => assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains("anchors and aliases are not accepted")),
            "an anchor, got {message:?}"
        ),
        Expect::Refused(what) => assert!(message.is_some(), "{what} was accepted"),
    }
    if let Some(m) = message {
        let files = [SourceFile {
            name: "p.yaml".to_string(),
            text: text.to_string(),
        }];
        let errors = compile_sources(&files).expect_err("refused YAML compiled");
        let want = format!("invalid YAML: {m}");
        assert!(
            errors.0.iter().any(|d| d.message == want),
            "compile_sources lost the YAML error {want:?}: {errors}"
        );
    }
}

/// A directory holding one policy file, rewritten only when its size
/// changes: writing 4 MiB for every input would be most of the run.
fn sized_file(size: usize) -> PathBuf {
    static DIR: Mutex<Option<(PathBuf, usize)>> = Mutex::new(None);
    let mut dir = DIR.lock().unwrap();
    let (path, current) = dir.get_or_insert_with(|| {
        let p = std::env::temp_dir().join(format!("tollgate-fuzz-limits-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        (p, usize::MAX)
    });
    if *current != size {
        let line = "# a policy file at the size limit, all comment\n";
        let mut text = line.repeat(size / line.len() + 1);
        text.truncate(size);
        let mut f = std::fs::File::create(path.join("big.yaml")).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        *current = size;
    }
    path.clone()
}

fuzz_target!(|data: &[u8]| {
    let [kind, a, b, c, pick @ ..] = data else {
        return;
    };
    // Sizes cluster around the limits (a, b, c choose the offset) and
    // reach far past them.
    let around = |limit: usize| -> usize {
        let offset = usize::from(*a) | usize::from(*b) << 8;
        match c % 4 {
            0 => limit.saturating_sub(offset % 8) + (offset >> 3) % 8,
            1 => limit.saturating_sub(offset),
            2 => limit + offset,
            _ => offset,
        }
    };
    match kind % 10 {
        // Deep flow nesting, alone and inside a rule's `match`.
        0 | 1 => {
            let depth = around(MAX_DEPTH).min(1 << 18);
            let value = flow(depth, pick);
            let maps = (0..depth)
                .filter(|i| {
                    pick.get(i % pick.len().max(1))
                        .is_some_and(|b| (b >> (i % 8)) & 1 == 1)
                })
                .count();
            let nodes = depth + maps + 1;
            if kind % 10 == 0 {
                check(&value, expect_for(depth, nodes));
            } else {
                check(
                    &in_a_rule(&value),
                    expect_for(depth + RULE_DEPTH, nodes + RULE_NODES),
                );
            }
        }
        // Deep block nesting.
        2 => {
            // Indented by level, so the text grows with the square of the depth.
            let depth = around(MAX_DEPTH).min(300);
            let seq = c & 4 != 0;
            let nodes = depth + if seq { 0 } else { depth } + 1;
            check(&block(depth, seq), expect_for(depth, nodes));
        }
        // A long flow list: the list and its items.
        3 => {
            let n = around(MAX_NODES - 1).min(400_000);
            let items = vec!["0"; n].join(",");
            check(&format!("[{items}]"), expect_for(1, n + 1));
        }
        // A long block mapping: the mapping, and a key and a value each.
        4 => {
            let n = around((MAX_NODES - 1) / 2).min(200_000);
            let mut text = String::with_capacity(n * 10);
            for i in 0..n {
                text.push_str(&format!("k{i}: v\n"));
            }
            check(&text, expect_for(1, 1 + 2 * n));
        }
        // An anchor somewhere in a real-looking policy.
        5 => {
            let at = usize::from(*a) % 3;
            let name: String = pick
                .iter()
                .map(|b| (b'a' + b % 26) as char)
                .take(16)
                .collect();
            let name = if name.is_empty() {
                "a".to_string()
            } else {
                name
            };
            let mut parts = vec![
                "rules:".to_string(),
                "  - id: r".to_string(),
                "    match: { team: growth }".to_string(),
                "    limit: { requests: 10, window: daily }".to_string(),
            ];
            let line = 1 + at;
            parts[line] = parts[line].replacen(": ", &format!(": &{name} "), 1);
            if c & 1 == 1 {
                parts.push(format!("  - *{name}"));
            }
            check(&parts.join("\n"), Expect::Anchor);
        }
        // The billion laughs, as deep as the bytes say.
        6 => {
            let levels = 1 + usize::from(*a) % 12;
            let mut text = String::from("a0: &a0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
            for i in 1..=levels {
                let refs = vec![format!("*a{}", i - 1); 9].join(",");
                text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
            }
            check(&text, Expect::Anchor);
        }
        // An alias to an anchor that does not exist.
        7 => {
            let name: String = pick
                .iter()
                .map(|b| (b'a' + b % 26) as char)
                .take(8)
                .collect();
            check(
                &format!("rules: *{name}x\n"),
                Expect::Refused("an unknown alias"),
            );
        }
        // Several documents.
        8 => {
            let n = 2 + usize::from(*a) % 4;
            let text = vec!["---\nrules: []\n"; n].concat();
            check(&text, Expect::Refused("several documents"));
        }
        // A file around 4 MiB, read from a directory as the server reads it.
        _ => {
            let limit = MAX_FILE_BYTES as usize;
            let size = limit.saturating_sub(2) + usize::from(*a) % 5;
            let dir = sized_file(size);
            match read_dirs(&[dir]) {
                Ok(files) => {
                    assert!(size <= limit, "a file of {size} bytes was read");
                    assert_eq!(files[0].text.len(), size);
                }
                Err(e) => {
                    assert!(size > limit, "a file of {size} bytes was refused: {e}");
                    assert!(
                        e.to_string()
                            .contains("over the limit of 4194304 bytes (4 MiB)"),
                        "{e}"
                    );
                }
            }
        }
    }
});
