//! What both head parsers share: where each field sits in a parsed head (read again from the
//! head once it is split off and frozen), and the field writer.

use http::header::{HeaderName, HeaderValue};

/// The `Keep-Alive` field (hop-by-hop: read with `Connection`, never forwarded).
pub static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Appends one `name: value` line.
pub(crate) fn put_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
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
