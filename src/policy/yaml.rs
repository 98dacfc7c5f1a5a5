//! A YAML tree that remembers where every node came from.
//!
//! Policy errors must point at `file:line:column` for every problem, including
//! semantic ones found long after parsing (a duplicate rule id, an undefined
//! model family). Serde-based YAML loaders drop positions after parsing and
//! stop at the first error, so policies are read into this small tree first and
//! converted by hand in `parse.rs`. Scalars keep their source text, which is
//! also what lets amounts like `0.1` become exact decimals.

use std::collections::HashMap;
use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

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

/// Parses one YAML document. An empty document yields `None`.
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut builder = TreeBuilder::default();
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut builder, true).map_err(|e| SyntaxError {
        pos: Pos::from_marker(*e.marker()),
        message: e.info().to_string(),
    })?;
    if let Some(err) = builder.error {
        return Err(err);
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

#[derive(Default)]
struct TreeBuilder {
    stack: Vec<(Node, usize)>,
    /// Pending mapping keys, one per open mapping.
    keys: Vec<Option<Node>>,
    anchors: HashMap<usize, Node>,
    documents: Vec<Node>,
    document_starts: usize,
    second_document_at: Pos,
    error: Option<SyntaxError>,
}

impl TreeBuilder {
    fn push_value(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.documents.push(node),
            Some((parent, _)) => match &mut parent.value {
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
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from_marker(mark);
        match ev {
            Event::Scalar(text, style, anchor, _tag) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                let value =
                    if !quoted && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL") {
                        Value::Null
                    } else {
                        Value::Scalar { text, quoted }
                    };
                self.push_value(Node { value, pos }, anchor);
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push((
                    Node {
                        value: Value::Seq(Vec::new()),
                        pos,
                    },
                    anchor,
                ));
            }
            Event::MappingStart(anchor, _) => {
                self.stack.push((
                    Node {
                        value: Value::Map(Vec::new()),
                        pos,
                    },
                    anchor,
                ));
                self.keys.push(None);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((mut node, anchor)) = self.stack.pop() {
                    if let Value::Map(entries) = &node.value {
                        self.keys.pop();
                        // A block mapping's start event is marked after its
                        // first key; point at the key itself instead.
                        if let Some((first_key, _)) = entries.first() {
                            node.pos = node.pos.min(first_key.pos);
                        }
                    }
                    self.push_value(node, anchor);
                }
            }
            Event::Alias(id) => match self.anchors.get(&id) {
                Some(node) => {
                    let node = node.clone();
                    self.push_value(node, 0);
                }
                None => {
                    self.error.get_or_insert(SyntaxError {
                        pos,
                        message: "alias refers to an unknown anchor".to_string(),
                    });
                }
            },
            Event::DocumentStart => {
                self.document_starts += 1;
                if self.document_starts == 2 {
                    self.second_document_at = pos;
                }
            }
            _ => {}
        }
    }
}
