//! Server-sent events, split incrementally as bytes arrive.
//!
//! kedge forwards each event as soon as its terminating blank line arrives,
//! byte for byte, and looks at its `data:` to find usage and generated text.

use std::borrow::Cow;

use bytes::{Buf, Bytes, BytesMut};

/// Longest event kedge holds while waiting for its end; a stream that never
/// terminates an event is not SSE.
pub const MAX_EVENT_BYTES: usize = 4 << 20;

/// Upstream bytes not yet forwarded. Complete events are inspected where they
/// lie and handed on as slices (no copy per event), so a run of events that
/// all pass leaves as one frame. While the pending bytes all came in one
/// upstream chunk they stay in that chunk, so its events leave without being
/// copied at all; only an event cut across chunks is gathered into a buffer.
#[derive(Default)]
pub struct SseSplitter {
    /// The pending bytes, when they are (the rest of) one upstream chunk.
    chunk: Bytes,
    /// The pending bytes, when they span chunks. At most one of the two
    /// holds anything.
    joined: BytesMut,
}

impl SseSplitter {
    pub fn extend(&mut self, data: Bytes) {
        if self.pending() == 0 {
            self.chunk = data;
            return;
        }
        if !self.chunk.is_empty() {
            self.joined.extend_from_slice(&self.chunk);
            self.chunk = Bytes::new();
        }
        self.joined.extend_from_slice(&data);
    }

    /// The complete event that starts `from` bytes in, if it has ended (its
    /// blank line has arrived).
    pub fn event_at(&self, from: usize) -> Option<Event> {
        event_end(&self.buffered()[from..])
    }

    pub fn buffered(&self) -> &[u8] {
        if self.joined.is_empty() {
            &self.chunk
        } else {
            &self.joined
        }
    }

    /// Hands on the first `n` buffered bytes.
    pub fn take(&mut self, n: usize) -> Bytes {
        if self.joined.is_empty() {
            self.chunk.split_to(n)
        } else {
            self.joined.split_to(n).freeze()
        }
    }

    /// Drops the first `n` buffered bytes.
    pub fn skip(&mut self, n: usize) {
        if self.joined.is_empty() {
            self.chunk.advance(n);
        } else {
            self.joined.advance(n);
        }
    }

    /// Bytes not yet handed on.
    pub fn pending(&self) -> usize {
        self.chunk.len() + self.joined.len()
    }

    /// What is left when the stream ends: an unterminated last event.
    pub fn finish(&mut self) -> Option<Bytes> {
        if self.buffered().iter().all(|b| b.is_ascii_whitespace()) {
            return None;
        }
        Some(self.take(self.pending()))
    }
}

/// A complete event at the start of the pending bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Its length, blank line included.
    pub len: usize,
    /// Where its first line ends: found on the way to its end, so reading
    /// the usual one-line event's data ([`data_of_event`]) searches nothing.
    pub first_line: usize,
}

/// The first event in `buf`: up to and including its blank line.
fn event_end(buf: &[u8]) -> Option<Event> {
    let mut i = 0;
    let mut first_line_end = None;
    while let Some(found) = memchr::memchr2(b'\n', b'\r', &buf[i..]) {
        // A line ends here; a blank line right after ends the event.
        i += found;
        let first_line = *first_line_end.get_or_insert(i);
        let next = line_break_len(&buf[i..])?;
        let after = i + next;
        if after < buf.len() && (buf[after] == b'\n' || buf[after] == b'\r') {
            let blank = line_break_len(&buf[after..])?;
            return Some(Event {
                len: after + blank,
                first_line,
            });
        }
        if after >= buf.len() {
            return None;
        }
        i = after;
    }
    None
}

/// Length of the line break at the start of `s` (`\r\n`, `\n` or `\r`);
/// `None` when a lone `\r` ends the buffer (a `\n` may follow).
fn line_break_len(s: &[u8]) -> Option<usize> {
    match s {
        [b'\r', b'\n', ..] => Some(2),
        [b'\r'] => None,
        [b'\r', ..] | [b'\n', ..] => Some(1),
        _ => Some(0),
    }
}

/// An event's `data:` lines joined by `\n`; `None` for a comment or
/// keep-alive. The usual one-line event is borrowed, not copied.
pub fn data_of(raw: &[u8]) -> Option<Cow<'_, [u8]>> {
    data_of_event(raw, memchr::memchr2(b'\n', b'\r', raw).unwrap_or(raw.len()))
}

/// [`data_of`] for an event whose first line ends at `line_end`.
pub fn data_of_event(raw: &[u8], line_end: usize) -> Option<Cow<'_, [u8]>> {
    if let Some(rest) = raw[..line_end].strip_prefix(b"data:")
        && raw[line_end..].iter().all(|b| *b == b'\n' || *b == b'\r')
    {
        return Some(Cow::Borrowed(rest.strip_prefix(b" ").unwrap_or(rest)));
    }
    let mut data: Option<Vec<u8>> = None;
    for line in raw.split(|b| *b == b'\n' || *b == b'\r') {
        if let Some(rest) = line.strip_prefix(b"data:") {
            let rest = rest.strip_prefix(b" ").unwrap_or(rest);
            match &mut data {
                Some(d) => {
                    d.push(b'\n');
                    d.extend_from_slice(rest);
                }
                None => data = Some(rest.to_vec()),
            }
        }
    }
    data.map(Cow::Owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits `buf` the way the stream meter does: every complete event.
    fn split_all(s: &mut SseSplitter) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(e) = s.event_at(0) {
            let event = s.take(e.len);
            assert_eq!(
                data_of_event(&event, e.first_line),
                data_of(&event),
                "the first line is where the event's first line ends"
            );
            out.push(event);
        }
        out
    }

    #[test]
    fn splits_events_across_arbitrary_chunk_boundaries() {
        let stream =
            b"data: {\"a\":1}\n\n: keep-alive\n\ndata: x\r\ndata: y\r\n\r\ndata: [DONE]\n\n";
        for cut in 0..stream.len() {
            let mut s = SseSplitter::default();
            s.extend(Bytes::copy_from_slice(&stream[..cut]));
            let mut events = split_all(&mut s);
            s.extend(Bytes::copy_from_slice(&stream[cut..]));
            events.extend(split_all(&mut s));
            let data: Vec<_> = events
                .iter()
                .map(|e| data_of(e).map(|d| d.into_owned()))
                .collect();
            assert_eq!(
                data,
                vec![
                    Some(b"{\"a\":1}".to_vec()),
                    None,
                    Some(b"x\ny".to_vec()),
                    Some(b"[DONE]".to_vec())
                ],
                "cut at {cut}"
            );
            let raw: Vec<u8> = events.iter().flat_map(|e| e.to_vec()).collect();
            assert_eq!(raw, stream, "bytes are forwarded unchanged");
            assert_eq!(s.pending(), 0);
            assert_eq!(s.finish(), None);
        }
    }

    /// A stream cut into random pieces, taken event by event as they arrive
    /// (some pieces end inside an event, some hold several): the same
    /// events and the same bytes as the stream read whole.
    #[test]
    fn random_chunkings_give_the_same_events() {
        let stream: &[u8] = b"data: {\"a\":1}\n\n: ping\r\n\r\ndata: x\ndata: y\n\n\
            data: {\"choices\":[]}\r\n\r\nevent: e\ndata: z\n\ndata: [DONE]\n\n";
        let mut whole = SseSplitter::default();
        whole.extend(Bytes::from_static(stream));
        let expected = split_all(&mut whole);
        assert_eq!(expected.len(), 6);
        let mut rng = crate::test_support::XorShift(0x5eed_f055);
        for _ in 0..500 {
            let mut s = SseSplitter::default();
            let mut events = Vec::new();
            let mut at = 0;
            while at < stream.len() {
                let n = 1 + rng.below(24) as usize;
                let end = (at + n).min(stream.len());
                s.extend(Bytes::copy_from_slice(&stream[at..end]));
                events.extend(split_all(&mut s));
                at = end;
            }
            assert_eq!(events, expected);
            assert_eq!(s.pending(), 0);
        }
    }

    #[test]
    fn events_are_found_in_place_without_taking_them() {
        let mut s = SseSplitter::default();
        s.extend(Bytes::from_static(b"data: a\n\ndata: b\n\ndata: c"));
        let first = s.event_at(0).unwrap().len;
        let second = s.event_at(first).unwrap().len;
        assert_eq!(s.event_at(first + second), None);
        assert_eq!(&s.take(first + second)[..], b"data: a\n\ndata: b\n\n");
        assert_eq!(data_of(s.buffered()).as_deref(), Some(&b"c"[..]));
    }

    #[test]
    fn events_within_one_chunk_leave_as_slices_of_it() {
        let chunk = Bytes::from_static(b"data: a\n\ndata: b\n\ndata: c");
        let mut s = SseSplitter::default();
        s.extend(chunk.clone());
        let a = s.take(s.event_at(0).unwrap().len);
        let b = s.take(s.event_at(0).unwrap().len);
        assert_eq!((&a[..], &b[..]), (&b"data: a\n\n"[..], &b"data: b\n\n"[..]));
        assert_eq!(a.as_ptr(), chunk.as_ptr(), "not copied");
        assert_eq!(b.as_ptr(), chunk[9..].as_ptr(), "not copied");
        // The cut event is gathered with the next chunk.
        s.extend(Bytes::from_static(b"\n"));
        assert_eq!(s.event_at(0), None);
        s.extend(Bytes::from_static(b"\ndata: d"));
        let c = s.take(s.event_at(0).unwrap().len);
        assert_eq!(&c[..], b"data: c\n\n");
        assert_eq!(s.buffered(), b"data: d");
    }

    #[test]
    fn an_unterminated_tail_is_returned_at_the_end() {
        let mut s = SseSplitter::default();
        s.extend(Bytes::from_static(b"data: partial"));
        assert_eq!(s.event_at(0), None);
        assert_eq!(s.pending(), 13);
        assert_eq!(
            data_of(&s.finish().unwrap()).as_deref(),
            Some(&b"partial"[..])
        );
    }
}
