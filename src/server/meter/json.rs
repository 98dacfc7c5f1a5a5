//! A streaming scanner that reads a few members of a JSON value of any
//! size, fed in pieces split anywhere, without holding the value.
//!
//! A schema of [`Node`]s names the members worth reading: usage records
//! and their counts, the model, an event's `type`, generated text (whose
//! characters are counted, never kept) and image entries (counted). Every
//! other value is skipped by counting brackets outside strings: an array
//! of a million floats or a base64 string of many megabytes costs time,
//! never memory. The scanner holds at most [`KEY_MAX`] bytes of a key and
//! [`SHORT_MAX`] bytes of a wanted string, in fixed arrays: it never
//! allocates.
//!
//! The first byte that breaks JSON's grammar stops the scan of that
//! value, keeping what was read before it. Only a usage record that
//! closes is kept (so a cut record never passes for a whole one), a number
//! only once a byte after it has arrived (so a cut `1024` is not `10`), a
//! string only once its closing quote has.

/// Where a count from a usage record goes. What each means per API is
/// decided when the meter reports (see `super::report`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Input,
    Cached,
    CacheWrite,
    Output,
    Reasoning,
    ToolPrompt,
    Total,
}

pub(crate) const SLOTS: usize = 7;

/// A member of an object the schema reads: its key, and how its value is
/// read.
pub(crate) type Member = (&'static str, Node);

/// How a value is read.
#[derive(Debug)]
pub(crate) enum Node {
    /// An object: the listed members are read, all others skipped.
    Object(&'static [Member]),
    /// A usage record: an object whose counts are kept once it closes.
    /// `last`: the API sends it once the output is complete, so its
    /// output count is final.
    Usage {
        members: &'static [Member],
        last: bool,
    },
    /// An array whose every element is read as the node.
    Array(&'static Node),
    /// A non-negative integer, inside a usage record. Anything else (a
    /// fraction, an exponent, a sign, past `u64::MAX`) is ignored.
    Count(Slot),
    /// The model's name.
    Model,
    /// The value's `type`, which names an SSE event.
    Kind,
    /// Generated text: a string whose characters are counted.
    Text,
    /// Each value here is one image.
    Image,
    /// A value other than `null` here says the output is complete.
    End,
}

/// Bytes kept of a key; no wanted key is longer.
pub(crate) const KEY_MAX: usize = 32;
/// Bytes kept of a model name or a `type`, escapes included; a longer
/// one is ignored.
pub(crate) const SHORT_MAX: usize = 128;
/// Containers the schema can nest; the schemas use at most seven.
const MAX_DEPTH: usize = 8;

/// A string of at most `N` bytes, inline.
#[derive(Clone)]
pub(crate) struct Short<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Short<N> {
    pub(crate) const fn new() -> Self {
        Short {
            buf: [0; N],
            len: 0,
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }

    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends `bytes`, or returns false (and keeps what it had) when they
    /// do not fit.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> bool {
        let end = self.len + bytes.len();
        match self.buf.get_mut(self.len..end) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.len = end;
                true
            }
            None => false,
        }
    }

    pub(crate) fn set(&mut self, bytes: &[u8]) -> bool {
        self.clear();
        self.push(bytes)
    }
}

impl<const N: usize> Default for Short<N> {
    fn default() -> Self {
        Short::new()
    }
}

impl<const N: usize> std::fmt::Debug for Short<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// What the scanner has read. The counts, model, images and `finished`
/// accumulate over every value the scanner is reset between (the events
/// of a stream); `kind` and `text_chars` belong to the current value.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    /// The latest value of each count, from usage records that closed.
    pub counts: [Option<u64>; SLOTS],
    /// A usage record with at least one count closed.
    pub usage: bool,
    /// A `last` usage record closed, or an [`Node::End`] mark was read.
    pub finished: bool,
    /// The latest complete model name, raw (escapes undecoded).
    pub model: Short<SHORT_MAX>,
    /// Image entries read.
    pub images: u64,
    /// The current value's `type`, raw.
    pub kind: Short<SHORT_MAX>,
    /// Characters of generated text in the current value.
    pub text_chars: u64,
}

#[derive(Debug, Clone, Copy)]
enum Frame {
    Object(&'static [Member]),
    Usage(&'static [Member], bool),
    Array(&'static Node),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the value.
    Start,
    /// After `{`: a key or `}`.
    KeyOrClose,
    /// After `,` in an object: a key.
    KeyNext,
    /// Inside a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// A value for `target`.
    Value,
    /// After `[`: an element or `]`.
    ElementOrClose,
    /// After a value: `,` or a closing bracket.
    AfterValue,
    /// Inside a wanted number.
    Number,
    /// Inside an unwanted scalar.
    Literal,
    /// Inside an unwanted string.
    Skip,
    /// Inside an unwanted object or array, `depth` deep.
    Nested,
    /// Inside a model name or `type`.
    Capture,
    /// Inside generated text.
    Text,
    /// The value ended; what follows is ignored.
    Done,
    /// The grammar broke; what follows is ignored.
    Broken,
}

/// The scanner. [`Scanner::reset`] readies it for the next value (the
/// next SSE event) and keeps what [`Found`] accumulates.
#[derive(Debug, Clone)]
pub(crate) struct Scanner {
    root: &'static Node,
    /// A top-level array's elements are each read as `root` (Gemini's
    /// `streamGenerateContent` without `alt=sse`).
    elements: bool,
    mode: Mode,
    frames: [Frame; MAX_DEPTH],
    depth: usize,
    target: Option<&'static Node>,
    key: Short<KEY_MAX>,
    key_ok: bool,
    /// After a backslash inside a string.
    escape: bool,
    /// Hex digits of a `\u` escape still to pass in generated text.
    hex: u8,
    /// Brackets open inside an unwanted container.
    nested: u64,
    in_nested_string: bool,
    number: u64,
    number_ok: bool,
    number_slot: Slot,
    capture: Short<SHORT_MAX>,
    capture_ok: bool,
    capture_kind: bool,
    staged: [Option<u64>; SLOTS],
    pub(crate) found: Found,
}

const EMPTY: &[Member] = &[];

fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

/// The first byte of `h` equal to `a` or `b`, eight bytes at a time.
pub(crate) fn find2(h: &[u8], a: u8, b: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let (va, vb) = (LO * u64::from(a), LO * u64::from(b));
    let mut chunks = h.chunks_exact(8);
    let mut at = 0;
    for chunk in chunks.by_ref() {
        if let Ok(bytes) = <[u8; 8]>::try_from(chunk) {
            let w = u64::from_le_bytes(bytes);
            let (xa, xb) = (w ^ va, w ^ vb);
            // A zero byte of xa or xb is a match; the lowest flagged byte
            // is always a true one.
            let z = (xa.wrapping_sub(LO) & !xa | xb.wrapping_sub(LO) & !xb) & HI;
            if z != 0 {
                return Some(at + (z.trailing_zeros() / 8) as usize);
            }
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&c| c == a || c == b)
        .map(|p| at + p)
}

/// Passes the inside of a string from `b[*i..]`, handing `run` each
/// stretch of its bytes: `(bytes, false)` for plain ones, `(bytes, true)`
/// for those starting with the byte after a backslash. `escape` carries a
/// backslash that ended the previous piece. Returns true once the closing
/// quote is passed.
fn string(escape: &mut bool, b: &[u8], i: &mut usize, mut run: impl FnMut(&[u8], bool)) -> bool {
    loop {
        let rest = b.get(*i..).unwrap_or_default();
        if rest.is_empty() {
            return false;
        }
        let escaped = std::mem::take(escape);
        // The byte after a backslash is never a closing quote.
        let from = usize::from(escaped);
        match find2(rest.get(from..).unwrap_or_default(), b'"', b'\\') {
            None => {
                run(rest, escaped);
                *i = b.len();
                return false;
            }
            Some(p) => {
                let end = from + p;
                run(rest.get(..end).unwrap_or_default(), escaped);
                *i += end + 1;
                if rest.get(end) == Some(&b'"') {
                    return true;
                }
                *escape = true;
            }
        }
    }
}

/// Characters in UTF-8 bytes: the bytes that start one. Invalid UTF-8 is
/// counted the same way, never rejected.
fn chars(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&c| c & 0xC0 != 0x80).count() as u64
}

impl Scanner {
    /// `root` must be an [`Node::Object`].
    pub(crate) fn new(root: &'static Node, elements: bool) -> Scanner {
        Scanner {
            root,
            elements,
            mode: Mode::Start,
            frames: [Frame::Object(EMPTY); MAX_DEPTH],
            depth: 0,
            target: None,
            key: Short::new(),
            key_ok: false,
            escape: false,
            hex: 0,
            nested: 0,
            in_nested_string: false,
            number: 0,
            number_ok: false,
            number_slot: Slot::Total,
            capture: Short::new(),
            capture_ok: false,
            capture_kind: false,
            staged: [None; SLOTS],
            found: Found {
                counts: [None; SLOTS],
                usage: false,
                finished: false,
                model: Short::new(),
                images: 0,
                kind: Short::new(),
                text_chars: 0,
            },
        }
    }

    /// Readies the scanner for the next value: what was read of the
    /// current one that is not kept is dropped (an open usage record, a
    /// cut string), and so are its `kind` and `text_chars`.
    pub(crate) fn reset(&mut self) {
        self.mode = Mode::Start;
        self.depth = 0;
        self.target = None;
        self.escape = false;
        self.hex = 0;
        self.found.kind.clear();
        self.found.text_chars = 0;
    }

    /// Whether the value ended well.
    pub(crate) fn done(&self) -> bool {
        self.mode == Mode::Done
    }

    /// Bytes held of a value in progress (a key, a wanted string).
    pub(crate) fn held(&self) -> usize {
        self.key.as_bytes().len() + self.capture.as_bytes().len()
    }

    pub(crate) fn feed(&mut self, b: &[u8]) {
        let mut i = 0;
        while let Some(&c) = b.get(i) {
            match self.mode {
                Mode::Done | Mode::Broken => return,
                Mode::Start => {
                    i += 1;
                    match c {
                        // Whitespace, and a byte-order mark.
                        b' ' | b'\t' | b'\n' | b'\r' | 0xEF | 0xBB | 0xBF => {}
                        b'{' => {
                            if !self.open(self.root, c) {
                                self.mode = Mode::Broken;
                            }
                        }
                        b'[' if self.elements => {
                            self.push(Frame::Array(self.root));
                            self.mode = Mode::ElementOrClose;
                        }
                        _ => self.mode = Mode::Broken,
                    }
                }
                Mode::KeyOrClose | Mode::KeyNext => {
                    i += 1;
                    match c {
                        _ if is_ws(c) => {}
                        b'"' => {
                            self.key.clear();
                            self.key_ok = true;
                            self.escape = false;
                            self.mode = Mode::Key;
                        }
                        b'}' if self.mode == Mode::KeyOrClose => self.close(c),
                        _ => self.mode = Mode::Broken,
                    }
                }
                Mode::Key => {
                    let rest = b.get(i..).unwrap_or_default();
                    if self.escape {
                        // A key with an escape is never a wanted one.
                        self.escape = false;
                        self.key_ok = false;
                        i += 1;
                        continue;
                    }
                    match find2(rest, b'"', b'\\') {
                        None => {
                            self.key_ok &= self.key.push(rest);
                            i = b.len();
                        }
                        Some(p) => {
                            self.key_ok &= self.key.push(rest.get(..p).unwrap_or_default());
                            i += p + 1;
                            if rest.get(p) == Some(&b'"') {
                                self.target = self.member();
                                self.key.clear();
                                self.mode = Mode::Colon;
                            } else {
                                self.escape = true;
                            }
                        }
                    }
                }
                Mode::Colon => {
                    i += 1;
                    match c {
                        _ if is_ws(c) => {}
                        b':' => self.mode = Mode::Value,
                        _ => self.mode = Mode::Broken,
                    }
                }
                Mode::ElementOrClose => {
                    if is_ws(c) {
                        i += 1;
                    } else if c == b']' {
                        i += 1;
                        self.close(c);
                    } else {
                        self.target = match self.top() {
                            Some(Frame::Array(element)) => Some(element),
                            _ => None,
                        };
                        self.mode = Mode::Value;
                    }
                }
                Mode::Value => {
                    if is_ws(c) {
                        i += 1;
                        continue;
                    }
                    i += self.value(c);
                }
                Mode::AfterValue => {
                    i += 1;
                    match c {
                        _ if is_ws(c) => {}
                        b',' => match self.top() {
                            Some(Frame::Array(element)) => {
                                self.target = Some(element);
                                self.mode = Mode::Value;
                            }
                            Some(_) => self.mode = Mode::KeyNext,
                            None => self.mode = Mode::Broken,
                        },
                        b'}' | b']' => self.close(c),
                        _ => self.mode = Mode::Broken,
                    }
                }
                Mode::Number => {
                    if c.is_ascii_digit() {
                        match self
                            .number
                            .checked_mul(10)
                            .and_then(|n| n.checked_add(u64::from(c - b'0')))
                        {
                            Some(n) => self.number = n,
                            None => self.number_ok = false,
                        }
                        i += 1;
                    } else if matches!(c, b'.' | b'e' | b'E' | b'+' | b'-') {
                        self.number_ok = false;
                        i += 1;
                    } else {
                        if self.number_ok {
                            self.staged[self.number_slot as usize] = Some(self.number);
                        }
                        self.mode = Mode::AfterValue;
                    }
                }
                Mode::Literal => {
                    let rest = b.get(i..).unwrap_or_default();
                    match rest.iter().position(|&c| {
                        is_ws(c) || matches!(c, b',' | b'}' | b']' | b':' | b'"' | b'{' | b'[')
                    }) {
                        None => i = b.len(),
                        Some(p) => {
                            i += p;
                            self.mode = Mode::AfterValue;
                        }
                    }
                }
                Mode::Skip => {
                    if string(&mut self.escape, b, &mut i, |_, _| {}) {
                        self.mode = Mode::AfterValue;
                    }
                }
                Mode::Capture => {
                    let (capture, ok) = (&mut self.capture, &mut self.capture_ok);
                    let closed = string(&mut self.escape, b, &mut i, |run, escaped| {
                        if escaped {
                            *ok &= capture.push(b"\\");
                        }
                        *ok &= capture.push(run);
                    });
                    if closed {
                        if self.capture_ok {
                            let into = if self.capture_kind {
                                &mut self.found.kind
                            } else {
                                &mut self.found.model
                            };
                            into.set(self.capture.as_bytes());
                        }
                        self.capture.clear();
                        self.mode = Mode::AfterValue;
                    }
                }
                Mode::Text => {
                    let mut counted = 0u64;
                    let mut hex = self.hex;
                    let closed = string(&mut self.escape, b, &mut i, |run, escaped| {
                        let mut run = run;
                        if escaped {
                            // An escape is one character; a `\u` one's
                            // four hex digits are not more.
                            counted += 1;
                            if run.first() == Some(&b'u') {
                                hex = 4;
                            }
                            run = run.get(1..).unwrap_or_default();
                        }
                        let pass = run.len().min(usize::from(hex));
                        hex -= pass as u8;
                        counted += chars(run.get(pass..).unwrap_or_default());
                    });
                    self.hex = hex;
                    self.found.text_chars = self.found.text_chars.saturating_add(counted);
                    if closed {
                        self.hex = 0;
                        self.mode = Mode::AfterValue;
                    }
                }
                Mode::Nested => {
                    if self.in_nested_string {
                        if string(&mut self.escape, b, &mut i, |_, _| {}) {
                            self.in_nested_string = false;
                        }
                        continue;
                    }
                    let rest = b.get(i..).unwrap_or_default();
                    match rest
                        .iter()
                        .position(|&c| matches!(c, b'"' | b'{' | b'[' | b'}' | b']'))
                    {
                        None => i = b.len(),
                        Some(p) => {
                            i += p + 1;
                            match rest.get(p) {
                                Some(b'"') => {
                                    self.in_nested_string = true;
                                    self.escape = false;
                                }
                                Some(b'{' | b'[') => self.nested = self.nested.saturating_add(1),
                                _ => {
                                    self.nested = self.nested.saturating_sub(1);
                                    if self.nested == 0 {
                                        self.mode = Mode::AfterValue;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Starts reading the value whose first byte is `c` as `target`;
    /// returns how many bytes it consumed (0 or 1).
    fn value(&mut self, c: u8) -> usize {
        let target = self.target.take();
        match target {
            Some(node) if self.open(node, c) => return 1,
            Some(Node::Count(slot)) if c.is_ascii_digit() => {
                self.number = 0;
                self.number_ok = true;
                self.number_slot = *slot;
                self.mode = Mode::Number;
                return 0;
            }
            Some(node @ (Node::Model | Node::Kind)) if c == b'"' => {
                self.capture.clear();
                self.capture_ok = true;
                self.capture_kind = matches!(node, Node::Kind);
                self.escape = false;
                self.mode = Mode::Capture;
                return 1;
            }
            Some(Node::Text) if c == b'"' => {
                self.escape = false;
                self.hex = 0;
                self.mode = Mode::Text;
                return 1;
            }
            Some(Node::Image) => self.found.images = self.found.images.saturating_add(1),
            Some(Node::End) if c != b'n' => self.found.finished = true,
            _ => {}
        }
        // Not wanted, or not of the wanted shape: skipped.
        match c {
            b'"' => {
                self.escape = false;
                self.mode = Mode::Skip;
                1
            }
            b'{' | b'[' => {
                self.nested = 1;
                self.in_nested_string = false;
                self.mode = Mode::Nested;
                1
            }
            b',' | b':' | b'}' | b']' => {
                self.mode = Mode::Broken;
                1
            }
            _ => {
                self.mode = Mode::Literal;
                0
            }
        }
    }

    /// Opens the container `node` reads, if `c` starts one of its shape.
    fn open(&mut self, node: &'static Node, c: u8) -> bool {
        if self.depth == MAX_DEPTH {
            return false;
        }
        let frame = match (node, c) {
            (Node::Object(members), b'{') => Frame::Object(members),
            (Node::Usage { members, last }, b'{') => {
                self.staged = [None; SLOTS];
                Frame::Usage(members, *last)
            }
            (Node::Array(element), b'[') => Frame::Array(element),
            _ => return false,
        };
        self.push(frame);
        self.mode = if c == b'{' {
            Mode::KeyOrClose
        } else {
            Mode::ElementOrClose
        };
        true
    }

    fn push(&mut self, frame: Frame) {
        if let Some(slot) = self.frames.get_mut(self.depth) {
            *slot = frame;
            self.depth += 1;
        }
    }

    fn top(&self) -> Option<Frame> {
        self.frames.get(self.depth.checked_sub(1)?).copied()
    }

    fn close(&mut self, c: u8) {
        let ok = match (self.top(), c) {
            (Some(Frame::Object(_)), b'}') | (Some(Frame::Array(_)), b']') => true,
            (Some(Frame::Usage(_, last)), b'}') => {
                self.commit(last);
                true
            }
            _ => false,
        };
        if !ok {
            self.mode = Mode::Broken;
            return;
        }
        self.depth -= 1;
        self.mode = if self.depth == 0 {
            Mode::Done
        } else {
            Mode::AfterValue
        };
    }

    /// Keeps the counts of a usage record that closed.
    fn commit(&mut self, last: bool) {
        let mut any = false;
        for (kept, staged) in self.found.counts.iter_mut().zip(self.staged) {
            if staged.is_some() {
                *kept = staged;
                any = true;
            }
        }
        if any {
            self.found.usage = true;
            self.found.finished |= last;
        }
    }

    /// The node the key just read names in the current object.
    fn member(&self) -> Option<&'static Node> {
        let members = match self.top()? {
            Frame::Object(members) | Frame::Usage(members, _) => members,
            Frame::Array(_) => return None,
        };
        if !self.key_ok {
            return None;
        }
        let key = self.key.as_bytes();
        members
            .iter()
            .find(|(name, _)| name.as_bytes() == key)
            .map(|(_, node)| node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static SCHEMA: Node = Node::Object(&[
        ("model", Node::Model),
        ("type", Node::Kind),
        (
            "usage",
            Node::Usage {
                members: &[
                    ("in", Node::Count(Slot::Input)),
                    ("out", Node::Count(Slot::Output)),
                    (
                        "details",
                        Node::Object(&[("cached", Node::Count(Slot::Cached))]),
                    ),
                ],
                last: true,
            },
        ),
        ("text", Node::Text),
        ("items", Node::Array(&Node::Image)),
        ("parts", Node::Array(&Node::Object(&[("text", Node::Text)]))),
        ("end", Node::End),
    ]);

    fn scan(json: &[u8]) -> Scanner {
        let mut whole = Scanner::new(&SCHEMA, true);
        whole.feed(json);
        for at in 0..=json.len() {
            let mut split = Scanner::new(&SCHEMA, true);
            split.feed(&json[..at]);
            split.feed(&json[at..]);
            assert_eq!(
                format!("{:?}", split.found),
                format!("{:?}", whole.found),
                "split at {at}"
            );
            assert_eq!(split.mode, whole.mode, "split at {at}");
        }
        whole
    }

    fn count(s: &Scanner, slot: Slot) -> Option<u64> {
        s.found.counts[slot as usize]
    }

    #[test]
    fn find2_finds_the_first_of_either_byte_at_every_offset() {
        for len in 0..40 {
            for at in 0..len {
                for which in [b'"', b'\\'] {
                    let mut h = vec![b'a'; len];
                    h[at] = which;
                    if at + 1 < len {
                        h[len - 1] = b'"';
                    }
                    assert_eq!(find2(&h, b'"', b'\\'), Some(at), "len {len} at {at}");
                }
            }
            assert_eq!(find2(&vec![b'a'; len], b'"', b'\\'), None);
        }
        // Bytes that differ from the needle by the high bit or by a borrow.
        let h = [0x22 ^ 0x80, 0x21, 0x23, 0x5B, 0x01, 0x00, 0xFF, 0x5C];
        assert_eq!(find2(&h, b'"', b'\\'), Some(7));
    }

    #[test]
    fn reads_wanted_members_and_skips_the_rest() {
        let s = scan(
            br#"{"id":"x\"}{[","floats":[0.1,-2e-3,[1,{"usage":{"in":9}}]],"model":"gpt-4o","usage":{"in":12,"skip":{"in":99},"details":{"cached":3},"out":7},"type":"t","n":null,"b":true}"#,
        );
        assert!(s.done());
        assert_eq!(count(&s, Slot::Input), Some(12));
        assert_eq!(count(&s, Slot::Output), Some(7));
        assert_eq!(count(&s, Slot::Cached), Some(3));
        assert!(s.found.usage && s.found.finished);
        assert_eq!(s.found.model.as_bytes(), b"gpt-4o");
        assert_eq!(s.found.kind.as_bytes(), b"t");
    }

    #[test]
    fn counts_text_characters_through_escapes_and_multibyte_utf8() {
        // "a\"b\\c\u00e9 ü😀\n" is 10 characters.
        let s = scan(
            r#"{"text":"a\"b\\c\u00e9 ü😀\n","parts":[{"text":"xyz"},{"text":null}]}"#.as_bytes(),
        );
        assert_eq!(s.found.text_chars, 13);
        let s = scan(br#"{"text":"\ud83d\ude00"}"#);
        assert_eq!(s.found.text_chars, 2, "a surrogate pair is two escapes");
    }

    #[test]
    fn numbers_are_kept_only_whole_and_integral() {
        let s = scan(br#"{"usage":{"in":1.5,"out":-3,"details":{"cached":1e3}}}"#);
        assert!(!s.found.usage, "no count was an integer");
        let s = scan(br#"{"usage":{"in":18446744073709551616,"out":18446744073709551615}}"#);
        assert_eq!(count(&s, Slot::Input), None, "past u64::MAX");
        assert_eq!(count(&s, Slot::Output), Some(u64::MAX));
        // A record cut short is not kept, nor a number without a byte after it.
        for cut in [
            &br#"{"usage":{"in":12"#[..],
            br#"{"usage":{"in":12,"out":3"#,
        ] {
            let s = scan(cut);
            assert!(!s.found.usage, "{}", String::from_utf8_lossy(cut));
        }
    }

    #[test]
    fn a_usage_record_keeps_the_latest_value_of_each_count() {
        let s = scan(br#"[{"usage":{"in":5,"out":1}},{"usage":{"out":9}},{"usage":null},{"usage":{"in":null}}]"#);
        assert_eq!(count(&s, Slot::Input), Some(5));
        assert_eq!(count(&s, Slot::Output), Some(9));
        assert!(s.done());
    }

    #[test]
    fn images_and_end_marks() {
        let s = scan(br#"{"items":[{"b64":"AAAA"},{"url":"u"},null],"end":null}"#);
        assert_eq!(s.found.images, 3);
        assert!(!s.found.finished, "a null end is no end");
        let s = scan(br#"{"end":"STOP"}"#);
        assert!(s.found.finished);
    }

    #[test]
    fn keys_with_escapes_and_long_strings_are_not_taken() {
        let long = format!(
            r#"{{"mod\u0065l":"a","model":"{}","type":"ok"}}"#,
            "m".repeat(SHORT_MAX + 1)
        );
        let s = scan(long.as_bytes());
        assert_eq!(s.found.model.as_bytes(), b"");
        assert_eq!(s.found.kind.as_bytes(), b"ok");
        let long_key = format!(r#"{{"{}":1,"type":"ok"}}"#, "k".repeat(KEY_MAX * 3));
        assert_eq!(scan(long_key.as_bytes()).found.kind.as_bytes(), b"ok");
    }

    #[test]
    fn broken_grammar_stops_the_scan_and_keeps_what_was_read() {
        for bad in [
            &br#"{"type":"a",}"#[..],
            br#"{"type":"a" "x":1}"#,
            br#"{"type":"a","usage":{"in":1]}"#,
            br#"{"type":"a","x":}"#,
            br#"{"type":"a"}}"#,
        ] {
            let mut s = Scanner::new(&SCHEMA, false);
            s.feed(bad);
            assert_eq!(
                s.found.kind.as_bytes(),
                b"a",
                "{}",
                String::from_utf8_lossy(bad)
            );
            assert!(!s.found.usage);
        }
        let mut s = Scanner::new(&SCHEMA, false);
        s.feed(b"[DONE]");
        assert_eq!(s.mode, Mode::Broken, "a top-level array only when asked");
        s.reset();
        s.feed(br#"{"type":"next"}"#);
        assert_eq!(
            s.found.kind.as_bytes(),
            b"next",
            "reset reads the next value"
        );
    }
}
