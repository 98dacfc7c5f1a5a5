//! Match values: exact strings or globs where `*` stands for any run of
//! characters.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    is_glob: bool,
}

impl Pattern {
    pub fn new(text: &str) -> Pattern {
        Pattern {
            text: text.to_string(),
            is_glob: text.contains('*'),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The exact value this pattern stands for, when it has no wildcard.
    pub fn exact(&self) -> Option<&str> {
        (!self.is_glob).then_some(self.text.as_str())
    }

    pub fn matches(&self, value: &str) -> bool {
        if self.is_glob {
            glob_match(&self.text, value)
        } else {
            self.text == value
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Linear-time wildcard match with single-star backtracking.
fn glob_match(pattern: &str, value: &str) -> bool {
    let p = pattern.as_bytes();
    let v = value.as_bytes();
    let (mut pi, mut vi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, vi));
            pi += 1;
        } else if pi < p.len() && p[pi] == v[vi] {
            pi += 1;
            vi += 1;
        } else if let Some((sp, sv)) = star {
            pi = sp + 1;
            vi = sv + 1;
            star = Some((sp, sv + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_and_exact_values() {
        let cases = [
            ("gpt-5*", "gpt-5", true),
            ("gpt-5*", "gpt-5-mini", true),
            ("gpt-5*", "gpt-4o", false),
            ("claude-opus-*", "claude-opus-4", true),
            ("claude-opus-*", "claude-opus", false),
            ("*-mini", "gpt-4o-mini", true),
            ("*-mini", "gpt-4o", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("*", "", true),
            ("o3*", "o3", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ];
        for (pattern, value, expected) in cases {
            assert_eq!(
                Pattern::new(pattern).matches(value),
                expected,
                "{pattern} vs {value}"
            );
        }
    }
}
