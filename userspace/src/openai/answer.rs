//! The fast reader of an answer's [`AnswerFacts`]: one pass over the bytes
//! that checks they are JSON and picks out `usage` and the generated text of
//! `choices`, building nothing and copying nothing. Every stream event and
//! every whole answer goes through it, so it is what a request's metering
//! costs (serde's typed view spent most of its time skipping and validating
//! the members kedge does not read).
//!
//! It reads exactly the shapes OpenAI-compatible servers send. Anything else
//! — a member of an unexpected type, a repeated member kedge reads, an
//! escaped key, a nesting deeper than serde's limit — is [`Unusual`], and the
//! caller asks serde instead, which decides both the shape's meaning and
//! whether the bytes are JSON at all. A test holds the two to the same facts.

use super::{
    AnswerFacts, Usage,
    scan::{Read, Scanner, Unusual},
};

/// The facts of an answer, if it has the usual shape.
pub fn facts(json: &[u8]) -> Read<AnswerFacts> {
    facts_and_text(json).map(|(facts, _)| facts)
}

/// Where the last text string [`facts`] counted lies in the answer: the
/// range of its JSON string token, quotes included, and what it counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextSpan {
    pub start: usize,
    pub end: usize,
    pub bytes: u64,
}

/// [`facts`], and the span of the last text string it counted (none when
/// every text member was `null` or tool calls).
pub fn facts_and_text(json: &[u8]) -> Read<(AnswerFacts, Option<TextSpan>)> {
    let mut s = Scanner::new(json);
    let mut last_text = None;
    let mut choices: Option<Choices> = None;
    let mut usage: Option<Option<UsageFields>> = None;
    s.object(0, |s, key| {
        match key {
            b"choices" => {
                if choices.is_some() {
                    return Err(Unusual);
                }
                choices = Some(s.choices(&mut last_text)?);
            }
            b"usage" => {
                if usage.is_some() {
                    return Err(Unusual);
                }
                usage = Some(s.usage()?);
            }
            _ => s.skip(1)?,
        }
        Ok(())
    })?;
    s.end()?;
    let choices = choices.unwrap_or(Choices {
        present: false,
        count: 0,
        text_bytes: 0,
    });
    let usage = usage.flatten();
    let facts = AnswerFacts {
        usage: usage.and_then(|u| {
            Some(Usage {
                prompt_tokens: u.prompt_tokens?,
                completion_tokens: u.completion_tokens.unwrap_or(0),
                reported: true,
            })
        }),
        text_bytes: choices.text_bytes,
        usage_only: usage.is_some() && choices.present && choices.count == 0,
    };
    Ok((facts, last_text))
}

/// `choices` as read: whether it was there (not `null`), how many, their text.
struct Choices {
    present: bool,
    count: usize,
    text_bytes: u64,
}

#[derive(Clone, Copy)]
struct UsageFields {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

impl Scanner<'_> {
    fn choices(&mut self, last_text: &mut Option<TextSpan>) -> Read<Choices> {
        let mut c = Choices {
            present: false,
            count: 0,
            text_bytes: 0,
        };
        if self.null()? {
            return Ok(c);
        }
        c.present = true;
        self.array(1, |s| {
            c.count += 1;
            c.text_bytes += s.choice(last_text)?;
            Ok(())
        })?;
        Ok(c)
    }

    /// One choice: its `text`, and the text of its `delta` and `message`.
    fn choice(&mut self, last_text: &mut Option<TextSpan>) -> Read<u64> {
        let mut seen = [false; 3];
        let mut total = 0;
        self.object(2, |s, key| {
            let slot = match key {
                b"text" => 0,
                b"delta" => 1,
                b"message" => 2,
                _ => return s.skip(3),
            };
            if std::mem::replace(&mut seen[slot], true) {
                return Err(Unusual);
            }
            total += if slot == 0 {
                s.counted_text(last_text)?
            } else {
                s.message(last_text)?
            };
            Ok(())
        })?;
        Ok(total)
    }

    /// A message or delta: content, reasoning and tool calls; `null` is none.
    fn message(&mut self, last_text: &mut Option<TextSpan>) -> Read<u64> {
        if self.null()? {
            return Ok(0);
        }
        let mut seen = [false; 3];
        let mut total = 0;
        self.object(3, |s, key| {
            let slot = match key {
                b"content" => 0,
                b"reasoning_content" => 1,
                b"tool_calls" => 2,
                _ => return s.skip(4),
            };
            if std::mem::replace(&mut seen[slot], true) {
                return Err(Unusual);
            }
            total += match slot {
                2 if s.null()? => 0,
                2 => s.raw_len(4)?,
                _ => s.counted_text(last_text)?,
            };
            Ok(())
        })?;
        Ok(total)
    }

    /// A text member's length ([`Scanner::text_len`]); a string's span is
    /// kept in `last_text`.
    fn counted_text(&mut self, last_text: &mut Option<TextSpan>) -> Read<u64> {
        let quoted = self.peek()? == b'"';
        let start = self.i;
        let bytes = self.text_len()?;
        if quoted {
            *last_text = Some(TextSpan {
                start,
                end: self.i,
                bytes,
            });
        }
        Ok(bytes)
    }

    /// `usage`: `None` for `null`.
    fn usage(&mut self) -> Read<Option<UsageFields>> {
        if self.null()? {
            return Ok(None);
        }
        let mut u = UsageFields {
            prompt_tokens: None,
            completion_tokens: None,
        };
        let mut seen = [false; 2];
        self.object(1, |s, key| {
            let slot = match key {
                b"prompt_tokens" => 0,
                b"completion_tokens" => 1,
                _ => return s.skip(2),
            };
            if std::mem::replace(&mut seen[slot], true) {
                return Err(Unusual);
            }
            let n = s.count()?;
            if slot == 0 {
                u.prompt_tokens = n;
            } else {
                u.completion_tokens = n;
            }
            Ok(())
        })?;
        Ok(Some(u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        openai::read_answer_serde,
        test_support::{XorShift, damage, json_value},
    };

    /// The fast reader either agrees with serde or leaves the bytes to it.
    fn agrees(json: &[u8]) -> bool {
        match facts(json) {
            Ok(fast) => {
                assert_eq!(
                    Some(fast),
                    read_answer_serde(json),
                    "{}",
                    String::from_utf8_lossy(json)
                );
                true
            }
            Err(Unusual) => false,
        }
    }

    #[test]
    fn reads_what_servers_send_and_agrees_with_serde() {
        for json in [
            // vLLM / OpenAI whole answer.
            &br#"{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello \"you\" \u00e9\ud83d\ude00","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},"finish_reason":"stop","logprobs":null}],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,"prompt_tokens_details":{"cached_tokens":0}}}"#[..],
            // Stream chunks: content, reasoning, the usage-only one, null usage.
            br#"{"choices":[{"delta":{"content":"Hi","reasoning_content":null},"index":0,"finish_reason":null}],"usage":null}"#,
            br#"{"choices":[{"delta":{"reasoning_content":"think"}}]}"#,
            br#"{"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#,
            br#" { "choices" : [ { "text" : "legacy" , "index" : 0 } ] , "usage" : { "prompt_tokens" : 1 } } "#,
            br#"{"choices":[{"delta":{"tool_calls":null,"content":null}}],"usage":{}}"#,
            br#"{"data":[{"embedding":[0.1,-2e-3,3E+2,0]}],"usage":{"prompt_tokens":4,"total_tokens":4}}"#,
            br#"{}"#,
            br#"{"choices":null,"usage":{"prompt_tokens":0,"completion_tokens":null}}"#,
        ] {
            assert!(agrees(json), "the fast path should read {}", String::from_utf8_lossy(json));
        }
    }

    #[test]
    fn leaves_odd_shapes_and_non_json_to_serde() {
        for json in [
            &br#"[1]"#[..],
            br#"{"choices":[1]}"#,
            br#"{"choices":[{"text":5}]}"#,
            br#"{"usage":{"prompt_tokens":1.5}}"#,
            br#"{"usage":{"prompt_tokens":-1}}"#,
            br#"{"usage":{"prompt_tokens":1,"prompt_tokens":2}}"#,
            br#"{"usage":null,"usage":{"prompt_tokens":2}}"#,
            br#"{"\u0075sage":{"prompt_tokens":2}}"#,
            br#"{"choices":[{"delta":["x"]}]}"#,
            br#"{"x":"\ud800"}"#,
            br#"{"x":"tab	inside"}"#,
            br#"{"x":01}"#,
            br#"{"x":1.}"#,
            br#"{"x":tru}"#,
            br#"{"x":1} extra"#,
            br#"{"x":1"#,
            b"{\"x\":\"\xff\"}",
            br#"[DONE]"#,
            b"",
        ] {
            assert!(
                !agrees(json),
                "should be left to serde: {}",
                String::from_utf8_lossy(json)
            );
        }
        let deep = format!("{{\"x\":{}1{}}}", "[".repeat(200), "]".repeat(200));
        assert!(!agrees(deep.as_bytes()));
    }

    /// Random documents around the shapes kedge reads, and random damage to
    /// them: whatever the fast reader accepts, serde reads the same way.
    #[test]
    fn random_documents_agree_with_serde() {
        const KEYS: [&str; 12] = [
            "choices",
            "usage",
            "delta",
            "message",
            "text",
            "content",
            "reasoning_content",
            "tool_calls",
            "prompt_tokens",
            "completion_tokens",
            "id",
            "index",
        ];
        const LEAVES: [&str; 15] = [
            "\"\"",
            "\"ab\"",
            "\"\\u00e9\\n\"",
            "\"\\ud83d\\ude00\"",
            "\"x\\\"y\"",
            "0",
            "7",
            "12345678901234567890",
            "-3",
            "2.5",
            "1e3",
            "null",
            "null",
            "true",
            "false",
        ];
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let (mut read, mut total) = (0, 0);
        for _ in 0..20_000 {
            // Mostly objects at the top, as answers are.
            let mut doc = String::new();
            if rng.below(4) == 0 {
                json_value(&mut rng, &KEYS, &LEAVES, 4, &mut doc);
            } else {
                doc.push('{');
                for i in 0..rng.below(4) {
                    if i > 0 {
                        doc.push(',');
                    }
                    doc.push_str(&format!("\"{}\":", rng.pick(&KEYS)));
                    json_value(&mut rng, &KEYS, &LEAVES, 3, &mut doc);
                }
                doc.push('}');
            }
            let mut doc = doc.into_bytes();
            if rng.below(3) == 0 {
                damage(&mut rng, &mut doc);
            }
            total += 1;
            read += agrees(&doc) as u32;
        }
        assert!(
            read > total / 4,
            "the fast path read only {read} of {total}"
        );
    }
}
