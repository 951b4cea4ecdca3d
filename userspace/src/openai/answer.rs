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

use super::{AnswerFacts, Usage};

/// The fast path cannot read these bytes; serde decides.
#[derive(Debug)]
pub struct Unusual;

type Read<T> = Result<T, Unusual>;

/// serde_json's default recursion limit: deeper documents are its to refuse.
const MAX_DEPTH: u32 = 128;

/// The facts of an answer, if it has the usual shape.
pub fn facts(json: &[u8]) -> Read<AnswerFacts> {
    let mut s = Scanner { b: json, i: 0 };
    let mut choices: Option<Choices> = None;
    let mut usage: Option<Option<UsageFields>> = None;
    s.object(0, |s, key| {
        match key {
            b"choices" => {
                if choices.is_some() {
                    return Err(Unusual);
                }
                choices = Some(s.choices()?);
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
    Ok(AnswerFacts {
        usage: usage.and_then(|u| {
            Some(Usage {
                prompt_tokens: u.prompt_tokens?,
                completion_tokens: u.completion_tokens.unwrap_or(0),
                reported: true,
            })
        }),
        text_bytes: choices.text_bytes,
        usage_only: usage.is_some() && choices.present && choices.count == 0,
    })
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

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn ws(&mut self) {
        while let Some(c) = self.b.get(self.i)
            && matches!(c, b' ' | b'\n' | b'\r' | b'\t')
        {
            self.i += 1;
        }
    }

    /// The next byte after whitespace, not consumed.
    fn peek(&mut self) -> Read<u8> {
        self.ws();
        self.b.get(self.i).copied().ok_or(Unusual)
    }

    fn eat(&mut self, c: u8) -> Read<()> {
        if self.peek()? != c {
            return Err(Unusual);
        }
        self.i += 1;
        Ok(())
    }

    /// Only whitespace is left.
    fn end(&mut self) -> Read<()> {
        self.ws();
        if self.i == self.b.len() {
            Ok(())
        } else {
            Err(Unusual)
        }
    }

    /// `null`, consumed, if it is next.
    fn null(&mut self) -> Read<bool> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Ok(true);
        }
        Ok(false)
    }

    fn literal(&mut self, lit: &[u8]) -> Read<()> {
        if self.b[self.i..].starts_with(lit) {
            self.i += lit.len();
            Ok(())
        } else {
            Err(Unusual)
        }
    }

    /// An object; `member` is called with each key, positioned at its value,
    /// and must consume the value. Escaped keys are unusual (a key kedge
    /// reads could hide behind an escape).
    fn object(
        &mut self,
        depth: u32,
        mut member: impl FnMut(&mut Self, &[u8]) -> Read<()>,
    ) -> Read<()> {
        if depth >= MAX_DEPTH {
            return Err(Unusual);
        }
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.i += 1;
            return Ok(());
        }
        loop {
            if self.peek()? != b'"' {
                return Err(Unusual);
            }
            let (start, end, escaped) = self.string()?;
            if escaped {
                return Err(Unusual);
            }
            self.eat(b':')?;
            let key = &self.b[start..end];
            member(self, key)?;
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(Unusual),
            }
        }
    }

    /// An array; `item` consumes each element.
    fn array(&mut self, depth: u32, mut item: impl FnMut(&mut Self) -> Read<()>) -> Read<()> {
        if depth >= MAX_DEPTH {
            return Err(Unusual);
        }
        self.eat(b'[')?;
        if self.peek()? == b']' {
            self.i += 1;
            return Ok(());
        }
        loop {
            item(self)?;
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(Unusual),
            }
        }
    }

    /// A string at `i` (its opening quote): the range of its raw content and
    /// whether it holds escapes. Control characters are not JSON; non-ASCII
    /// bytes must be UTF-8.
    fn string(&mut self) -> Read<(usize, usize, bool)> {
        self.i += 1;
        let start = self.i;
        let (mut escaped, mut wide) = (false, false);
        loop {
            self.i = plain_run(self.b, self.i);
            let c = *self.b.get(self.i).ok_or(Unusual)?;
            match CLASS[c as usize] {
                QUOTE => break,
                WIDE => {
                    wide = true;
                    while self
                        .b
                        .get(self.i)
                        .is_some_and(|c| CLASS[*c as usize] == WIDE)
                    {
                        self.i += 1;
                    }
                }
                BACKSLASH => {
                    escaped = true;
                    self.i += 1;
                    match self.b.get(self.i).ok_or(Unusual)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                        b'u' => {
                            let hex = self.b.get(self.i + 1..self.i + 5).ok_or(Unusual)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return Err(Unusual);
                            }
                            self.i += 5;
                        }
                        _ => return Err(Unusual),
                    }
                }
                _ => return Err(Unusual),
            }
        }
        let end = self.i;
        self.i += 1;
        if wide {
            std::str::from_utf8(&self.b[start..end]).map_err(|_| Unusual)?;
        }
        if escaped {
            // Surrogates must pair up; rare enough to check apart.
            decoded_len(&self.b[start..end])?;
        }
        Ok((start, end, escaped))
    }

    /// A string's length in UTF-8 bytes once its escapes are decoded; `null`
    /// is 0. Anything else is unusual (the typed view wants a string).
    fn text_len(&mut self) -> Read<u64> {
        if self.null()? {
            return Ok(0);
        }
        if self.peek()? != b'"' {
            return Err(Unusual);
        }
        let (start, end, escaped) = self.string()?;
        if !escaped {
            return Ok((end - start) as u64);
        }
        decoded_len(&self.b[start..end])
    }

    fn number(&mut self) -> Read<()> {
        let digits = |s: &mut Self| {
            let from = s.i;
            while s.b.get(s.i).is_some_and(u8::is_ascii_digit) {
                s.i += 1;
            }
            s.i - from
        };
        if self.b[self.i] == b'-' {
            self.i += 1;
        }
        match self.b.get(self.i) {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(Unusual),
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if digits(self) == 0 {
                return Err(Unusual);
            }
        }
        if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if digits(self) == 0 {
                return Err(Unusual);
            }
        }
        Ok(())
    }

    /// A count: `null` or a plain non-negative integer that fits a u64.
    fn count(&mut self) -> Read<Option<u64>> {
        if self.null()? {
            return Ok(None);
        }
        let mut n = 0u64;
        let start = self.i;
        while let Some(d) = self.b.get(self.i).filter(|c| c.is_ascii_digit()) {
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(d - b'0')))
                .ok_or(Unusual)?;
            self.i += 1;
        }
        let digits = self.i - start;
        // A leading zero, a sign, a fraction or an exponent: not a plain count.
        let next = self.b.get(self.i).copied().unwrap_or(b' ');
        if digits == 0 || (digits > 1 && self.b[start] == b'0') || b".eE".contains(&next) {
            return Err(Unusual);
        }
        Ok(Some(n))
    }

    /// Any value, checked and passed over.
    fn skip(&mut self, depth: u32) -> Read<()> {
        match self.peek()? {
            b'{' => self.object(depth, |s, _| s.skip(depth + 1)),
            b'[' => self.array(depth, |s| s.skip(depth + 1)),
            b'"' => self.string().map(drop),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number(),
        }
    }

    /// Length of the raw JSON of any value (tool calls count as sent).
    fn raw_len(&mut self, depth: u32) -> Read<u64> {
        self.ws();
        let start = self.i;
        self.skip(depth)?;
        Ok((self.i - start) as u64)
    }

    fn choices(&mut self) -> Read<Choices> {
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
            c.text_bytes += s.choice()?;
            Ok(())
        })?;
        Ok(c)
    }

    /// One choice: its `text`, and the text of its `delta` and `message`.
    fn choice(&mut self) -> Read<u64> {
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
                s.text_len()?
            } else {
                s.message()?
            };
            Ok(())
        })?;
        Ok(total)
    }

    /// A message or delta: content, reasoning and tool calls; `null` is none.
    fn message(&mut self) -> Read<u64> {
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
                _ => s.text_len()?,
            };
            Ok(())
        })?;
        Ok(total)
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

/// Where the run of plain string bytes from `i` ends: the first quote,
/// backslash, control or non-ASCII byte, or the end. Eight bytes at a time
/// (a flag bit per byte, the lowest set one exact), since most of an
/// answer's bytes are inside strings.
fn plain_run(b: &[u8], mut i: usize) -> usize {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES * 0x80;
    while let Some(word) = b.get(i..i + 8) {
        let x = u64::from_le_bytes(word.try_into().unwrap_or_default());
        let quote = x ^ (ONES * b'"' as u64);
        let backslash = x ^ (ONES * b'\\' as u64);
        let flagged = (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (x.wrapping_sub(ONES * 0x20) & !x)
            | x;
        let special = flagged & HIGH;
        if special != 0 {
            return i + (special.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while b.get(i).is_some_and(|c| CLASS[*c as usize] == PLAIN) {
        i += 1;
    }
    i
}

/// Byte classes inside a JSON string.
const PLAIN: u8 = 0;
const QUOTE: u8 = 1;
const BACKSLASH: u8 = 2;
const CONTROL: u8 = 3;
const WIDE: u8 = 4;

const CLASS: [u8; 256] = {
    let mut t = [PLAIN; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = match c {
            0..0x20 => CONTROL,
            0x22 => QUOTE,
            0x5c => BACKSLASH,
            0x80.. => WIDE,
            _ => PLAIN,
        };
        c += 1;
    }
    t
};

/// UTF-8 length of an escaped string's content (valid escapes, checked).
/// A lone surrogate is unusual: serde refuses it.
fn decoded_len(raw: &[u8]) -> Read<u64> {
    let mut len = 0u64;
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' {
            len += 1;
            i += 1;
            continue;
        }
        if raw[i + 1] != b'u' {
            len += 1;
            i += 2;
            continue;
        }
        let unit = hex4(&raw[i + 2..i + 6])?;
        i += 6;
        len += match unit {
            0..0x80 => 1,
            0x80..0x800 => 2,
            0xD800..0xDC00 => {
                // A high surrogate must be followed by an escaped low one.
                let low = raw.get(i..i + 6).ok_or(Unusual)?;
                if low[..2] != *b"\\u" || !(0xDC00..0xE000).contains(&hex4(&low[2..])?) {
                    return Err(Unusual);
                }
                i += 6;
                4
            }
            0xDC00..0xE000 => return Err(Unusual),
            _ => 3,
        };
    }
    Ok(len)
}

fn hex4(digits: &[u8]) -> Read<u32> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| u32::from_str_radix(d, 16).ok())
        .ok_or(Unusual)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::read_answer_serde;

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
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let (mut read, mut total) = (0, 0);
        for _ in 0..20_000 {
            let mut doc = Vec::new();
            document(&mut next, &mut doc, 0);
            if next().is_multiple_of(3) && !doc.is_empty() {
                // Damage: flip, drop or duplicate a byte.
                let at = (next() % doc.len() as u64) as usize;
                match next() % 3 {
                    0 => {
                        const NOISE: &[u8] = b"{}[],:\"\\ 0-.eu";
                        doc[at] = NOISE[(next() % NOISE.len() as u64) as usize];
                    }
                    1 => {
                        doc.remove(at);
                    }
                    _ => doc.insert(at, doc[at]),
                }
            }
            total += 1;
            read += agrees(&doc) as u32;
        }
        assert!(
            read > total / 4,
            "the fast path read only {read} of {total}"
        );
    }

    fn document(next: &mut impl FnMut() -> u64, out: &mut Vec<u8>, depth: u32) {
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
        let pick = next() % 10;
        match pick {
            0..=3 if depth < 4 => {
                out.push(b'{');
                for i in 0..next() % 4 {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.push(b'"');
                    out.extend_from_slice(KEYS[(next() % KEYS.len() as u64) as usize].as_bytes());
                    out.extend_from_slice(b"\":");
                    document(next, out, depth + 1);
                }
                out.push(b'}');
            }
            4 | 5 if depth < 4 => {
                out.push(b'[');
                for i in 0..next() % 3 {
                    if i > 0 {
                        out.extend_from_slice(b", ");
                    }
                    document(next, out, depth + 1);
                }
                out.push(b']');
            }
            6 => {
                const STRINGS: [&str; 5] = [
                    "\"\"",
                    "\"ab\"",
                    "\"\\u00e9\\n\"",
                    "\"\\ud83d\\ude00\"",
                    "\"x\\\"y\"",
                ];
                out.extend_from_slice(STRINGS[(next() % 5) as usize].as_bytes());
            }
            7 => {
                const NUMBERS: [&str; 6] = ["0", "7", "12345678901234567890", "-3", "2.5", "1e3"];
                out.extend_from_slice(NUMBERS[(next() % 6) as usize].as_bytes());
            }
            8 => out.extend_from_slice(b"null"),
            _ => out.extend_from_slice(if next().is_multiple_of(2) {
                b"true"
            } else {
                b"false"
            }),
        }
    }
}
