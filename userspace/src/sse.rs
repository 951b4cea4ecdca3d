//! Server-sent events, split incrementally as bytes arrive.
//!
//! kedge forwards each event as soon as its terminating blank line arrives,
//! byte for byte, and looks at its `data:` to find usage and generated text.

use bytes::{Bytes, BytesMut};

/// One complete event: its bytes as received (terminator included) and its data.
#[derive(Debug, PartialEq, Eq)]
pub struct Event {
    pub raw: Bytes,
    /// The `data:` lines joined by `\n`; `None` for comment/keep-alive events.
    pub data: Option<String>,
}

/// Longest event kedge holds while waiting for its end; a stream that never
/// terminates an event is not SSE.
pub const MAX_EVENT_BYTES: usize = 4 << 20;

#[derive(Default)]
pub struct SseSplitter {
    buf: BytesMut,
}

impl SseSplitter {
    /// Appends `chunk` and returns every event it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Event> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = event_end(&self.buf) {
            let raw = self.buf.split_to(end).freeze();
            let data = data_of(&raw);
            events.push(Event { raw, data });
        }
        events
    }

    /// Bytes of an event not yet terminated.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// What is left when the stream ends: an unterminated last event.
    pub fn finish(&mut self) -> Option<Event> {
        if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
            return None;
        }
        let raw = self.buf.split().freeze();
        let data = data_of(&raw);
        Some(Event { raw, data })
    }
}

/// End (exclusive) of the first event in `buf`: after its blank line.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' || buf[i] == b'\r' {
            // A line ends here; a blank line right after ends the event.
            let next = line_break_len(&buf[i..])?;
            let after = i + next;
            if after < buf.len() && (buf[after] == b'\n' || buf[after] == b'\r') {
                let blank = line_break_len(&buf[after..])?;
                return Some(after + blank);
            }
            if after >= buf.len() {
                return None;
            }
            i = after;
        } else {
            i += 1;
        }
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

fn data_of(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let mut data: Option<String> = None;
    for line in text.split(['\n', '\r']) {
        if let Some(rest) = line.strip_prefix("data:") {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(rest);
                }
                None => data = Some(rest.to_string()),
            }
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_events_across_arbitrary_chunk_boundaries() {
        let stream =
            b"data: {\"a\":1}\n\n: keep-alive\n\ndata: x\r\ndata: y\r\n\r\ndata: [DONE]\n\n";
        for cut in 0..stream.len() {
            let mut s = SseSplitter::default();
            let mut events = s.push(&stream[..cut]);
            events.extend(s.push(&stream[cut..]));
            let data: Vec<_> = events.iter().map(|e| e.data.clone()).collect();
            assert_eq!(
                data,
                vec![
                    Some("{\"a\":1}".to_string()),
                    None,
                    Some("x\ny".to_string()),
                    Some("[DONE]".to_string())
                ],
                "cut at {cut}"
            );
            let raw: Vec<u8> = events.iter().flat_map(|e| e.raw.to_vec()).collect();
            assert_eq!(raw, stream, "bytes are forwarded unchanged");
            assert_eq!(s.pending(), 0);
            assert_eq!(s.finish(), None);
        }
    }

    #[test]
    fn an_unterminated_tail_is_returned_at_the_end() {
        let mut s = SseSplitter::default();
        assert!(s.push(b"data: partial").is_empty());
        assert_eq!(s.pending(), 13);
        assert_eq!(s.finish().unwrap().data.as_deref(), Some("partial"));
    }
}
