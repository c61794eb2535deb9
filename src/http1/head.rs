//! What both head parsers share: where each field sits in a parsed head (read again from the
//! head once it is split off and frozen), and the field writers: one field from a map, and
//! [`ExtraFields`], fields a caller adds to a head already in wire form.

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The `Keep-Alive` field (hop-by-hop: read with `Connection`, never forwarded).
pub static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Appends one `name: value` line.
pub(crate) fn put_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends a `content-length: n` line (digits written by hand: the formatter costs several
/// hundred instructions, and this runs for every response).
pub(crate) fn put_content_length(out: &mut Vec<u8>, n: u64) {
    let mut text = [0u8; 20];
    let mut at = text.len();
    let mut rest = n;
    loop {
        at -= 1;
        text[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(&text[at..]);
    out.extend_from_slice(b"\r\n");
}

/// Header fields added to a request head as it is written, kept in wire form (`name: value`
/// lines): the encoder copies them in one piece instead of hashing each into the request's map.
/// Names are lower-case tokens and values hold no CR or LF (the caller builds them from header
/// values and its own text); a field must not also be in the map.
#[derive(Debug, Default, Clone)]
pub struct ExtraFields {
    lines: Vec<u8>,
}

impl ExtraFields {
    pub fn with_capacity(bytes: usize) -> Self {
        ExtraFields { lines: Vec::with_capacity(bytes) }
    }

    /// Adds the field `name`, its value the concatenation of `value`.
    pub fn push(&mut self, name: &HeaderName, value: &[&[u8]]) {
        self.lines.extend_from_slice(name.as_str().as_bytes());
        self.lines.extend_from_slice(b": ");
        for part in value {
            self.lines.extend_from_slice(part);
        }
        self.lines.extend_from_slice(b"\r\n");
    }

    /// Adds the fields of `other`, in one copy.
    pub fn append(&mut self, other: &ExtraFields) {
        self.lines.extend_from_slice(&other.lines);
    }

    /// The fields as they go on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.lines
    }

    /// Each field as a name and a value (for a request not written by this codec: h2).
    pub fn fields(&self) -> impl Iterator<Item = (HeaderName, HeaderValue)> + '_ {
        self.lines.split(|&b| b == b'\n').filter_map(|line| {
            let line = line.strip_suffix(b"\r")?;
            let colon = memchr::memchr(b':', line)?;
            let name = HeaderName::from_bytes(&line[..colon]).ok()?;
            let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii_start()).ok()?;
            Some((name, value))
        })
    }

    /// Adds the fields to `map`.
    pub fn add_to(&self, map: &mut HeaderMap) {
        for (name, value) in self.fields() {
            map.append(name, value);
        }
    }

    /// Takes the fields out of `map` again (what [`Self::add_to`] added).
    pub fn remove_from(&self, map: &mut HeaderMap) {
        for (name, _) in self.fields() {
            map.remove(name);
        }
    }
}

/// A field's name and value, as offsets into its head.
pub(crate) type Span = (u32, u32, u32, u32);

/// Where `part` (a slice of `head`) starts and ends in `head`; `None` if it is not inside it.
pub(crate) fn offsets(head: &[u8], part: &[u8]) -> Option<(u32, u32)> {
    let start = (part.as_ptr() as usize).wrapping_sub(head.as_ptr() as usize);
    let end = start.checked_add(part.len())?;
    (end <= head.len()).then_some((start as u32, end as u32))
}

/// Heads with up to this many fields (nearly all) keep their spans on the stack.
const INLINE_SPANS: usize = 32;

/// Where each field's name and value sit in a head: the fields are read again from the head
/// once it is split off and frozen (the parser's slices borrow the buffer being split). Kept on
/// the stack for ordinary heads, in a `Vec` for long ones: neither a large array to initialise
/// nor an allocation per request.
pub(crate) struct Spans {
    inline: [Span; INLINE_SPANS],
    heap: Vec<Span>,
    pub(crate) len: usize,
}

impl Spans {
    /// `None` if a field does not lie within `head` (the parser's slices always do; this keeps
    /// a surprise from turning into an out-of-bounds slice).
    pub(crate) fn of(head: &[u8], fields: &[httparse::Header<'_>]) -> Option<Self> {
        let span = |h: &httparse::Header<'_>| -> Option<Span> {
            let (ns, ne) = offsets(head, h.name.as_bytes())?;
            let (vs, ve) = offsets(head, h.value)?;
            Some((ns, ne, vs, ve))
        };
        let mut spans = Spans { inline: [(0, 0, 0, 0); INLINE_SPANS], heap: Vec::new(), len: fields.len() };
        if fields.len() <= INLINE_SPANS {
            for (slot, h) in spans.inline.iter_mut().zip(fields) {
                *slot = span(h)?;
            }
        } else {
            spans.heap = fields.iter().map(span).collect::<Option<_>>()?;
        }
        Some(spans)
    }

    pub(crate) fn as_slice(&self) -> &[Span] {
        if self.len <= INLINE_SPANS {
            &self.inline[..self.len]
        } else {
            &self.heap
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_content_length_line_reads_as_the_formatter_writes_it(n in prop_oneof![any::<u64>(), 0..1000u64]) {
            let mut out = b"x".to_vec();
            put_content_length(&mut out, n);
            prop_assert_eq!(out, format!("xcontent-length: {n}\r\n").into_bytes());
        }
    }

    #[test]
    fn extra_fields_are_written_as_lines_and_read_back_as_the_same_fields() {
        let mut extra = ExtraFields::default();
        extra.push(&HeaderName::from_static("x-forwarded-for"), &[b"10.0.0.1"]);
        extra.push(&HeaderName::from_static("forwarded"), &[b"for=10.0.0.1", b";host=\"a:1\""]);
        assert_eq!(extra.as_bytes(), b"x-forwarded-for: 10.0.0.1\r\nforwarded: for=10.0.0.1;host=\"a:1\"\r\n");
        let mut map = HeaderMap::new();
        map.insert("host", HeaderValue::from_static("a:1"));
        extra.add_to(&mut map);
        assert_eq!(map["x-forwarded-for"], "10.0.0.1");
        assert_eq!(map["forwarded"], "for=10.0.0.1;host=\"a:1\"");
        extra.remove_from(&mut map);
        assert_eq!(map.len(), 1);
        assert_eq!(map["host"], "a:1");
    }
}
