//! A YAML tree that remembers where every node came from.
//!
//! Policy errors must point at `file:line:column` for every problem, including
//! semantic ones found long after parsing (a duplicate rule id, an undefined
//! model family). Serde-based YAML loaders drop positions after parsing and
//! stop at the first error, so policies are read into this small tree first and
//! converted by hand in `parse.rs`. Scalars keep their source text, which is
//! also what lets amounts like `0.1` become exact decimals.

use std::fmt;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, Scanner, TScalarStyle, Token, TokenType};

/// A 1-based line and column in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl Pos {
    fn from_marker(m: Marker) -> Pos {
        // The scanner counts lines from 1 and columns from 0.
        Pos {
            line: m.line() as u32,
            col: m.col() as u32 + 1,
        }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

#[derive(Debug, Clone)]
pub enum Value {
    Null,
    /// `quoted` scalars are always strings; plain ones may be numbers or null.
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Null => "null",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// Why a document could not be parsed as YAML at all.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Deeper than any real policy or config file; the bound keeps a hostile
/// file from building a tree whose recursive drop or conversion overflows
/// the stack.
pub const MAX_DEPTH: usize = 64;

/// Far more scalars and collections than a real file holds, and few enough
/// that the tree of a file at the limit stays in the tens of megabytes.
pub const MAX_NODES: usize = 200_000;

fn too_deep() -> String {
    format!("nested more than {MAX_DEPTH} levels deep; flatten the structure")
}

const NO_ANCHORS: &str = "YAML anchors and aliases are not accepted; write the value out";

/// Parses one YAML document. An empty document yields `None`.
///
/// Anchors and aliases are refused: a few lines of nested aliases expand
/// to billions of nodes, and a policy gains nothing from them that
/// writing the value out does not give.
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut builder = TreeBuilder {
        text,
        ..TreeBuilder::default()
    };
    // Pulling events, rather than `Parser::load`, stops at the first
    // refused event; `load` also recurses once per nesting level, which a
    // deeply nested file turns into a stack overflow.
    let mut parser = Parser::new_from_str(text);
    loop {
        let (ev, mark) = parser.next_token().map_err(|e| SyntaxError {
            pos: Pos::from_marker(*e.marker()),
            // The scanner reads ahead along a line, and stops at 255 open
            // flow collections before the depth check sees the 65th.
            message: match e.info() {
                "recursion limit exceeded" => too_deep(),
                info => info.to_string(),
            },
        })?;
        if ev == Event::StreamEnd {
            break;
        }
        builder.on_event(ev, mark)?;
    }
    match builder.document_starts {
        0 | 1 => Ok(builder.documents.pop()),
        _ => Err(SyntaxError {
            pos: builder.second_document_at,
            message: "a policy file holds one YAML document; split the others into their own files"
                .to_string(),
        }),
    }
}

/// Where the first `&anchor` is. Events mark the anchored node rather than
/// the anchor (for a block mapping, its first key, possibly a line later);
/// the scanner's tokens mark the `&` itself, and since an alias can only
/// follow its anchor, the first anchor token is what the first refused
/// event came from.
fn first_anchor(text: &str) -> Option<Pos> {
    Scanner::new(text.chars()).find_map(|Token(mark, kind)| {
        matches!(kind, TokenType::Anchor(_)).then(|| Pos::from_marker(mark))
    })
}

#[derive(Default)]
struct TreeBuilder<'a> {
    text: &'a str,
    stack: Vec<Node>,
    /// Pending mapping keys, one per open mapping.
    keys: Vec<Option<Node>>,
    nodes: usize,
    documents: Vec<Node>,
    document_starts: usize,
    second_document_at: Pos,
}

impl TreeBuilder<'_> {
    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.documents.push(node),
            Some(parent) => match &mut parent.value {
                Value::Seq(items) => items.push(node),
                Value::Map(entries) => {
                    let slot = self
                        .keys
                        .last_mut()
                        .expect("an open mapping has a key slot");
                    match slot.take() {
                        None => *slot = Some(node),
                        Some(key) => entries.push((key, node)),
                    }
                }
                _ => unreachable!("only collections are pushed on the stack"),
            },
        }
    }

    /// Counts a new node and refuses anchors and excess size or depth,
    /// before anything is built from it.
    fn admit(&mut self, anchor: usize, opens: bool, pos: Pos) -> Result<(), SyntaxError> {
        let refuse = |message: String| Err(SyntaxError { pos, message });
        if anchor > 0 {
            return Err(SyntaxError {
                pos: first_anchor(self.text).unwrap_or(pos),
                message: NO_ANCHORS.to_string(),
            });
        }
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return refuse(format!(
                "more than {MAX_NODES} values in one file; split it into smaller files"
            ));
        }
        if opens && self.stack.len() >= MAX_DEPTH {
            return refuse(too_deep());
        }
        Ok(())
    }

    fn on_event(&mut self, ev: Event, mark: Marker) -> Result<(), SyntaxError> {
        let pos = Pos::from_marker(mark);
        match ev {
            Event::Scalar(text, style, anchor, _tag) => {
                self.admit(anchor, false, pos)?;
                let quoted = !matches!(style, TScalarStyle::Plain);
                let value =
                    if !quoted && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL") {
                        Value::Null
                    } else {
                        Value::Scalar { text, quoted }
                    };
                self.push_value(Node { value, pos });
            }
            Event::SequenceStart(anchor, _) => {
                self.admit(anchor, true, pos)?;
                self.stack.push(Node {
                    value: Value::Seq(Vec::new()),
                    pos,
                });
            }
            Event::MappingStart(anchor, _) => {
                self.admit(anchor, true, pos)?;
                self.stack.push(Node {
                    value: Value::Map(Vec::new()),
                    pos,
                });
                self.keys.push(None);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(mut node) = self.stack.pop() {
                    if let Value::Map(entries) = &node.value {
                        self.keys.pop();
                        // A block mapping's start event is marked after its
                        // first key; point at the key itself instead.
                        if let Some((first_key, _)) = entries.first() {
                            node.pos = node.pos.min(first_key.pos);
                        }
                    }
                    self.push_value(node);
                }
            }
            Event::Alias(_) => {
                return Err(SyntaxError {
                    pos,
                    message: NO_ANCHORS.to_string(),
                })
            }
            Event::DocumentStart => {
                self.document_starts += 1;
                if self.document_starts == 2 {
                    self.second_document_at = pos;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> SyntaxError {
        match parse(text) {
            Ok(_) => panic!("expected {text:?} to be refused"),
            Err(e) => e,
        }
    }

    #[test]
    fn anchors_are_refused_at_the_ampersand() {
        for (text, at) in [
            ("a: &s hello\n", Pos { line: 1, col: 4 }),
            ("a: 1\nb: &m\n  c: 1\n", Pos { line: 2, col: 4 }),
            ("a: [1, &q [2]]\n", Pos { line: 1, col: 8 }),
            ("- &e\n- 2\n", Pos { line: 1, col: 3 }),
        ] {
            let e = refused(text);
            assert_eq!((e.pos, e.message.as_str()), (at, NO_ANCHORS), "{text:?}");
        }
    }

    #[test]
    fn an_alias_is_refused_at_its_position() {
        // An alias always follows its anchor, so a used anchor is refused
        // at the anchor; an alias on its own names nothing.
        let e = refused("a: &x 1\nb: *x\n");
        assert_eq!(
            (e.pos, e.message.as_str()),
            (Pos { line: 1, col: 4 }, NO_ANCHORS)
        );
        let e = refused("a: 1\nb: *x\n");
        assert_eq!(e.pos, Pos { line: 2, col: 4 });
        assert!(e.message.contains("unknown anchor"), "{}", e.message);
    }

    #[test]
    fn an_alias_bomb_is_refused_before_any_expansion() {
        let mut text = format!("a: &a [{}]\n", ["\"x\""; 9].join(","));
        for (prev, cur) in "abcdefgh".chars().zip("bcdefghi".chars()) {
            text += &format!(
                "{cur}: &{cur} [{}]\n",
                vec![format!("*{prev}"); 9].join(",")
            );
        }
        let e = refused(&text);
        assert_eq!(
            (e.pos, e.message.as_str()),
            (Pos { line: 1, col: 4 }, NO_ANCHORS)
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let deepest = format!("{}x\n", "- ".repeat(MAX_DEPTH));
        assert!(parse(&deepest).is_ok());
        let e = refused(&format!("{}x\n", "- ".repeat(MAX_DEPTH + 1)));
        let col = 1 + 2 * MAX_DEPTH as u32;
        assert_eq!(e.pos, Pos { line: 1, col });
        assert!(e.message.contains("more than 64 levels"), "{}", e.message);
        // Far deeper than the parser's own recursion could survive.
        let e = refused(&format!("{}x\n", "- ".repeat(100_000)));
        assert_eq!(e.pos, Pos { line: 1, col });
        let e = refused(&format!("{}1{}", "{a: ".repeat(65), "}".repeat(65)));
        assert_eq!(
            e.pos,
            Pos {
                line: 1,
                col: 1 + 4 * 64
            }
        );
    }

    #[test]
    fn the_number_of_values_is_bounded() {
        // The sequence itself is one value, each item another.
        assert!(parse(&"- 1\n".repeat(MAX_NODES - 1)).is_ok());
        let e = refused(&"- 1\n".repeat(MAX_NODES));
        assert_eq!(
            e.pos,
            Pos {
                line: MAX_NODES as u32,
                col: 3
            }
        );
        assert!(
            e.message.contains("more than 200000 values"),
            "{}",
            e.message
        );
    }

    #[test]
    fn ordinary_files_parse_as_before() {
        let text = "\
rules:
  - id: \"a\"
    note: ~
    limit: { spend: 0.10, window: daily }
    tags: [x, 'y']
";
        let root = parse(text).unwrap().unwrap();
        let Value::Map(top) = &root.value else {
            panic!("{root:?}")
        };
        assert_eq!(root.pos, Pos { line: 1, col: 1 });
        let Value::Seq(rules) = &top[0].1.value else {
            panic!("{root:?}")
        };
        let Value::Map(rule) = &rules[0].value else {
            panic!("{root:?}")
        };
        assert_eq!(rules[0].pos, Pos { line: 2, col: 5 });
        assert!(matches!(&rule[0].1.value, Value::Scalar { text, quoted: true } if text == "a"));
        assert!(matches!(rule[1].1.value, Value::Null));
        let Value::Map(limit) = &rule[2].1.value else {
            panic!("{root:?}")
        };
        assert!(
            matches!(&limit[0].1.value, Value::Scalar { text, quoted: false } if text == "0.10")
        );
        assert_eq!(limit[1].1.pos, Pos { line: 4, col: 35 });
        let Value::Seq(tags) = &rule[3].1.value else {
            panic!("{root:?}")
        };
        assert_eq!(tags.len(), 2);

        assert!(parse("").unwrap().is_none());
        assert!(parse("# only a comment\n").unwrap().is_none());
        let e = refused("a: 1\n---\nb: 2\n");
        assert_eq!(e.pos, Pos { line: 2, col: 1 });
        let e = refused("a: [1\n");
        assert!(!e.message.is_empty());
    }
}
