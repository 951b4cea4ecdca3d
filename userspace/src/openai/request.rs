//! The fast reader of a request body: one pass that checks it is a JSON
//! object and finds the members kedge governs by, as raw JSON slices, and a
//! prompt-token count that walks the input without building it. What it
//! finds unusual (a governing member given twice, an escaped key) goes to
//! serde's borrowed view; the tests hold both to the same verdicts.

use std::ops::Range;

use super::{
    Endpoint,
    scan::{Read, Scanner, Unusual},
};
use crate::tokens::{self, TOKENS_PER_MESSAGE, TOKENS_REPLY_PRIMER};

/// The governing members of a body as JSON text (`None`: absent).
#[derive(Default)]
pub struct Members<'a> {
    pub model: Option<&'a str>,
    /// Where `model`'s value lies in the body.
    pub model_span: Option<Range<usize>>,
    pub messages: Option<&'a str>,
    pub prompt: Option<&'a str>,
    pub input: Option<&'a str>,
    pub stream: Option<&'a str>,
    pub stream_options: Option<&'a str>,
    pub max_completion_tokens: Option<&'a str>,
    pub max_tokens: Option<&'a str>,
}

/// The members of a request body, if it is a JSON object of the usual kind.
pub fn members(json: &[u8]) -> Read<Members<'_>> {
    let mut s = Scanner::new(json);
    let mut m = Members::default();
    s.object(0, |s, key| {
        let slot = match key {
            b"model" => &mut m.model,
            b"messages" => &mut m.messages,
            b"prompt" => &mut m.prompt,
            b"input" => &mut m.input,
            b"stream" => &mut m.stream,
            b"stream_options" => &mut m.stream_options,
            b"max_completion_tokens" => &mut m.max_completion_tokens,
            b"max_tokens" => &mut m.max_tokens,
            _ => return s.skip(1),
        };
        if slot.is_some() {
            return Err(Unusual);
        }
        let span = s.value_span(1)?;
        // Strings were checked to be UTF-8, everything else is ASCII.
        *slot = Some(std::str::from_utf8(&s.b[span.clone()]).map_err(|_| Unusual)?);
        if key == b"model" {
            m.model_span = Some(span);
        }
        Ok(())
    })?;
    s.end()?;
    Ok(m)
}

/// Prompt tokens of the endpoint's input member (valid JSON text), as
/// [`tokens::estimate_prompt`] counts them.
pub fn prompt_tokens(endpoint: Endpoint, input: &str) -> Read<u64> {
    let mut s = Scanner::new(input.as_bytes());
    let n = match endpoint {
        Endpoint::ChatCompletions => s.messages()?,
        Endpoint::Completions | Endpoint::Embeddings => s.text_tokens(1)?,
    };
    s.end()?;
    Ok(n)
}

impl Scanner<'_> {
    /// Where the next value lies (after whitespace), passed over.
    fn value_span(&mut self, depth: u32) -> Read<Range<usize>> {
        self.ws();
        let start = self.i;
        self.skip(depth)?;
        Ok(start..self.i)
    }

    /// Chat `messages`: framing per message plus its content and name; a
    /// value that is not an array counts only the reply primer.
    fn messages(&mut self) -> Read<u64> {
        if self.peek()? != b'[' {
            self.skip(0)?;
            return Ok(TOKENS_REPLY_PRIMER);
        }
        let mut total = TOKENS_REPLY_PRIMER;
        self.array(0, |s| {
            total += s.chat_message()?;
            Ok(())
        })?;
        Ok(total)
    }

    /// One message: its `content` as text and its `name` if a string (the
    /// last of a repeated key counts, as in a parsed object).
    fn chat_message(&mut self) -> Read<u64> {
        if self.peek()? != b'{' {
            self.skip(1)?;
            return Ok(TOKENS_PER_MESSAGE);
        }
        let (mut content, mut name) = (0, 0);
        self.object(1, |s, key| {
            match key {
                b"content" => content = s.text_tokens(2)?,
                b"name" if s.peek()? == b'"' => name = tokens::count_bytes(s.text_len()?),
                b"name" => {
                    name = 0;
                    s.skip(2)?;
                }
                _ => s.skip(2)?,
            }
            Ok(())
        })?;
        Ok(TOKENS_PER_MESSAGE + content + name)
    }

    /// A string, an array of strings or token ids, or content parts.
    fn text_tokens(&mut self, depth: u32) -> Read<u64> {
        match self.peek()? {
            b'"' => Ok(tokens::count_bytes(self.text_len()?)),
            b'[' => {
                let mut total = 0;
                self.array(depth, |s| {
                    total += s.text_tokens(depth + 1)?;
                    Ok(())
                })?;
                Ok(total)
            }
            b'{' => {
                let mut text = 0;
                self.object(depth, |s, key| {
                    if key == b"text" {
                        text = s.text_tokens(depth + 1)?;
                    } else {
                        s.skip(depth + 1)?;
                    }
                    Ok(())
                })?;
                Ok(text)
            }
            b't' | b'f' | b'n' => self.skip(depth).map(|()| 0),
            // A pre-tokenized prompt: each number is one token.
            _ => self.number().map(|()| 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{XorShift, json_value};

    /// The one-pass count equals serde's visitor wherever it counts.
    fn agree(endpoint: Endpoint, input: &str) -> bool {
        let serde =
            tokens::estimate_prompt(endpoint, &mut serde_json::Deserializer::from_str(input));
        match prompt_tokens(endpoint, input) {
            Ok(n) => {
                assert_eq!(Some(n), serde.ok(), "{input}");
                true
            }
            Err(Unusual) => false,
        }
    }

    #[test]
    fn counts_like_the_serde_visitor() {
        let chat = r#"[{"role":"system","content":"be brief","name":"ab\u00e9"},
            {"role":"user","content":[{"type":"text","text":"hello there"},{"type":"image_url"}]},
            "odd", 7, null, [1], {"content":null,"name":5,"content":"abcd"}]"#;
        assert!(agree(Endpoint::ChatCompletions, chat));
        for prompt in [
            r#""abcde""#,
            r#"["abcd","efghi",[1,2,3],{"text":"xy"}]"#,
            "42",
            "true",
        ] {
            assert!(agree(Endpoint::Completions, prompt));
        }
        // A key hidden behind an escape is serde's to read.
        assert!(!agree(Endpoint::Completions, r#"{"t\u0065xt":"abcd"}"#));
    }

    #[test]
    fn random_inputs_count_alike() {
        const KEYS: [&str; 5] = ["content", "name", "text", "role", "type"];
        const LEAVES: [&str; 9] = [
            "\"\"",
            "\"abcde\"",
            "\"\\u00e9\\ud83d\\ude00\"",
            "3",
            "-1.5e2",
            "true",
            "null",
            "\"x\\\"y\"",
            "\"\\u0041\"",
        ];
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let mut counted = 0;
        for _ in 0..20_000 {
            let mut input = String::new();
            json_value(&mut rng, &KEYS, &LEAVES, 5, &mut input);
            for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions] {
                counted += agree(endpoint, &input) as u32;
            }
        }
        assert!(counted > 35_000, "counted {counted} of 40000");
    }
}
