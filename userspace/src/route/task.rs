//! A light, explainable task classifier: what kind of work a request asks for
//! and how demanding it is, from keywords, prompt length and the features it
//! requests (tools, JSON mode). Every label comes with the signals that chose it.

use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Chat,
    Code,
    Summarise,
    Plan,
    /// Structured output: tools or JSON mode requested.
    Extract,
    Embed,
}

impl TaskKind {
    pub fn label(self) -> &'static str {
        match self {
            TaskKind::Chat => "chat",
            TaskKind::Code => "code",
            TaskKind::Summarise => "summarise",
            TaskKind::Plan => "plan",
            TaskKind::Extract => "extract",
            TaskKind::Embed => "embed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Complexity {
    Low,
    Medium,
    High,
}

impl Complexity {
    pub fn label(self) -> &'static str {
        match self {
            Complexity::Low => "low",
            Complexity::Medium => "medium",
            Complexity::High => "high",
        }
    }

    fn bump(self) -> Complexity {
        match self {
            Complexity::Low => Complexity::Medium,
            _ => Complexity::High,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TaskLabel {
    pub kind: TaskKind,
    pub complexity: Complexity,
    /// Why: e.g. `keyword:refactor`, `tools`, `prompt_tokens>4000`.
    pub signals: Vec<String>,
}

const CODE_WORDS: &[&str] = &[
    "```",
    "fn ",
    "def ",
    "class ",
    "function",
    "compile",
    "stack trace",
    "traceback",
    "exception",
    "regex",
    "sql",
    "python",
    "rust",
    "javascript",
    "typescript",
    "bug",
    "refactor",
    "unit test",
];
const SUMMARY_WORDS: &[&str] = &[
    "summarize",
    "summarise",
    "summary",
    "tl;dr",
    "tldr",
    "key points",
];
const PLAN_WORDS: &[&str] = &[
    "plan",
    "roadmap",
    "step by step",
    "strategy",
    "architecture",
    "design a",
];

/// Labels a request body for `endpoint` ("chat", "completions", "embeddings").
pub fn classify(endpoint: &str, body: &Map<String, Value>, prompt_tokens: u64) -> TaskLabel {
    let mut signals = Vec::new();
    if endpoint == "embeddings" {
        return TaskLabel {
            kind: TaskKind::Embed,
            complexity: Complexity::Low,
            signals: vec!["endpoint:embeddings".into()],
        };
    }
    let structured = body
        .get("tools")
        .is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()))
        || body.get("functions").is_some()
        || body
            .get("response_format")
            .and_then(|f| f.get("type"))
            .and_then(Value::as_str)
            .is_some_and(|t| t.starts_with("json"));
    let text = last_user_text(body).to_lowercase();
    let hit = |words: &[&str], signals: &mut Vec<String>| -> bool {
        match words.iter().find(|w| contains_word(&text, w)) {
            Some(w) => {
                signals.push(format!("keyword:{}", w.trim()));
                true
            }
            None => false,
        }
    };
    let kind = if structured {
        signals.push("tools_or_json_mode".into());
        TaskKind::Extract
    } else if hit(CODE_WORDS, &mut signals) {
        TaskKind::Code
    } else if hit(SUMMARY_WORDS, &mut signals) {
        TaskKind::Summarise
    } else if hit(PLAN_WORDS, &mut signals) {
        TaskKind::Plan
    } else {
        TaskKind::Chat
    };
    let mut complexity = match prompt_tokens {
        0..500 => Complexity::Low,
        500..4000 => Complexity::Medium,
        _ => Complexity::High,
    };
    signals.push(format!("prompt_tokens:{prompt_tokens}"));
    if matches!(kind, TaskKind::Code | TaskKind::Plan)
        && complexity == Complexity::Low
        && text.len() > 400
    {
        complexity = complexity.bump();
        signals.push("long_instruction".into());
    }
    TaskLabel {
        kind,
        complexity,
        signals,
    }
}

/// `word` in `text`; single alphanumeric words only at word boundaries, so
/// "plan" does not match "explain".
fn contains_word(text: &str, word: &str) -> bool {
    if !word.chars().all(char::is_alphanumeric) {
        return text.contains(word);
    }
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    })
}

impl TaskLabel {
    /// For policies that do not look at the task: plain chat, no signals.
    pub fn unclassified() -> TaskLabel {
        TaskLabel {
            kind: TaskKind::Chat,
            complexity: Complexity::Low,
            signals: Vec::new(),
        }
    }
}

/// The text of the last user message (chat) or the prompt (completions).
fn last_user_text(body: &Map<String, Value>) -> String {
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        let last = messages
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"));
        return match last.and_then(|m| m.get("content")) {
            Some(Value::String(s)) => s.clone(),
            // Content parts: concatenate the text parts.
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        };
    }
    match body.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn label(endpoint: &str, body: &Value, prompt_tokens: u64) -> TaskLabel {
        classify(
            endpoint,
            body.as_object().expect("a JSON object"),
            prompt_tokens,
        )
    }

    fn chat(text: &str) -> Value {
        json!({"model": "m", "messages": [
            {"role": "system", "content": "You summarise everything."},
            {"role": "user", "content": text}
        ]})
    }

    #[test]
    fn labels_by_keywords_of_the_last_user_message() {
        let l = label("chat", &chat("Please refactor this"), 20);
        assert_eq!(l.kind, TaskKind::Code);
        assert!(
            l.signals.contains(&"keyword:refactor".to_string()),
            "{:?}",
            l.signals
        );
        // The system prompt says "summarise" but the user asks something else.
        assert_eq!(
            label("chat", &chat("How are you today?"), 10).kind,
            TaskKind::Chat
        );
        assert_eq!(
            label("chat", &chat("TL;DR of this article"), 10).kind,
            TaskKind::Summarise
        );
        assert_eq!(
            label("chat", &chat("Make a roadmap for Q3"), 10).kind,
            TaskKind::Plan
        );
        assert_eq!(
            label("chat", &chat("Plan: our offsite"), 10).kind,
            TaskKind::Plan
        );
        // Word boundaries: "explain" is not "plan", "trust" is not "rust".
        assert_eq!(
            label("chat", &chat("explain why I trust you"), 10).kind,
            TaskKind::Chat
        );
    }

    #[test]
    fn tools_and_json_mode_mean_extract() {
        let mut b = chat("refactor");
        b["response_format"] = json!({"type": "json_object"});
        assert_eq!(label("chat", &b, 10).kind, TaskKind::Extract);
        let mut b = chat("hello");
        b["tools"] = json!([{"type": "function", "function": {"name": "f"}}]);
        assert_eq!(label("chat", &b, 10).kind, TaskKind::Extract);
        b["tools"] = json!([]);
        assert_eq!(label("chat", &b, 10).kind, TaskKind::Chat);
    }

    #[test]
    fn complexity_follows_prompt_length() {
        assert_eq!(label("chat", &chat("hi"), 100).complexity, Complexity::Low);
        assert_eq!(
            label("chat", &chat("hi"), 1000).complexity,
            Complexity::Medium
        );
        assert_eq!(
            label("chat", &chat("hi"), 9000).complexity,
            Complexity::High
        );
        let long = format!("Refactor this: {}", "x".repeat(500));
        assert_eq!(
            label("chat", &chat(&long), 100).complexity,
            Complexity::Medium
        );
    }

    #[test]
    fn completions_embeddings_and_content_parts() {
        let b = json!({"model": "m", "prompt": "def f(): pass"});
        assert_eq!(label("completions", &b, 5).kind, TaskKind::Code);
        assert_eq!(
            label("embeddings", &json!({"input": "x"}), 1).kind,
            TaskKind::Embed
        );
        let b = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "summarize it"}]}]});
        assert_eq!(label("chat", &b, 5).kind, TaskKind::Summarise);
    }
}
