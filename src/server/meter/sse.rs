//! Server-sent events, read incrementally from chunks split at any byte.
//!
//! Lines end with LF, CRLF or CR (a CRLF split across two chunks is one
//! line end). An event ends at a blank line. A line starting with `:` is
//! a comment. A field's value follows its first `:`, less one leading
//! space; a line without a colon is a field with an empty value. `data`
//! lines of one event join with LF, and `event` names it. Unknown fields,
//! `id` and `retry` are ignored. A UTF-8 byte-order mark at the start is
//! skipped. Nothing here decodes UTF-8: values are bytes, so a chunk that
//! ends inside a character changes nothing.
//!
//! Two readers share this grammar:
//! - [`Reader`], for the meter, holds no event bytes at all: it hands
//!   each data line's bytes on as they arrive and keeps only a field name
//!   ([`FIELD_MAX`] bytes) and an event name ([`NAME_MAX`] bytes), inline.
//!   An event of any size costs time, never memory.
//! - [`Splitter`], for a service that rewrites a stream, yields whole
//!   events as bytes, holding back an incomplete one up to a bound.

use super::json::{find2, Short};

/// Bytes kept of a field name; longer ones are no field this reads.
pub(crate) const FIELD_MAX: usize = 8;
/// Bytes kept of an event name; a longer one is taken as none.
pub(crate) const NAME_MAX: usize = 64;

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// What the [`Reader`] hands on.
pub(crate) trait Sink {
    /// Part of the current event's data: the bytes of its `data` lines as
    /// they arrive, with LF between two lines.
    fn data(&mut self, bytes: &[u8]);
    /// The event whose data was handed on ended; `name` is its `event`
    /// field (empty when it had none, or one longer than [`NAME_MAX`]).
    fn dispatch(&mut self, name: &[u8]);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    Start,
    Field,
    /// After the colon: one space to pass.
    Space,
    Value,
    /// A comment.
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dest {
    Data,
    Event,
    Ignore,
}

/// The meter's event reader: see the module's documentation.
#[derive(Debug, Clone)]
pub(crate) struct Reader {
    line: Line,
    dest: Dest,
    /// The previous byte was a CR, so an LF now is part of its line end.
    after_cr: bool,
    /// Bytes of the byte-order mark passed; [`BOM`]'s length once the
    /// start is behind.
    bom: usize,
    field: Short<FIELD_MAX>,
    field_ok: bool,
    name: Short<NAME_MAX>,
    name_ok: bool,
    /// The current event has had a `data` line.
    has_data: bool,
}

impl Default for Reader {
    fn default() -> Self {
        Reader {
            line: Line::Start,
            dest: Dest::Ignore,
            after_cr: false,
            bom: 0,
            field: Short::new(),
            field_ok: true,
            name: Short::new(),
            name_ok: true,
            has_data: false,
        }
    }
}

impl Reader {
    pub(crate) fn feed(&mut self, b: &[u8], sink: &mut impl Sink) {
        let mut i = 0;
        while self.bom < BOM.len() {
            match b.get(i) {
                None => return,
                Some(&c) if c == BOM[self.bom] => {
                    self.bom += 1;
                    i += 1;
                }
                // No mark: what matched of one (nothing, in any stream
                // that is SSE) is dropped.
                Some(_) => self.bom = BOM.len(),
            }
        }
        while let Some(&c) = b.get(i) {
            if std::mem::take(&mut self.after_cr) && c == b'\n' {
                i += 1;
                continue;
            }
            match self.line {
                Line::Start => match c {
                    b'\r' | b'\n' => {
                        if self.has_data {
                            sink.dispatch(self.name());
                        }
                        self.has_data = false;
                        self.name.clear();
                        self.name_ok = true;
                        self.end_line(c);
                        i += 1;
                    }
                    b':' => {
                        self.line = Line::Skip;
                        i += 1;
                    }
                    _ => {
                        self.field.clear();
                        self.field_ok = true;
                        self.line = Line::Field;
                    }
                },
                Line::Field => {
                    let rest = b.get(i..).unwrap_or_default();
                    let Some(p) = rest.iter().position(|&c| matches!(c, b':' | b'\r' | b'\n'))
                    else {
                        self.field_ok &= self.field.push(rest);
                        return;
                    };
                    self.field_ok &= self.field.push(rest.get(..p).unwrap_or_default());
                    i += p + 1;
                    self.dest = self.begin_field(sink);
                    match rest.get(p) {
                        Some(&b':') => self.line = Line::Space,
                        Some(&end) => self.end_line(end),
                        None => {}
                    }
                }
                Line::Space => {
                    if c == b' ' {
                        i += 1;
                    }
                    self.line = Line::Value;
                }
                Line::Value | Line::Skip => {
                    let rest = b.get(i..).unwrap_or_default();
                    let end = find2(rest, b'\r', b'\n');
                    let value = rest.get(..end.unwrap_or(rest.len())).unwrap_or_default();
                    if self.line == Line::Value {
                        match self.dest {
                            Dest::Data => sink.data(value),
                            Dest::Event => self.name_ok &= self.name.push(value),
                            Dest::Ignore => {}
                        }
                    }
                    let Some(p) = end else { return };
                    i += p + 1;
                    if let Some(&c) = rest.get(p) {
                        self.end_line(c);
                    }
                }
            }
        }
    }

    /// At the end of the stream: an event cut before its blank line is
    /// dispatched all the same, so what was read of it counts.
    pub(crate) fn finish(&mut self, sink: &mut impl Sink) {
        if std::mem::take(&mut self.has_data) {
            sink.dispatch(self.name());
        }
    }

    /// Bytes held of a line in progress.
    pub(crate) fn held(&self) -> usize {
        self.field.as_bytes().len() + self.name.as_bytes().len()
    }

    fn name(&self) -> &[u8] {
        if self.name_ok {
            self.name.as_bytes()
        } else {
            b""
        }
    }

    fn end_line(&mut self, c: u8) {
        self.line = Line::Start;
        self.after_cr = c == b'\r';
    }

    /// Where the value of the field just named goes.
    fn begin_field(&mut self, sink: &mut impl Sink) -> Dest {
        if !self.field_ok {
            return Dest::Ignore;
        }
        match self.field.as_bytes() {
            b"data" => {
                if self.has_data {
                    sink.data(b"\n");
                }
                self.has_data = true;
                Dest::Data
            }
            b"event" => {
                self.name.clear();
                self.name_ok = true;
                Dest::Event
            }
            _ => Dest::Ignore,
        }
    }
}

/// What a [`Splitter`] yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    /// One whole event, its closing blank line included.
    Event(&'a [u8]),
    /// Part of an event that outgrew the bound: never held, to forward
    /// untouched (or drop). The pieces of one such event follow each
    /// other, the last ending with its blank line.
    Overflow(&'a [u8]),
}

/// Splits a stream into whole events, for a service that rewrites them.
///
/// [`push`](Splitter::push) hands on every event that a chunk completes,
/// as bytes exactly as they came (closing blank line included: LF, CRLF
/// or CR line ends alike), borrowed from the chunk when the event lies
/// within it. The incomplete event at the end of a chunk is held back,
/// up to `max_event_bytes`. An event longer than that, however it is
/// chunked, is handed on as [`Piece::Overflow`] instead, from the moment
/// it passes the bound until its blank line, and counted in
/// [`overflowed`](Splitter::overflowed); splitting resumes after it.
/// At the end of the stream, [`finish`](Splitter::finish) returns what
/// is still held: an event with no blank line after it.
///
/// Forwarding every piece in order reproduces the stream byte for byte.
#[derive(Debug, Clone)]
pub struct Splitter {
    held: Vec<u8>,
    max: usize,
    /// No byte since the last line end: a line end now is a blank line.
    line_empty: bool,
    after_cr: bool,
    /// A CR ended an event at the end of the last chunk: an LF next is
    /// part of it.
    cr_end: bool,
    overflowing: bool,
    overflowed: u64,
}

impl Splitter {
    /// The bound a service would use: 1 MiB.
    pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

    pub fn new(max_event_bytes: usize) -> Splitter {
        Splitter {
            held: Vec::new(),
            max: max_event_bytes,
            line_empty: true,
            after_cr: false,
            cr_end: false,
            overflowing: false,
            overflowed: 0,
        }
    }

    /// Hands `out` every piece `chunk` completes, in order.
    pub fn push(&mut self, chunk: &[u8], mut out: impl FnMut(Piece<'_>)) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let Some(end) = self.boundary(rest) else {
                if self.overflowing {
                    out(Piece::Overflow(rest));
                } else if self.held.len() + rest.len() > self.max {
                    self.overflowed += 1;
                    self.overflowing = true;
                    if !self.held.is_empty() {
                        out(Piece::Overflow(&self.held));
                        self.held.clear();
                    }
                    out(Piece::Overflow(rest));
                } else {
                    self.hold(rest);
                }
                return;
            };
            let (event, tail) = rest.split_at(end.min(rest.len()));
            if std::mem::take(&mut self.overflowing) {
                if !event.is_empty() {
                    out(Piece::Overflow(event));
                }
            } else if self.held.is_empty() {
                if event.len() > self.max {
                    self.overflowed += 1;
                    out(Piece::Overflow(event));
                } else if !event.is_empty() {
                    out(Piece::Event(event));
                }
            } else if self.held.len() + event.len() > self.max {
                self.overflowed += 1;
                out(Piece::Overflow(&self.held));
                self.held.clear();
                if !event.is_empty() {
                    out(Piece::Overflow(event));
                }
            } else {
                self.hold(event);
                out(Piece::Event(&self.held));
                self.held.clear();
            }
            rest = tail;
        }
    }

    /// What is still held at the end of the stream: an event with no
    /// blank line after it (empty if there is none).
    pub fn finish(self) -> Vec<u8> {
        self.held
    }

    /// Events that outgrew the bound so far.
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }

    /// Bytes of memory holding an incomplete event (the buffer's
    /// capacity): never more than the bound.
    pub fn held_bytes(&self) -> usize {
        self.held.capacity()
    }

    /// Appends to the held event, never growing the buffer past the bound.
    fn hold(&mut self, bytes: &[u8]) {
        let need = self.held.len() + bytes.len();
        if need > self.held.capacity() {
            let grown = (self.held.capacity() * 2).max(need).min(self.max.max(need));
            self.held.reserve_exact(grown - self.held.len());
        }
        self.held.extend_from_slice(bytes);
    }

    /// Where in `b` (non-empty) the current event ends, just past its
    /// blank line; None if it does not end in `b`.
    fn boundary(&mut self, b: &[u8]) -> Option<usize> {
        if std::mem::take(&mut self.cr_end) {
            self.line_empty = true;
            self.after_cr = false;
            return Some(usize::from(b.first() == Some(&b'\n')));
        }
        let mut i = 0;
        while let Some(&c) = b.get(i) {
            match c {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\r' | b'\n' => {
                    if self.line_empty {
                        self.after_cr = false;
                        if c == b'\n' {
                            return Some(i + 1);
                        }
                        return match b.get(i + 1) {
                            Some(&b'\n') => Some(i + 2),
                            Some(_) => Some(i + 1),
                            None => {
                                self.cr_end = true;
                                None
                            }
                        };
                    }
                    self.line_empty = true;
                    self.after_cr = c == b'\r';
                }
                _ => {
                    self.after_cr = false;
                    self.line_empty = false;
                    match find2(b.get(i + 1..).unwrap_or_default(), b'\r', b'\n') {
                        Some(p) => {
                            i += p + 1;
                            continue;
                        }
                        None => return None,
                    }
                }
            }
            i += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, Debug, PartialEq)]
    struct Events {
        current: Vec<u8>,
        all: Vec<(String, String)>,
    }

    impl Sink for Events {
        fn data(&mut self, bytes: &[u8]) {
            self.current.extend_from_slice(bytes);
        }
        fn dispatch(&mut self, name: &[u8]) {
            let data = String::from_utf8_lossy(&std::mem::take(&mut self.current)).into_owned();
            self.all
                .push((String::from_utf8_lossy(name).into_owned(), data));
        }
    }

    fn read_split(stream: &[u8], at: &[usize]) -> Vec<(String, String)> {
        let mut reader = Reader::default();
        let mut events = Events::default();
        let mut from = 0;
        for &to in at.iter().chain([&stream.len()]) {
            reader.feed(&stream[from..to], &mut events);
            from = to;
        }
        reader.finish(&mut events);
        events.all
    }

    fn ev(name: &str, data: &str) -> (String, String) {
        (name.to_string(), data.to_string())
    }

    #[test]
    fn reader_follows_the_grammar_at_every_split() {
        let stream = "\u{feff}: a comment\n\
            event: first\n\
            data: one\n\
            data:two\n\
            data\n\
            id: 7\n\
            retry: 100\n\
            unknownfieldname: x\n\
            \n\
            event: ignored without data\n\
            \n\
            data:  leading space kept\r\n\
            \r\n\
            event: ü😀\r\
            data: {\"a\":\"é\"}\r\
            \r\
            data: last, cut";
        let want = vec![
            ev("first", "one\ntwo\n"),
            ev("", " leading space kept"),
            ev("ü😀", "{\"a\":\"é\"}"),
            ev("", "last, cut"),
        ];
        let bytes = stream.as_bytes();
        assert_eq!(read_split(bytes, &[]), want);
        for a in 0..=bytes.len() {
            assert_eq!(read_split(bytes, &[a]), want, "split at {a}");
        }
        let ones: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(read_split(bytes, &ones), want, "1-byte chunks");
    }

    #[test]
    fn reader_ignores_long_field_and_event_names() {
        let long = "e".repeat(NAME_MAX + 1);
        let stream = format!("datadata: no\nevent: {long}\ndata: yes\n\n");
        assert_eq!(read_split(stream.as_bytes(), &[]), vec![ev("", "yes")]);
    }

    fn split_all(stream: &[u8], at: &[usize], max: usize) -> (Vec<Vec<u8>>, Vec<u8>, Vec<u8>, u64) {
        let mut s = Splitter::new(max);
        let (mut events, mut all) = (Vec::new(), Vec::new());
        let mut from = 0;
        for &to in at.iter().chain([&stream.len()]) {
            s.push(&stream[from..to], |p| match p {
                Piece::Event(e) => {
                    all.extend_from_slice(e);
                    events.push(e.to_vec());
                }
                Piece::Overflow(o) => {
                    all.extend_from_slice(o);
                    events.push(b"<overflow>".to_vec());
                }
            });
            assert!(s.held_bytes() <= max, "held {} of {max}", s.held_bytes());
            from = to;
        }
        let overflowed = s.overflowed();
        let rest = s.finish();
        all.extend_from_slice(&rest);
        (events, rest, all, overflowed)
    }

    #[test]
    fn splitter_yields_whole_events_at_every_split() {
        let stream = b"data: a\n\nevent: x\r\ndata: b\r\n\r\n: c\rdata: d\r\rdata: e\n\ndata: cut";
        let want: Vec<Vec<u8>> = vec![
            b"data: a\n\n".to_vec(),
            b"event: x\r\ndata: b\r\n\r\n".to_vec(),
            b": c\rdata: d\r\r".to_vec(),
            b"data: e\n\n".to_vec(),
        ];
        for a in 0..=stream.len() {
            for b in a..=stream.len() {
                let (events, rest, all, overflowed) = split_all(stream, &[a, b], 1 << 10);
                let events: Vec<Vec<u8>> = events.into_iter().filter(|e| !e.is_empty()).collect();
                assert_eq!(events, want, "split at {a}, {b}");
                assert_eq!(rest, b"data: cut");
                assert_eq!(all, stream, "split at {a}, {b}");
                assert_eq!(overflowed, 0);
            }
        }
    }

    #[test]
    fn splitter_passes_an_oversized_event_through_and_resynchronises() {
        let stream = b"data: small\n\ndata: 0123456789abcdef0123456789\n\ndata: after\n\n";
        for a in 0..=stream.len() {
            let (events, rest, all, overflowed) = split_all(stream, &[a], 16);
            assert_eq!(all, stream, "split at {a}");
            assert!(rest.is_empty());
            assert_eq!(overflowed, 1, "split at {a}");
            assert_eq!(
                events.first().map(Vec::as_slice),
                Some(&b"data: small\n\n"[..])
            );
            assert_eq!(
                events.last().map(Vec::as_slice),
                Some(&b"data: after\n\n"[..])
            );
        }
    }

    #[test]
    fn splitter_holds_no_more_than_its_bound_of_a_100_mib_line() {
        let max = Splitter::DEFAULT_MAX_EVENT_BYTES;
        let mut s = Splitter::new(max);
        let chunk = vec![b'x'; 64 * 1024];
        let mut forwarded = 0usize;
        for _ in 0..(100 << 20) / chunk.len() {
            s.push(&chunk, |p| {
                if let Piece::Overflow(o) = p {
                    forwarded += o.len();
                }
            });
            assert!(s.held_bytes() <= max);
        }
        s.push(b"\n\ndata: ok\n\n", |p| {
            if let Piece::Overflow(o) = p {
                forwarded += o.len();
            } else {
                assert_eq!(p, Piece::Event(b"data: ok\n\n"));
            }
        });
        assert_eq!(forwarded, (100 << 20) + 2);
        assert_eq!(s.overflowed(), 1);
    }
}
