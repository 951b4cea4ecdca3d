//! A validating, non-allocating JSON walker for the bodies on the request
//! path: the request kedge governs and every answer (or stream event) it
//! meters. Callers walk the members they read and skip the rest, which is
//! still checked to be JSON. Whatever the walker is not sure of — a shape it
//! does not expect, an escaped key, a nesting deeper than serde's limit — is
//! [`Unusual`], and the caller asks serde instead, which decides both what
//! the shape means and whether the bytes are JSON at all.

/// The fast path cannot read these bytes; serde decides.
#[derive(Debug)]
pub struct Unusual;

pub type Read<T> = Result<T, Unusual>;

/// serde_json's default recursion limit: deeper documents are its to refuse.
pub const MAX_DEPTH: u32 = 128;

pub struct Scanner<'a> {
    pub b: &'a [u8],
    pub i: usize,
}

impl<'a> Scanner<'a> {
    pub fn new(b: &'a [u8]) -> Scanner<'a> {
        Scanner { b, i: 0 }
    }

    pub(super) fn ws(&mut self) {
        while let Some(c) = self.b.get(self.i)
            && matches!(c, b' ' | b'\n' | b'\r' | b'\t')
        {
            self.i += 1;
        }
    }

    /// The next byte after whitespace, not consumed.
    pub(super) fn peek(&mut self) -> Read<u8> {
        self.ws();
        self.b.get(self.i).copied().ok_or(Unusual)
    }

    pub(super) fn eat(&mut self, c: u8) -> Read<()> {
        if self.peek()? != c {
            return Err(Unusual);
        }
        self.i += 1;
        Ok(())
    }

    /// Only whitespace is left.
    pub(super) fn end(&mut self) -> Read<()> {
        self.ws();
        if self.i == self.b.len() {
            Ok(())
        } else {
            Err(Unusual)
        }
    }

    /// `null`, consumed, if it is next.
    pub(super) fn null(&mut self) -> Read<bool> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Ok(true);
        }
        Ok(false)
    }

    pub(super) fn literal(&mut self, lit: &[u8]) -> Read<()> {
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
    pub(super) fn object(
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
    pub(super) fn array(
        &mut self,
        depth: u32,
        mut item: impl FnMut(&mut Self) -> Read<()>,
    ) -> Read<()> {
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
    pub(super) fn string(&mut self) -> Read<(usize, usize, bool)> {
        let start = self.i + 1;
        let end = plain_run(self.b, start);
        // Nearly every key and most values: plain ASCII up to the quote. The
        // rest is kept out of line, so this path saves and restores little.
        if self.b.get(end) == Some(&b'"') {
            self.i = end + 1;
            return Ok((start, end, false));
        }
        self.i = end;
        self.string_rest(start)
    }

    /// The rest of a string that holds more than plain ASCII, from `i` (its
    /// first byte that is not plain) on.
    #[cold]
    #[inline(never)]
    fn string_rest(&mut self, start: usize) -> Read<(usize, usize, bool)> {
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
    pub(super) fn text_len(&mut self) -> Read<u64> {
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

    pub(super) fn number(&mut self) -> Read<()> {
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
    pub(super) fn count(&mut self) -> Read<Option<u64>> {
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
    pub(super) fn skip(&mut self, depth: u32) -> Read<()> {
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
    pub(super) fn raw_len(&mut self, depth: u32) -> Read<u64> {
        self.ws();
        let start = self.i;
        self.skip(depth)?;
        Ok((self.i - start) as u64)
    }
}

/// Where the run of plain string bytes from `i` ends: the first quote,
/// backslash, control or non-ASCII byte, or the end. Eight bytes at a time
/// (a flag bit per byte, the lowest set one exact), since most of an
/// answer's bytes are inside strings.
pub(crate) fn plain_run(b: &[u8], mut i: usize) -> usize {
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
pub fn decoded_len(raw: &[u8]) -> Read<u64> {
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
