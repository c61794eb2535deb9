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
    if data.is_empty() {
        return;
    }
    out.reserve(data.len() + 20);
    put_hex(out, data.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in lower-case hex, without leading zeros (one pass, no formatter: this runs for
/// every streamed event).
fn put_hex(out: &mut Vec<u8>, n: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 16];
    let mut at = text.len();
    let mut rest = n;
    loop {
        at -= 1;
        text[at] = DIGITS[(rest & 0xf) as usize];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&text[at..]);
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
                let Some(nl) = find_newline(rest) else {
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

/// Where the first LF in `bytes` is. A chunk-size line is a few bytes: a plain loop finds its
/// end sooner than the vectorised search would get started; longer lines go to `memchr`.
#[inline]
fn find_newline(bytes: &[u8]) -> Option<usize> {
    let head = &bytes[..bytes.len().min(16)];
    match head.iter().position(|&b| b == b'\n') {
        Some(at) => Some(at),
        None if bytes.len() > head.len() => memchr(b'\n', &bytes[head.len()..]).map(|at| at + head.len()),
        None => None,
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
    // At most 15 hex digits: 60 bits, so this cannot overflow.
    Ok(line[..digits].iter().fold(0u64, |n, &b| (n << 4) | u64::from(hex_value(b))))
}

/// The value of an ASCII hex digit (the caller checked it is one).
fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn chunk_sizes_are_written_as_the_formatter_writes_them(len in 1usize..1 << 20, n in any::<u64>()) {
            let data = vec![b'x'; len];
            let mut out = Vec::new();
            write_chunk(&mut out, &data);
            prop_assert_eq!(out, [format!("{len:x}\r\n").into_bytes(), data, b"\r\n".to_vec()].concat());
            let mut hex = Vec::new();
            put_hex(&mut hex, n);
            prop_assert_eq!(hex, format!("{n:x}").into_bytes());
        }

        #[test]
        fn the_first_newline_is_found_wherever_it_is(bytes in prop::collection::vec(prop::sample::select(vec![b'\n', b'a', b'\r']), 0..64)) {
            prop_assert_eq!(find_newline(&bytes), memchr(b'\n', &bytes));
        }

        #[test]
        fn chunk_size_lines_parse_as_the_standard_library_parses_hex(digits in "[0-9a-fA-F]{1,15}") {
            let line = format!("{digits}\r");
            prop_assert_eq!(chunk_size(line.as_bytes()), Ok(u64::from_str_radix(&digits, 16).unwrap()));
        }
    }

    #[test]
    fn an_empty_chunk_is_never_written_and_sixteen_digit_sizes_are_refused() {
        let mut out = Vec::new();
        write_chunk(&mut out, b"");
        assert!(out.is_empty());
        assert_eq!(chunk_size(b"ffffffffffffffff\r"), Err(Malformed("invalid chunk size")));
        assert_eq!(chunk_size(b"Ff ; ext=1\r"), Ok(255));
    }
}
