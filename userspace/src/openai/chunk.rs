//! The chunks of one stream differ, nearly always, only in their text: the
//! id, model, creation time, index, `finish_reason` and `usage: null` around
//! the `content` string repeat byte for byte. [`ChunkReader`] keeps the last
//! chunk the one-pass reader read and the span of its text; a chunk with the
//! same bytes before and after a string where that text was is read by
//! checking that string alone.
//!
//! Why that is exact: the reader's state where the string starts depends only
//! on the bytes before it (the same), a string value's only facts are whether
//! it is valid and its decoded length, and from the string's end on the
//! reader sees the same bytes in the same state. So the chunk is read as the
//! one-pass reader would read it, with the text's length swapped: nothing
//! before or after the string is taken on trust, it was read last time.

use super::{
    AnswerFacts,
    answer::{self, TextSpan},
    read_answer_serde,
    scan::Scanner,
};

/// Reads the facts of one stream's chunks, in order ([`super::read_answer`]
/// for each, at the cost of the text alone when only the text changed).
#[derive(Default)]
pub struct ChunkReader {
    /// The last chunk the one-pass reader read, while it had a text string.
    last: Vec<u8>,
    /// That string's span in `last` and what the one-pass reader found in
    /// it; `None`: nothing to reuse.
    reusable: Option<(TextSpan, AnswerFacts)>,
}

impl ChunkReader {
    /// The chunk's facts; `None` when it is not JSON.
    pub fn read(&mut self, json: &[u8]) -> Option<AnswerFacts> {
        if let Some(facts) = self.reuse(json) {
            return Some(facts);
        }
        match answer::facts_and_text(json) {
            Ok((facts, text)) => {
                self.reusable = text.map(|span| (span, facts));
                if text.is_some() {
                    self.last.clear();
                    self.last.extend_from_slice(json);
                }
                Some(facts)
            }
            Err(_) => {
                self.reusable = None;
                read_answer_serde(json)
            }
        }
    }

    /// The facts of `json` if it is the last chunk with another valid string
    /// where the text was.
    fn reuse(&self, json: &[u8]) -> Option<AnswerFacts> {
        let (span, facts) = self.reusable?;
        let (before, after) = (&self.last[..span.start], &self.last[span.end..]);
        let end = json.len().checked_sub(after.len())?;
        if end < before.len() + 2 || !json.starts_with(before) || !json.ends_with(after) {
            return None;
        }
        // The string must fill exactly what lies between: it may neither end
        // early nor run on into the repeated bytes.
        let mut s = Scanner::new(&json[..end]);
        s.i = before.len();
        if s.b[s.i] != b'"' {
            return None;
        }
        let bytes = s.text_len().ok()?;
        if s.i != end {
            return None;
        }
        Some(AnswerFacts {
            text_bytes: facts.text_bytes - span.bytes + bytes,
            ..facts
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        openai::read_answer,
        test_support::{XorShift, damage},
    };

    const BEFORE: &str = r#"{"id":"chatcmpl-7","object":"chat.completion.chunk","created":1796246671,"model":"m","choices":[{"index":0,"delta":{"content":"#;
    const AFTER: &str = r#"},"logprobs":null,"finish_reason":null}],"usage":null}"#;

    fn chunk(text: &str) -> Vec<u8> {
        format!("{BEFORE}{text}{AFTER}").into_bytes()
    }

    #[test]
    fn a_chunk_that_differs_only_in_its_text_is_read_from_the_text() {
        let mut r = ChunkReader::default();
        let first = chunk(r#""Hello""#);
        assert_eq!(r.reuse(&first), None, "nothing read yet");
        assert_eq!(r.read(&first).unwrap().text_bytes, 5);
        for (text, bytes) in [
            (r#"" world""#, 6),
            (r#""""#, 0),
            (r#""\u00e9\"\n""#, 4),
            ("\"caf\u{e9}\"", 5),
        ] {
            let next = chunk(text);
            let reused = r.reuse(&next);
            assert!(reused.is_some(), "{text} should be read from the text");
            assert_eq!(reused, read_answer(&next), "{text}");
            assert_eq!(r.read(&next).unwrap().text_bytes, bytes, "{text}");
        }
    }

    #[test]
    fn anything_else_is_read_whole() {
        let mut r = ChunkReader::default();
        r.read(&chunk(r#""Hello""#));
        for text in [
            // Not a string, or not one valid string filling the gap.
            "null",
            "7",
            r#""a","role":"assistant""#,
            r#""a"  "#,
            r#""unterminated\""#,
            r#""\ud800""#,
            "\"tab\tinside\"",
        ] {
            let next = chunk(text);
            assert_eq!(r.reuse(&next), None, "{text}");
        }
        let not_utf8 = [BEFORE.as_bytes(), b"\"\xff\"", AFTER.as_bytes()].concat();
        assert_eq!(r.reuse(&not_utf8), None);
        // A change before or after the text.
        let other = format!(
            r#"{BEFORE}"x"{}"#,
            AFTER.replace("null}", "{\"prompt_tokens\":3}}")
        );
        assert_eq!(r.reuse(other.as_bytes()), None);
        assert_eq!(
            r.read(other.as_bytes())
                .unwrap()
                .usage
                .unwrap()
                .prompt_tokens,
            3
        );
        // A chunk without text forgets the last one: the next is read whole.
        assert_eq!(
            r.read(br#"{"choices":[],"usage":null}"#)
                .unwrap()
                .text_bytes,
            0
        );
        assert_eq!(r.reuse(&chunk(r#""x""#)), None);
    }

    /// Random streams: runs of chunks around a few templates, random texts
    /// (escapes, quotes, non-ASCII, bytes that are not JSON) and random
    /// damage anywhere; every chunk's facts are those of `read_answer`.
    #[test]
    fn random_streams_read_as_read_answer_reads_each_chunk() {
        const TEMPLATES: [(&str, &str); 4] = [
            (BEFORE, AFTER),
            (
                r#"{"choices":[{"delta":{"reasoning_content":"#,
                r#"},"index":0}]}"#,
            ),
            (
                r#"{"choices":[{"text":"#,
                r#","index":0}],"usage":{"prompt_tokens":4,"completion_tokens":2}}"#,
            ),
            (
                r#"{"choices":[{"delta":{"content":"a","tool_calls":null,"reasoning_content":"#,
                r#"}},{"delta":{"content":"b"}}]}"#,
            ),
        ];
        // Mostly texts as servers send them, now and then one that is not.
        const TEXTS: [&str; 6] = [
            r#""tok ""#,
            r#""""#,
            r#""\"q\"""#,
            r#""\u00e9\ud83d\ude00""#,
            "\"\u{e9}t\u{e9}\"",
            r#""long text that runs past eight bytes at a time""#,
        ];
        const ODD_TEXTS: [&str; 6] = [
            r#""\ud800""#,
            r#""a\x""#,
            r#""a","content":"b""#,
            "null",
            r#""end\""#,
            "\"ctl\u{1}\"",
        ];
        let mut rng = XorShift(0x00c0_ffee_d00d);
        let (mut reused, mut total) = (0, 0);
        for _ in 0..500 {
            let mut r = ChunkReader::default();
            let template =
                |rng: &mut XorShift| TEMPLATES[rng.below(TEMPLATES.len() as u64) as usize];
            let (mut before, mut after) = template(&mut rng);
            for _ in 0..20 {
                if rng.below(8) == 0 {
                    (before, after) = template(&mut rng);
                }
                let text = if rng.below(6) == 0 {
                    rng.pick(&ODD_TEXTS)
                } else {
                    rng.pick(&TEXTS)
                };
                let mut json = format!("{before}{text}{after}").into_bytes();
                if rng.below(8) == 0 {
                    damage(&mut rng, &mut json);
                }
                total += 1;
                reused += r.reuse(&json).is_some() as u32;
                assert_eq!(
                    r.read(&json),
                    read_answer(&json),
                    "{}",
                    String::from_utf8_lossy(&json)
                );
            }
        }
        assert!(
            reused > total / 4,
            "only {reused} of {total} chunks were read from their text"
        );
    }
}
