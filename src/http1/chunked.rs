//! The chunked transfer coding (RFC 9112 §7.1): the decoder, one step at a time over buffered
//! bytes (it never copies data: it says how many of the buffered bytes are data), and the writer.

use memchr::memchr;

/// Longest chunk-size line (with extensions), and the most trailer bytes, accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

/// The last chunk with no trailers: the end of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Broken framing: what was wrong, in a few words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub &'static str);

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines (discarded) up to an empty line; bytes seen so far.
    Trailers(usize),
}

/// What one step of chunked decoding found.
pub enum Step {
    /// The next this many buffered bytes are body data.
    Data(usize),
    NeedMore,
    End,
}

/// Appends `data` as one chunk (nothing for empty data: an empty chunk would end the body).
pub fn write_chunk(out: &mut Vec<u8>, data: &[u8]) {
    use std::io::Write as _;
    if data.is_empty() {
        return;
    }
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// One step of chunked decoding over the buffered bytes, from state `chunk`. Returns what it
/// found and how many framing bytes at the front of `buf` it consumed (data is left for the
/// caller to take). Pure over the slice, so it also serves to look ahead.
pub fn step(chunk: &mut Chunk, buf: &[u8]) -> Result<(Step, usize), Malformed> {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        match *chunk {
            Chunk::Size => {
                let Some(nl) = memchr(b'\n', rest) else {
                    return if rest.len() > MAX_CHUNK_LINE {
                        Err(Malformed("chunk-size line too long"))
                    } else {
                        Ok((Step::NeedMore, at))
                    };
                };
                let size = chunk_size(&rest[..nl])?;
                at += nl + 1;
                *chunk = if size == 0 { Chunk::Trailers(0) } else { Chunk::Data(size) };
            }
            Chunk::Data(rem) => {
                if rest.is_empty() {
                    return Ok((Step::NeedMore, at));
                }
                let n = rem.min(rest.len() as u64);
                *chunk = if n == rem { Chunk::DataEnd } else { Chunk::Data(rem - n) };
                return Ok((Step::Data(n as usize), at));
            }
            Chunk::DataEnd => {
                if rest.len() < 2 {
                    return Ok((Step::NeedMore, at));
                }
                if &rest[..2] != b"\r\n" {
                    return Err(Malformed("chunk data not followed by CRLF"));
                }
                at += 2;
                *chunk = Chunk::Size;
            }
            Chunk::Trailers(seen) => match trailer_line(rest, seen)? {
                None => return Ok((Step::NeedMore, at)),
                Some((used, true)) => return Ok((Step::End, at + used)),
                Some((used, false)) => {
                    at += used;
                    *chunk = Chunk::Trailers(seen + used);
                }
            },
        }
    }
}

/// One trailer line at the front of `rest` (`seen` trailer bytes before it): `None` until it is
/// complete, else its length and whether it was the empty line that ends the body.
fn trailer_line(rest: &[u8], seen: usize) -> Result<Option<(usize, bool)>, Malformed> {
    let Some(nl) = memchr(b'\n', rest) else {
        return if seen + rest.len() > MAX_TRAILERS { Err(Malformed("trailers too large")) } else { Ok(None) };
    };
    let empty = nl == 1 && rest[0] == b'\r';
    if nl == 0 || (!empty && rest[nl - 1] != b'\r') {
        return Err(Malformed("trailer line not ended by CRLF"));
    }
    if !empty && !is_field_line(&rest[..nl - 1]) {
        return Err(Malformed("trailer line is not a header field"));
    }
    Ok(Some((nl + 1, empty)))
}

/// A control byte other than HTAB.
fn is_ctl(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

/// `token ":" OWS field-value OWS` with no control bytes (RFC 9110 §5): a trailer line.
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = memchr(b':', line) else { return false };
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    colon > 0 && line[..colon].iter().all(tchar) && !line[colon + 1..].iter().any(|&b| is_ctl(b))
}

/// Parses `1*HEXDIG [ BWS ";" ext ] CR` (the LF is already cut off).
fn chunk_size(line: &[u8]) -> Result<u64, Malformed> {
    let line = line.strip_suffix(b"\r").ok_or(Malformed("chunk-size line not ended by CRLF"))?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(Malformed("invalid chunk size"));
    }
    let rest = &line[digits..];
    if !rest.is_empty() && !matches!(rest.trim_ascii_start().first(), Some(b';')) {
        return Err(Malformed("invalid chunk size"));
    }
    // Extensions are ignored, but must not smuggle control bytes (a bare CR, NUL).
    if rest.iter().any(|&b| is_ctl(b)) {
        return Err(Malformed("control character in a chunk extension"));
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| Malformed("invalid chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| Malformed("invalid chunk size"))
}
