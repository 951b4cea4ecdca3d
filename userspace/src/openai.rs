//! The slice of the OpenAI protocol kedge must understand: which endpoint a
//! request is for, the fields that govern it, usage in answers, and errors.
//!
//! Everything else in a body passes through untouched: kedge parses into a
//! JSON map and only edits `model` and `stream_options`.

use hyper::StatusCode;
use serde_json::{Map, Value};

/// The endpoints kedge governs (`GET /v1/models` is answered from the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path {
            "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/completions" => Some(Endpoint::Completions),
            "/v1/embeddings" => Some(Endpoint::Embeddings),
            _ => None,
        }
    }

    /// Short name for the task classifier and labels.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }

    /// The field that carries the prompt, required by the API.
    fn input_field(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "messages",
            Endpoint::Completions => "prompt",
            Endpoint::Embeddings => "input",
        }
    }

    fn streams(self) -> bool {
        self != Endpoint::Embeddings
    }
}

/// An error in OpenAI's shape, with the status it is sent with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    pub code: &'static str,
    /// Seconds for a `Retry-After` header (429 and 503 from limits and queues).
    pub retry_after: Option<u64>,
    /// Further headers, e.g. OpenAI's `x-ratelimit-*`.
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: String,
    ) -> Self {
        ApiError {
            status,
            message,
            kind,
            code,
            retry_after: None,
            headers: Vec::new(),
        }
    }

    pub fn invalid(code: &'static str, message: String) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn body(&self) -> String {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": null,
                "code": self.code,
            }
        })
        .to_string()
    }
}

/// A validated request body and the fields that govern it.
#[derive(Debug)]
pub struct ParsedRequest {
    pub body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    /// The client itself asked for `stream_options.include_usage`.
    pub client_wants_usage: bool,
    pub max_tokens: Option<u64>,
}

impl ParsedRequest {
    /// The body to send upstream: the backend's model name, and a usage
    /// request on streams when the backend supports one.
    pub fn upstream_body(&self, upstream_model: &str, ask_usage: bool) -> Vec<u8> {
        let mut body = self.body.clone();
        body.insert("model".into(), Value::String(upstream_model.to_string()));
        if self.stream && ask_usage && !self.client_wants_usage {
            let opts = body
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(o) = opts {
                o.insert("include_usage".into(), Value::Bool(true));
            }
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// Parses and validates a request body: 400 with a precise message otherwise.
pub fn parse_request(endpoint: Endpoint, bytes: &[u8]) -> Result<ParsedRequest, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::invalid(
            "invalid_json",
            format!("We could not parse the JSON body of your request: {e}"),
        )
    })?;
    let Value::Object(body) = value else {
        return Err(ApiError::invalid(
            "invalid_json",
            "The request body must be a JSON object".into(),
        ));
    };
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                "invalid_type",
                "`model` must be a non-empty string".into(),
            ));
        }
        None => {
            return Err(ApiError::invalid(
                "missing_required_parameter",
                "you must provide a model parameter".into(),
            ));
        }
    };
    let input = endpoint.input_field();
    if body.get(input).is_none_or(Value::is_null) {
        return Err(ApiError::invalid(
            "missing_required_parameter",
            format!("Missing required parameter: '{input}'"),
        ));
    }
    if endpoint == Endpoint::ChatCompletions && !body[input].is_array() {
        return Err(ApiError::invalid(
            "invalid_type",
            "`messages` must be an array".into(),
        ));
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) if *b && !endpoint.streams() => {
            return Err(ApiError::invalid(
                "invalid_value",
                format!("{} does not stream", endpoint.path()),
            ));
        }
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(
                "invalid_type",
                "`stream` must be a boolean".into(),
            ));
        }
    };
    let client_wants_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let max_tokens = match body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
    {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            ApiError::invalid(
                "invalid_type",
                "`max_tokens` must be a non-negative integer".into(),
            )
        })?),
    };
    Ok(ParsedRequest {
        body,
        model,
        stream,
        client_wants_usage,
        max_tokens,
    })
}

/// Tokens one request consumed, and whether the upstream said so or kedge counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// True when the upstream reported these numbers (exact); false when kedge
    /// counted them with its tokenizer.
    pub reported: bool,
}

/// The `usage` object of a response or stream chunk, if it carries one.
pub fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?;
    let prompt = u.get("prompt_tokens")?.as_u64()?;
    let completion = u
        .get("completion_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        reported: true,
    })
}

/// A chunk that exists only to carry usage (`choices` empty), which the
/// upstream sends because kedge asked for it.
pub fn is_usage_only_chunk(v: &Value) -> bool {
    v.get("usage").is_some_and(|u| !u.is_null())
        && v.get("choices")
            .and_then(Value::as_array)
            .is_some_and(|c| c.is_empty())
}

/// The generated text a stream chunk carries (chat delta or completion text).
pub fn chunk_text(v: &Value) -> String {
    let mut out = String::new();
    for choice in v
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let delta = choice.get("delta");
        for text in [
            delta.and_then(|d| d.get("content")),
            delta.and_then(|d| d.get("reasoning_content")),
            choice.get("text"),
        ]
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        {
            out.push_str(text);
        }
        if let Some(calls) = delta.and_then(|d| d.get("tool_calls")) {
            out.push_str(&calls.to_string());
        }
    }
    out
}

/// The generated text of a whole (non-streaming) response.
pub fn response_text(v: &Value) -> String {
    let mut out = String::new();
    for choice in v
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let message = choice.get("message");
        for text in [message.and_then(|m| m.get("content")), choice.get("text")]
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            out.push_str(text);
        }
        if let Some(calls) = message.and_then(|m| m.get("tool_calls")) {
            out.push_str(&calls.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(endpoint: Endpoint, s: &str) -> Result<ParsedRequest, ApiError> {
        parse_request(endpoint, s.as_bytes())
    }

    #[test]
    fn validates_the_required_fields() {
        let e = parse(Endpoint::ChatCompletions, "{nope").unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (400, "invalid_json"));
        let e = parse(Endpoint::ChatCompletions, r#"{"messages":[]}"#).unwrap_err();
        assert_eq!(e.code, "missing_required_parameter");
        let e = parse(Endpoint::ChatCompletions, r#"{"model":"m"}"#).unwrap_err();
        assert!(e.message.contains("'messages'"), "{e:?}");
        let e = parse(
            Endpoint::Embeddings,
            r#"{"model":"m","input":"x","stream":true}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, "invalid_value");
        let e = parse(
            Endpoint::Completions,
            r#"{"model":"m","prompt":"x","stream":1}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, "invalid_type");
        let e = parse(Endpoint::Completions, r#"[1]"#).unwrap_err();
        assert_eq!(e.code, "invalid_json");
    }

    #[test]
    fn reads_the_governing_fields() {
        let r = parse(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[],"stream":true,"max_tokens":7,
                "stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(r.model, "m");
        assert!(r.stream && r.client_wants_usage);
        assert_eq!(r.max_tokens, Some(7));
    }

    #[test]
    fn upstream_body_renames_the_model_and_asks_for_usage() {
        let r = parse(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[],"stream":true,"temperature":0.5}"#,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&r.upstream_body("up-m", true)).unwrap();
        assert_eq!(v["model"], "up-m");
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["temperature"], 0.5);
        let v: Value = serde_json::from_slice(&r.upstream_body("up-m", false)).unwrap();
        assert!(v.get("stream_options").is_none());
    }

    #[test]
    fn recognises_usage_and_text() {
        let usage_only: Value = serde_json::from_str(
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#,
        )
        .unwrap();
        assert!(is_usage_only_chunk(&usage_only));
        assert_eq!(
            usage_of(&usage_only),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 5,
                reported: true
            })
        );
        let delta: Value =
            serde_json::from_str(r#"{"choices":[{"delta":{"content":"Hi"}}],"usage":null}"#)
                .unwrap();
        assert!(!is_usage_only_chunk(&delta));
        assert_eq!(usage_of(&delta), None);
        assert_eq!(chunk_text(&delta), "Hi");
        let full: Value =
            serde_json::from_str(r#"{"choices":[{"message":{"content":"Hello"}}]}"#).unwrap();
        assert_eq!(response_text(&full), "Hello");
    }

    #[test]
    fn errors_have_openai_shape() {
        let v: Value = serde_json::from_str(&ApiError::invalid("c", "m".into()).body()).unwrap();
        assert_eq!(v["error"]["message"], "m");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "c");
    }
}
