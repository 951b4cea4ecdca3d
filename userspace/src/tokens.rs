//! Token counting for when an upstream reports no usage.
//!
//! A byte-based estimate: one token per four bytes of UTF-8 text, rounded up
//! per piece of text, plus OpenAI's documented per-message framing for chat.
//! Why not a real BPE (tiktoken-rs): it embeds megabytes of rank tables and a
//! backtracking regex engine into the daemon, and it would still be the wrong
//! tokenizer for the local models (Llama, Qwen, Mistral) kedge mostly fronts.
//! Counting only happens when the upstream gives no usage; backends that
//! report usage (and streams where kedge asks for it) are exact.

use serde_json::Value;

use crate::openai::Endpoint;

/// Bytes per token of the estimate (OpenAI's rule of thumb for English).
const BYTES_PER_TOKEN: u64 = 4;
/// Tokens of framing around each chat message (role, separators).
const TOKENS_PER_MESSAGE: u64 = 4;
/// Tokens that prime the assistant's reply in chat.
const TOKENS_REPLY_PRIMER: u64 = 3;

/// Estimated tokens of a piece of generated or prompt text.
pub fn count_text(text: &str) -> u64 {
    count_bytes(text.len() as u64)
}

/// Estimated tokens of `bytes` bytes of UTF-8 text.
pub fn count_bytes(bytes: u64) -> u64 {
    bytes.div_ceil(BYTES_PER_TOKEN)
}

/// Estimated prompt tokens of a validated request body.
pub fn estimate_prompt(endpoint: Endpoint, body: &serde_json::Map<String, Value>) -> u64 {
    match endpoint {
        Endpoint::ChatCompletions => {
            let messages = body.get("messages").and_then(Value::as_array);
            messages
                .into_iter()
                .flatten()
                .map(|m| TOKENS_PER_MESSAGE + text_tokens(m.get("content")) + name_tokens(m))
                .sum::<u64>()
                + TOKENS_REPLY_PRIMER
        }
        Endpoint::Completions => text_tokens(body.get("prompt")),
        Endpoint::Embeddings => text_tokens(body.get("input")),
    }
}

fn name_tokens(message: &Value) -> u64 {
    message
        .get("name")
        .and_then(Value::as_str)
        .map_or(0, count_text)
}

/// Tokens of a string, an array of strings / token ids, or chat content parts.
fn text_tokens(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::String(s)) => count_text(s),
        // A pre-tokenized prompt: each number is one token.
        Some(Value::Number(_)) => 1,
        Some(Value::Array(items)) => items.iter().map(|i| text_tokens(Some(i))).sum(),
        // A content part: {"type":"text","text":"..."}; images etc. are not estimated.
        Some(Value::Object(part)) => text_tokens(part.get("text")),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(s: &str) -> serde_json::Map<String, Value> {
        serde_json::from_str(s).unwrap()
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
        let chat = body(
            r#"{"messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hello there"}]}]}"#,
        );
        // 2 × 4 framing + 2 ("be brief") + 3 ("hello there") + 3 primer.
        assert_eq!(estimate_prompt(Endpoint::ChatCompletions, &chat), 16);
        let prompt = body(r#"{"prompt":["abcd","abcdefgh"]}"#);
        assert_eq!(estimate_prompt(Endpoint::Completions, &prompt), 3);
        let ids = body(r#"{"input":[[1,2,3],[4]]}"#);
        assert_eq!(estimate_prompt(Endpoint::Embeddings, &ids), 4);
    }
}
