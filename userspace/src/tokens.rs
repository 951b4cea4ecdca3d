//! Token counting for when an upstream reports no usage.
//!
//! A byte-based estimate: one token per four bytes of UTF-8 text, rounded up
//! per piece of text, plus OpenAI's documented per-message framing for chat.
//! Why not a real BPE (tiktoken-rs): it embeds megabytes of rank tables and a
//! backtracking regex engine into the daemon, and it would still be the wrong
//! tokenizer for the local models (Llama, Qwen, Mistral) kedge mostly fronts.
//! Counting only happens when the upstream gives no usage; backends that
//! report usage (and streams where kedge asks for it) are exact.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::openai::Endpoint;

/// Bytes per token of the estimate (OpenAI's rule of thumb for English).
const BYTES_PER_TOKEN: u64 = 4;
/// Tokens of framing around each chat message (role, separators).
pub const TOKENS_PER_MESSAGE: u64 = 4;
/// Tokens that prime the assistant's reply in chat.
pub const TOKENS_REPLY_PRIMER: u64 = 3;

/// Estimated tokens of a piece of generated or prompt text.
pub fn count_text(text: &str) -> u64 {
    count_bytes(text.len() as u64)
}

/// Estimated tokens of `bytes` bytes of UTF-8 text.
pub fn count_bytes(bytes: u64) -> u64 {
    bytes.div_ceil(BYTES_PER_TOKEN)
}

/// Estimated prompt tokens of the endpoint's input field (`messages`,
/// `prompt` or `input`), read straight from the JSON: the counter walks the
/// value as it is parsed, so no tree is built and no string is copied (an
/// escaped string is decoded once, to count its UTF-8 bytes).
pub fn estimate_prompt<'de, D: Deserializer<'de>>(
    endpoint: Endpoint,
    input: D,
) -> Result<u64, D::Error> {
    match endpoint {
        Endpoint::ChatCompletions => Count::Messages.deserialize(input),
        Endpoint::Completions | Endpoint::Embeddings => Count::Text.deserialize(input),
    }
}

/// What a value is counted as.
#[derive(Clone, Copy)]
enum Count {
    /// Chat `messages`: framing per message plus its content and name; a
    /// value that is not an array counts nothing but the reply primer.
    Messages,
    /// One chat message: its `content` (as [`Count::Text`]) and `name`.
    Message,
    /// A string, an array of strings or token ids, or content parts
    /// (`{"type":"text","text":"..."}`; images etc. are not estimated).
    Text,
    /// A message's `name`: a string, else nothing.
    Name,
}

impl<'de> DeserializeSeed<'de> for Count {
    type Value = u64;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Count {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        Ok(match self {
            Count::Text | Count::Name => count_text(v),
            Count::Messages => TOKENS_REPLY_PRIMER,
            Count::Message => TOKENS_PER_MESSAGE,
        })
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<u64, E> {
        Ok(self.scalar(1))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<u64, E> {
        Ok(self.scalar(1))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<u64, E> {
        Ok(self.scalar(1))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<u64, E> {
        Ok(self.scalar(0))
    }

    fn visit_unit<E: de::Error>(self) -> Result<u64, E> {
        Ok(self.scalar(0))
    }

    fn visit_none<E: de::Error>(self) -> Result<u64, E> {
        Ok(self.scalar(0))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let (item, base) = match self {
            Count::Messages => (Count::Message, TOKENS_REPLY_PRIMER),
            Count::Text => (Count::Text, 0),
            Count::Message | Count::Name => {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                return Ok(self.scalar(0));
            }
        };
        let mut total = base;
        while let Some(n) = seq.next_element_seed(item)? {
            total += n;
        }
        Ok(total)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        // Per key the last occurrence counts, as in a parsed JSON object.
        let (mut first, mut second) = (0, 0);
        while let Some(key) = map.next_key::<KeyOf>()? {
            match (self, key) {
                (Count::Text, KeyOf::Text) => first = map.next_value_seed(Count::Text)?,
                (Count::Message, KeyOf::Content) => first = map.next_value_seed(Count::Text)?,
                (Count::Message, KeyOf::Name) => second = map.next_value_seed(Count::Name)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(self.scalar(0) + first + second)
    }
}

impl Count {
    /// What a value of no countable shape adds: `text` for a number counted
    /// as text (a token id), the fixed framing otherwise.
    fn scalar(self, text: u64) -> u64 {
        match self {
            Count::Text => text,
            Count::Name => 0,
            Count::Messages => TOKENS_REPLY_PRIMER,
            Count::Message => TOKENS_PER_MESSAGE,
        }
    }
}

/// The object keys the counter looks at.
enum KeyOf {
    Text,
    Content,
    Name,
    Other,
}

impl<'de> serde::Deserialize<'de> for KeyOf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<KeyOf, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = KeyOf;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyOf, E> {
                Ok(match v {
                    "text" => KeyOf::Text,
                    "content" => KeyOf::Content,
                    "name" => KeyOf::Name,
                    _ => KeyOf::Other,
                })
            }
        }
        d.deserialize_identifier(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::Value;

    /// The estimate of `field` in `body`, read from the text as the proxy
    /// does, and from a parsed tree (the fallback path): both must agree.
    fn estimate(endpoint: Endpoint, body: &str, field: &str) -> u64 {
        let tree: Value = serde_json::from_str(body).unwrap();
        let from_tree = estimate_prompt(endpoint, &tree[field]).unwrap();
        let fields: std::collections::HashMap<&str, &serde_json::value::RawValue> =
            serde_json::from_str(body).unwrap();
        let mut de = serde_json::Deserializer::from_str(fields[field].get());
        let from_text = estimate_prompt(endpoint, &mut de).unwrap();
        assert_eq!(from_text, from_tree, "{body}");
        from_text
    }

    #[test]
    fn counts_four_bytes_per_token_rounded_up() {
        assert_eq!(count_text(""), 0);
        assert_eq!(count_text("abc"), 1);
        assert_eq!(count_text("abcd"), 1);
        assert_eq!(count_text("abcde"), 2);
        assert_eq!(count_text("é"), 1);
    }

    #[test]
    fn estimates_chat_completion_and_embedding_prompts() {
        let chat = r#"{"messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hello there"}]}]}"#;
        // 2 × 4 framing + 2 ("be brief") + 3 ("hello there") + 3 primer.
        assert_eq!(estimate(Endpoint::ChatCompletions, chat, "messages"), 16);
        let prompt = r#"{"prompt":["abcd","abcdefgh"]}"#;
        assert_eq!(estimate(Endpoint::Completions, prompt, "prompt"), 3);
        let ids = r#"{"input":[[1,2,3],[4]]}"#;
        assert_eq!(estimate(Endpoint::Embeddings, ids, "input"), 4);
    }

    #[test]
    fn counts_names_escapes_and_odd_shapes() {
        // A name counts; escapes are counted decoded ("é" is 2 bytes: 1 token).
        let named = r#"{"messages":[{"role":"user","name":"abcdefgh","content":"\u00e9"}]}"#;
        assert_eq!(
            estimate(Endpoint::ChatCompletions, named, "messages"),
            4 + 2 + 1 + 3
        );
        // Messages that are not objects get their framing and nothing else;
        // a name that is not a string counts nothing; a null content nothing.
        let odd = r#"{"messages":[1,"x",{"name":7,"content":null},[{"text":"abcd"}]]}"#;
        assert_eq!(
            estimate(Endpoint::ChatCompletions, odd, "messages"),
            4 * 4 + 3
        );
        // Parts without text, booleans and nulls count nothing; a number one.
        let parts = r#"{"prompt":[{"type":"image_url"},true,null,5,{"text":["ab","cd"]}]}"#;
        assert_eq!(estimate(Endpoint::Completions, parts, "prompt"), 1 + 2);
        // A repeated key counts once, its last value (as a parsed object has it).
        let twice = r#"{"prompt":{"text":"abcdefgh","text":"ab"}}"#;
        assert_eq!(estimate(Endpoint::Completions, twice, "prompt"), 1);
    }
}
