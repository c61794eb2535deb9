//! How an HTTP/1.1 message's body is framed (RFC 9112 §6), each rule written once for both
//! halves of the codec (and for the proxy, which checks lengths of h2 requests by the same rule):
//! a Content-Length value, the transfer codings, the `Connection` tokens, and taking the next
//! body frame out of the read buffer.

use super::chunked::{self, Chunk, Malformed, Step};
use bytes::{Buf, Bytes, BytesMut};
use http::Version;

/// One Content-Length value: ASCII digits only (no sign, no list), at most 19 of them (so it
/// cannot overflow). Surrounding whitespace is allowed.
pub fn parse_length(raw: &[u8]) -> Option<u64> {
    let t = raw.trim_ascii();
    if t.is_empty() || t.len() > 19 || !t.iter().all(u8::is_ascii_digit) {
        return None;
    }
    t.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// The length that Content-Length fields declare, where a recipient may accept a list of
/// identical values (RFC 9110 §8.6): every value of every field must be the same number. `None`
/// when there is no field; an error when a value is invalid or two differ.
pub fn list_length<'a>(fields: impl IntoIterator<Item = &'a [u8]>) -> Result<Option<u64>, Malformed> {
    let mut found = None;
    for field in fields {
        for part in field.split(|&b| b == b',') {
            let n = parse_length(part).ok_or(Malformed("invalid Content-Length"))?;
            if found.is_some_and(|f| f != n) {
                return Err(Malformed("conflicting Content-Length values"));
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// What a Transfer-Encoding value says about the body's framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codings {
    /// `chunked` alone: decoded here.
    Chunked,
    /// The last coding is not chunked: the body runs until the connection closes (a response),
    /// or the request cannot be framed.
    NotChunkedLast,
    /// `chunked` more than once.
    ChunkedTwice,
    /// Another coding before the final `chunked`: the data stays encoded.
    OtherBeforeChunked,
}

impl Codings {
    /// Whether chunked framing delimits the body (chunked is the last coding).
    pub fn chunked_last(self) -> bool {
        self != Codings::NotChunkedLast
    }
}

/// Reads one Transfer-Encoding value.
pub fn codings(raw: &[u8]) -> Codings {
    let mut codings = raw.split(|&b| b == b',').map(<[u8]>::trim_ascii).rev();
    let is_chunked = |t: &[u8]| t.eq_ignore_ascii_case(b"chunked");
    if !codings.next().is_some_and(is_chunked) {
        return Codings::NotChunkedLast;
    }
    let mut earlier = codings.peekable();
    if earlier.peek().is_none() {
        Codings::Chunked
    } else if earlier.any(is_chunked) {
        Codings::ChunkedTwice
    } else {
        Codings::OtherBeforeChunked
    }
}

/// What the `Connection` fields of a message said.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConnectionTokens {
    pub close: bool,
    pub keep_alive: bool,
}

impl ConnectionTokens {
    /// Reads one Connection value; true when it holds nothing but `close` and `keep-alive`.
    pub fn read(&mut self, value: &[u8]) -> bool {
        let mut only_ours = true;
        for token in value.split(|&b| b == b',') {
            let t = token.trim_ascii();
            if t.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if !t.is_empty() {
                only_ours = false;
            }
        }
        only_ours
    }

    /// Whether the sender lets the connection carry another message: HTTP/1.0 only with
    /// `keep-alive`, HTTP/1.1 unless `close`.
    pub fn persistent(self, version: Version) -> bool {
        if version == Version::HTTP_10 {
            self.keep_alive && !self.close
        } else {
            !self.close
        }
    }
}

/// Where a body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyState {
    Done,
    Length(u64),
    Chunked(Chunk),
    /// Until the connection closes (responses only).
    UntilClose,
}

/// Takes the next data frame of a body framed by `state` out of the buffered bytes, consuming
/// framing bytes on the way: `Some` with a frame (after which `state` may be `Done`), `None` when
/// the body has ended (`state` is `Done`) or more bytes are needed. Frames are slices of `buf`.
/// Shared by response bodies (client half) and request bodies (server half).
pub fn next_frame(state: &mut BodyState, buf: &mut BytesMut) -> Result<Option<Bytes>, Malformed> {
    match state {
        BodyState::Done => Ok(None),
        BodyState::Length(_) | BodyState::UntilClose if buf.is_empty() => Ok(None),
        BodyState::Length(rem) => {
            let n = (*rem).min(buf.len() as u64);
            *rem -= n;
            if *rem == 0 {
                *state = BodyState::Done;
            }
            Ok(Some(buf.split_to(n as usize).freeze()))
        }
        BodyState::UntilClose => Ok(Some(buf.split().freeze())),
        BodyState::Chunked(chunk) => match chunked::step(chunk, buf)? {
            (Step::Data(n), used) => {
                buf.advance(used);
                let data = buf.split_to(n).freeze();
                // If the rest of the framing (the CRLF, the last chunk, trailers) is already here,
                // take it now: the end shows at once and the connection goes back without another
                // read. Anything else is left for the next call.
                let mut ahead = *chunk;
                if let Ok((Step::End, used)) = chunked::step(&mut ahead, buf) {
                    buf.advance(used);
                    *state = BodyState::Done;
                }
                Ok(Some(data))
            }
            (Step::End, used) => {
                buf.advance(used);
                *state = BodyState::Done;
                Ok(None)
            }
            (Step::NeedMore, used) => {
                buf.advance(used);
                Ok(None)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_length_is_digits_only_and_a_list_must_agree() {
        for ok in [&b"0"[..], b"42", b" 7 ", b"9999999999999999999"] {
            assert!(parse_length(ok).is_some(), "{ok:?}");
        }
        for bad in [&b""[..], b"+4", b"-1", b"4 4", b"0x10", b"18446744073709551615", b"1,1"] {
            assert_eq!(parse_length(bad), None, "{bad:?}");
        }
        assert_eq!(list_length([&b"5, 5"[..], b"5"]), Ok(Some(5)));
        assert_eq!(list_length(std::iter::empty()), Ok(None));
        assert!(list_length([&b"5, 6"[..]]).is_err());
        assert!(list_length([&b"5"[..], b"+5"]).is_err());
    }

    #[test]
    fn transfer_codings_are_read_from_the_last_one() {
        assert_eq!(codings(b"chunked"), Codings::Chunked);
        assert_eq!(codings(b" Chunked "), Codings::Chunked);
        assert_eq!(codings(b"gzip"), Codings::NotChunkedLast);
        assert_eq!(codings(b"chunked, gzip"), Codings::NotChunkedLast);
        assert_eq!(codings(b"chunked, chunked"), Codings::ChunkedTwice);
        assert_eq!(codings(b"gzip, chunked"), Codings::OtherBeforeChunked);
        assert!(codings(b"gzip, chunked").chunked_last());
    }

    #[test]
    fn connection_tokens_say_close_keep_alive_or_something_else() {
        let mut t = ConnectionTokens::default();
        assert!(t.read(b"Keep-Alive, close"));
        assert!(t.close && t.keep_alive);
        assert!(!t.persistent(Version::HTTP_11));
        let mut t = ConnectionTokens::default();
        assert!(!t.read(b"upgrade"));
        assert!(t.persistent(Version::HTTP_11) && !t.persistent(Version::HTTP_10));
    }
}
