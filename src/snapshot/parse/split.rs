//! Reading a document without holding it. The entries of the top-level `partners` and `keys`
//! lists are handed on one by one as soon as each is complete and then forgotten; everything
//! else (the envelope: schema, revision, unknown fields) is kept, with those two lists left
//! empty, for serde to read once the end is reached.
//!
//! Only JSON's structure is followed here: strings (and their escapes), nesting and the commas
//! of the two lists. Whether each piece *is* JSON is left to serde: the envelope is read by serde
//! at the end and each entry by the entry's own parse, and a syntax error in either rejects the
//! whole document. So a document is accepted exactly when serde would accept it whole.

use std::io::Read;

use super::DocumentError;

/// Which top-level list an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum List {
    Partners,
    Keys,
}

impl List {
    pub fn name(self) -> &'static str {
        match self {
            List::Partners => "partners",
            List::Keys => "keys",
        }
    }
}

/// Where the entries go. An `Err` (an entry that is not JSON) stops the read.
pub(crate) trait Entries {
    fn entry(&mut self, list: List, position: usize, text: &str) -> Result<(), DocumentError>;

    /// If `rest` (what is read from the first byte of an entry of `list` on) starts with the
    /// text of an entry the sink has read before and expects now: that text's length. Those
    /// bytes are then not scanned: they were, when they were read before, and scanning the
    /// same bytes from the same state ends the same, at the end of a complete entry.
    fn expected(&mut self, list: List, rest: &[u8]) -> Option<usize>;

    /// The entry at `position` was the one expected, exactly (nothing but whitespace after it):
    /// its bytes, those of an entry read before, are JSON and UTF-8.
    fn expected_entry(&mut self, list: List, position: usize) -> Result<(), DocumentError>;
}

/// Why a read stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Document(#[from] DocumentError),
}

/// How much is read at a time: large enough that a read costs little per byte, small beside
/// a large document. An entry longer than this grows the buffer to hold it.
const BLOCK: usize = 1 << 20;

/// Read the document from `reader`, sending its entries to `sink`; returns the envelope.
pub(crate) fn split_reader(
    mut reader: impl Read,
    sink: &mut impl Entries,
) -> Result<Vec<u8>, ReadError> {
    let mut scanner = Scanner::default();
    let mut buf = vec![0u8; BLOCK];
    // `buf[..end]` holds what was read and not yet dropped.
    let mut end = 0;
    loop {
        // Room for a block after what the last scan had to keep (an unfinished entry).
        if buf.len() - end < BLOCK / 2 {
            buf.resize(buf.len() + BLOCK, 0);
        }
        let n = loop {
            match reader.read(&mut buf[end..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        };
        end += n;
        let keep_from = scanner.scan(&buf[..end], sink)?;
        if n == 0 {
            scanner.end(&buf[..end])?;
            return Ok(scanner.envelope);
        }
        buf.copy_within(keep_from..end, 0);
        end -= keep_from;
        scanner.shift(keep_from);
    }
}

/// Split a document already in memory: the same as [`split_reader`], without copying it.
pub(crate) fn split_slice(bytes: &[u8], sink: &mut impl Entries) -> Result<Vec<u8>, DocumentError> {
    let mut scanner = Scanner::default();
    scanner.scan(bytes, sink)?;
    scanner.end(bytes)?;
    Ok(scanner.envelope)
}

/// The state of a scan, resumable at any byte. Positions are in the caller's buffer, and are
/// moved by [`Scanner::shift`] when the caller drops a prefix of it.
#[derive(Default)]
struct Scanner {
    /// The open `{` and `[`, outermost first.
    stack: Vec<u8>,
    /// Where the next scan starts.
    pos: usize,
    in_string: bool,
    /// The byte before was a backslash, inside a string.
    escaped: bool,
    /// The envelope: every byte outside the two lists' entries.
    envelope: Vec<u8>,
    /// Bytes from here up to `pos` belong to the envelope but are not copied yet.
    copy_from: usize,
    /// A string at the top level of the document object: where it starts and ends in
    /// `envelope`, so that a member name can be read back when its `:` comes.
    name: (usize, usize),
    /// The top-level member whose value comes next, if it is one of the two lists.
    member: Option<List>,
    /// Inside one of the two lists (nesting depth 2).
    list: Option<ListState>,
}

struct ListState {
    which: List,
    /// Entries seen so far.
    count: usize,
    /// Where the entry being read starts (its first byte that is not whitespace).
    entry_start: Option<usize>,
    /// A comma was read since the last entry, so another entry must come.
    want_entry: bool,
    /// The entry being read started with the text the sink expected, this long.
    expected: Option<usize>,
}

fn syntax(what: &str) -> DocumentError {
    DocumentError::Json(what.to_owned())
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Scanner {
    /// Where `at` (in the buffer) will be in `envelope` once copied.
    fn envelope_offset(&self, at: usize) -> usize {
        self.envelope.len() + (at - self.copy_from)
    }

    fn copy_envelope(&mut self, buf: &[u8], to: usize) {
        self.envelope.extend_from_slice(&buf[self.copy_from..to]);
        self.copy_from = to;
    }

    /// Scan `buf` from where the last scan stopped to its end. Returns how much of `buf` the
    /// caller may drop (everything before an unfinished entry).
    fn scan(&mut self, buf: &[u8], sink: &mut impl Entries) -> Result<usize, DocumentError> {
        let mut i = self.pos;
        while i < buf.len() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    i += 1;
                    continue;
                }
                match memchr::memchr2(b'"', b'\\', &buf[i..]) {
                    None => i = buf.len(),
                    Some(at) => {
                        i += at;
                        if buf[i] == b'\\' {
                            self.escaped = true;
                        } else {
                            self.in_string = false;
                            if self.at_top_object() {
                                self.name.1 = self.envelope_offset(i + 1);
                            }
                        }
                        i += 1;
                    }
                }
                continue;
            }
            if self.list.is_some() && self.stack.len() > 2 {
                i = self.scan_nested(buf, i)?;
                continue;
            }
            let b = buf[i];
            if let Some(list) = &mut self.list {
                if self.stack.len() == 2 {
                    // Between or at the start of the list's entries.
                    match b {
                        b',' | b']' => {
                            if let Some(start) = list.entry_start.take() {
                                let text = trim_end(&buf[start..i]);
                                let position = list.count;
                                list.count += 1;
                                list.want_entry = false;
                                if list.expected.take() == Some(text.len()) {
                                    sink.expected_entry(list.which, position)?;
                                } else {
                                    let text = std::str::from_utf8(text)
                                        .map_err(|_| syntax("not UTF-8"))?;
                                    sink.entry(list.which, position, text)?;
                                }
                            } else if b == b',' || list.want_entry {
                                return Err(syntax(&format!(
                                    "{}: a missing entry (two commas, or a trailing one)",
                                    list.which.name()
                                )));
                            }
                            if b == b',' {
                                list.want_entry = true;
                            } else {
                                self.stack.pop();
                                self.list = None;
                                self.copy_from = i;
                            }
                            i += 1;
                            continue;
                        }
                        _ if is_space(b) => {
                            i += 1;
                            continue;
                        }
                        _ => {
                            if list.entry_start.is_none() {
                                list.entry_start = Some(i);
                                if let Some(len) = sink.expected(list.which, &buf[i..]) {
                                    list.expected = Some(len);
                                    i += len;
                                    continue;
                                }
                            }
                        }
                    }
                }
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    if self.at_top_object() {
                        self.name.0 = self.envelope_offset(i);
                    }
                }
                b'{' | b'[' => {
                    // No depth limit: the stack is a byte per level on the heap, and serde
                    // skips deep unknown members (an entry's, the envelope's) without one.
                    let member = self.member.take();
                    self.stack.push(b);
                    if let (b'[', 2, Some(which)) = (b, self.stack.len(), member) {
                        self.copy_envelope(buf, i + 1);
                        self.list = Some(ListState {
                            which,
                            count: 0,
                            entry_start: None,
                            want_entry: false,
                            expected: None,
                        });
                    }
                }
                b'}' | b']' => {
                    let open = if b == b'}' { b'{' } else { b'[' };
                    if self.stack.pop() != Some(open) {
                        return Err(syntax("unbalanced brackets"));
                    }
                    self.member = None;
                }
                b':' if self.at_top_object() => {
                    self.copy_envelope(buf, i);
                    self.member = self.member_name();
                }
                b',' if self.at_top_object() => self.member = None,
                _ => {}
            }
            i += 1;
        }
        self.pos = i;
        match &self.list {
            Some(ListState {
                entry_start: Some(start),
                ..
            }) => Ok(*start),
            Some(_) => Ok(i),
            None => {
                self.copy_envelope(buf, i);
                Ok(i)
            }
        }
    }

    /// Inside an entry of one of the two lists, nested deeper than the list: only strings and
    /// brackets matter there, until the entry's own bracket closes. Scans from `i` to there
    /// (or to the end of `buf`, in a string perhaps) and returns where it stopped. Most of a
    /// document is this, and most of it strings of a few bytes: a loop of its own that goes
    /// through each string at once takes less than half the time of the general one.
    fn scan_nested(&mut self, buf: &[u8], mut i: usize) -> Result<usize, DocumentError> {
        if self.in_string {
            match string_end(buf, i, &mut self.escaped) {
                None => return Ok(buf.len()),
                Some(end) => {
                    self.in_string = false;
                    i = end;
                }
            }
        }
        while let Some(&b) = buf.get(i) {
            match b {
                b'"' => match string_end(buf, i + 1, &mut self.escaped) {
                    None => {
                        self.in_string = true;
                        return Ok(buf.len());
                    }
                    Some(end) => {
                        i = end;
                        continue;
                    }
                },
                b'{' | b'[' => self.stack.push(b),
                b'}' | b']' => {
                    let open = if b == b'}' { b'{' } else { b'[' };
                    if self.stack.pop() != Some(open) {
                        return Err(syntax("unbalanced brackets"));
                    }
                    if self.stack.len() == 2 {
                        return Ok(i + 1);
                    }
                }
                _ => {}
            }
            i += 1;
        }
        Ok(i)
    }

    /// The caller dropped the first `n` bytes of its buffer.
    fn shift(&mut self, n: usize) {
        self.pos -= n;
        self.copy_from = self.copy_from.saturating_sub(n);
        if let Some(ListState {
            entry_start: Some(start),
            ..
        }) = &mut self.list
        {
            *start -= n;
        }
    }

    /// The whole document has been scanned.
    fn end(&mut self, buf: &[u8]) -> Result<(), DocumentError> {
        if self.in_string || !self.stack.is_empty() {
            return Err(syntax("EOF while parsing: the document is cut short"));
        }
        self.copy_envelope(buf, self.pos);
        Ok(())
    }

    fn at_top_object(&self) -> bool {
        self.stack.len() == 1 && self.stack[0] == b'{' && self.list.is_none()
    }

    /// The member name that ends the envelope so far, if it names one of the two lists.
    fn member_name(&self) -> Option<List> {
        let quoted = self.envelope.get(self.name.0..self.name.1)?;
        let name: std::borrow::Cow<'_, str> = if quoted.contains(&b'\\') {
            serde_json::from_slice::<String>(quoted).ok()?.into()
        } else {
            let inner = quoted.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
            std::str::from_utf8(inner).ok()?.into()
        };
        match &*name {
            "partners" => Some(List::Partners),
            "keys" => Some(List::Keys),
            _ => None,
        }
    }
}

/// In a string, from `i` (just after a backslash if `escaped`): where the string ends, just
/// after its closing quote; or `None` if `buf` ends first, `escaped` then saying whether it
/// ends just after a backslash.
fn string_end(buf: &[u8], mut i: usize, escaped: &mut bool) -> Option<usize> {
    loop {
        if *escaped {
            if i >= buf.len() {
                return None;
            }
            *escaped = false;
            i += 1;
        }
        i += quote_or_backslash(buf.get(i..)?)?;
        if buf[i] == b'"' {
            return Some(i + 1);
        }
        *escaped = true;
        i += 1;
    }
}

/// Where the first `"` or `\\` in `bytes` is, looked for eight bytes at a time: the strings of
/// an entry are mostly a few bytes long, where `memchr`'s setup costs more than the search.
fn quote_or_backslash(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut i = 0;
    while let Some(word) = bytes.get(i..i + 8) {
        let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        // A byte of `x` is 0 where `word` has the byte looked for; `(x - ONES) & !x & HIGH`
        // marks it, and any false mark is in a later byte than a true one, so the lowest
        // mark is the first match.
        let (quote, backslash) = (word ^ (ONES * b'"' as u64), word ^ (ONES * b'\\' as u64));
        let marks =
            (quote.wrapping_sub(ONES) & !quote | backslash.wrapping_sub(ONES) & !backslash) & HIGH;
        if marks != 0 {
            return Some(i + marks.trailing_zeros() as usize / 8);
        }
        i += 8;
    }
    let rest = bytes[i..].iter().position(|&b| b == b'"' || b == b'\\');
    rest.map(|at| i + at)
}

fn trim_end(mut bytes: &[u8]) -> &[u8] {
    while let [rest @ .., last] = bytes {
        if !is_space(*last) {
            break;
        }
        bytes = rest;
    }
    bytes
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Eight bytes at a time finds what a byte at a time finds, wherever it is.
        #[test]
        fn quote_or_backslash_finds_the_first(
            bytes in proptest::collection::vec(
                prop_oneof![Just(b'"'), Just(b'\\'), Just(0u8), Just(1u8), Just(0x80u8), any::<u8>()],
                0..40,
            ),
            plain in 0usize..40,
        ) {
            // Mostly bytes that are neither, before the first that is.
            let mut bytes = bytes;
            for b in bytes.iter_mut().take(plain) {
                if *b == b'"' || *b == b'\\' {
                    *b = b'a';
                }
            }
            let want = bytes.iter().position(|&b| b == b'"' || b == b'\\');
            prop_assert_eq!(quote_or_backslash(&bytes), want);
        }
    }
}
