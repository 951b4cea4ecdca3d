//! The slice of the OpenAI protocol kedge must understand: which endpoint a
//! request is for, the fields that govern it, usage in answers, and errors.
//!
//! Everything else in a body passes through untouched: kedge checks it is
//! JSON while reading the governing members, and forwards the client's own
//! bytes unless it must edit `model` or `stream_options`.

use std::{
    borrow::Cow,
    ops::Range,
    sync::{Arc, LazyLock},
};

use bytes::Bytes;
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value, value::RawValue};

use crate::tokens;

mod answer;
mod chunk;
mod request;
mod scan;

pub use chunk::ChunkReader;
pub(crate) use scan::plain_run;

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

    /// [`Endpoint::path`] as a shared string (the ledger's `route`).
    pub fn shared_path(self) -> Arc<str> {
        static PATHS: LazyLock<[Arc<str>; 3]> = LazyLock::new(|| {
            [
                Endpoint::ChatCompletions,
                Endpoint::Completions,
                Endpoint::Embeddings,
            ]
            .map(|e| Arc::from(e.path()))
        });
        PATHS[self as usize].clone()
    }

    /// Of a request's `messages`, `prompt` and `input` members, the one this
    /// endpoint reads as its input.
    fn input_of<T>(self, messages: T, prompt: T, input: T) -> T {
        match self {
            Endpoint::ChatCompletions => messages,
            Endpoint::Completions => prompt,
            Endpoint::Embeddings => input,
        }
    }

    /// The field that carries the prompt, required by the API.
    fn input_field(self) -> &'static str {
        self.input_of("messages", "prompt", "input")
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
    /// The body as the client sent it.
    pub raw: Bytes,
    pub model: String,
    /// Where `model`'s JSON string lies in `raw`, for renaming it in place;
    /// `None` when the body was read as a tree (a repeated key).
    model_span: Option<Range<usize>>,
    pub stream: bool,
    /// The client itself asked for `stream_options.include_usage`.
    pub client_wants_usage: bool,
    /// The body has a `stream_options` member (edited, never duplicated).
    has_stream_options: bool,
    pub max_tokens: Option<u64>,
    /// Prompt tokens by kedge's estimate ([`tokens::estimate_prompt`]).
    pub prompt_estimate: u64,
}

impl ParsedRequest {
    /// The whole body as a JSON object, for the few readers that need more
    /// than the governing fields (the score policy's task classifier).
    pub fn body(&self) -> Map<String, Value> {
        serde_json::from_slice(&self.raw).unwrap_or_default()
    }

    /// The body to send upstream: the backend's model name, and a usage
    /// request on streams when the backend supports one. The client's bytes
    /// go as they came, with the model's string replaced where it lies and
    /// `stream_options` appended to the object; only a body whose own
    /// `stream_options` must be edited is re-serialised.
    pub fn upstream_body(&self, upstream_model: &str, ask_usage: bool) -> Bytes {
        let inject = self.stream && ask_usage && !self.client_wants_usage;
        let rename = upstream_model != self.model;
        if !inject && !rename {
            return self.raw.clone();
        }
        let end = self.raw.iter().rposition(|b| *b == b'}');
        if let (Some(end), false) = (end, inject && self.has_stream_options)
            && (!rename || self.model_span.is_some())
        {
            const ASK: &[u8] = br#","stream_options":{"include_usage":true}"#;
            let mut out = Vec::with_capacity(self.raw.len() + upstream_model.len() + ASK.len());
            let mut from = 0;
            if rename && let Some(span) = &self.model_span {
                out.extend_from_slice(&self.raw[..span.start]);
                // Writing a string into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut out, upstream_model);
                from = span.end;
            }
            if inject {
                out.extend_from_slice(&self.raw[from..end]);
                out.extend_from_slice(ASK);
                from = end;
            }
            out.extend_from_slice(&self.raw[from..]);
            return out.into();
        }
        let mut body = self.body();
        body.insert("model".into(), Value::String(upstream_model.to_string()));
        if inject {
            let opts = body
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()));
            if !opts.is_object() {
                // `null` (or junk) there would hide the usage request.
                *opts = Value::Object(Map::new());
            }
            if let Value::Object(o) = opts {
                o.insert("include_usage".into(), Value::Bool(true));
            }
        }
        serde_json::to_vec(&body).unwrap_or_default().into()
    }
}

/// The members of a request body kedge reads, borrowed from its bytes; the
/// rest are skipped (still checked to be valid JSON) without building a tree.
#[derive(Deserialize)]
struct RequestView<'a> {
    #[serde(default, borrow)]
    model: Member<'a>,
    #[serde(default, borrow)]
    messages: Member<'a>,
    #[serde(default, borrow)]
    prompt: Member<'a>,
    #[serde(default, borrow)]
    input: Member<'a>,
    #[serde(default, borrow)]
    stream: Member<'a>,
    #[serde(default, borrow)]
    stream_options: Member<'a>,
    #[serde(default, borrow)]
    max_completion_tokens: Member<'a>,
    #[serde(default, borrow)]
    max_tokens: Member<'a>,
}

/// A member's raw JSON when the object has it (`null` included).
#[derive(Default, Clone, Copy)]
struct Member<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Member<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(d).map(|raw| Member(Some(raw)))
    }
}

/// A member's value, as the checks below see it.
#[derive(Clone, Copy)]
enum Field<'a> {
    Absent,
    Null,
    Bool(bool),
    Other(&'a str),
}

impl<'a> Field<'a> {
    /// A member's JSON text (`None`: the object does not have it).
    fn of(raw: Option<&'a str>) -> Field<'a> {
        match raw {
            None => Field::Absent,
            Some("null") => Field::Null,
            Some("true") => Field::Bool(true),
            Some("false") => Field::Bool(false),
            Some(raw) => Field::Other(raw),
        }
    }
}

impl<'a> Member<'a> {
    fn text(self) -> Option<&'a str> {
        self.0.map(RawValue::get)
    }
}

/// Parses and validates a request body: 400 with a precise message otherwise.
pub fn parse_request(endpoint: Endpoint, bytes: Bytes) -> Result<ParsedRequest, ApiError> {
    parse_fast(endpoint, &bytes)
        .or_else(|| parse_view(endpoint, &bytes))
        .unwrap_or_else(|| parse_tree(endpoint, bytes))
}

/// [`parse_request`] through the one-pass reader; `None`: unusual, ask serde.
fn parse_fast(endpoint: Endpoint, bytes: &Bytes) -> Option<Result<ParsedRequest, ApiError>> {
    let m = request::members(bytes).ok()?;
    let input = endpoint.input_of(m.messages, m.prompt, m.input);
    let governing = Governing::of(
        [m.model, input, m.stream, m.stream_options],
        [m.max_completion_tokens, m.max_tokens],
    );
    Some(governing.validate(endpoint, bytes.clone(), m.model_span))
}

/// [`parse_request`] through serde's borrowed view; `None`: a repeated
/// member, not an object, or not JSON at all, for the tree to decide (the
/// last of a repeated member counts) and name the error.
fn parse_view(endpoint: Endpoint, bytes: &Bytes) -> Option<Result<ParsedRequest, ApiError>> {
    // serde would also fill the view from an array, by position.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let view = serde_json::from_slice::<RequestView>(bytes).ok()?;
    let model_span = view.model.0.map(|raw| {
        let start = raw.get().as_ptr() as usize - bytes.as_ptr() as usize;
        start..start + raw.get().len()
    });
    let input = endpoint.input_of(view.messages, view.prompt, view.input);
    let governing = Governing::of(
        [
            view.model.text(),
            input.text(),
            view.stream.text(),
            view.stream_options.text(),
        ],
        [view.max_completion_tokens.text(), view.max_tokens.text()],
    );
    Some(governing.validate(endpoint, bytes.clone(), model_span))
}

/// The governing members of a body, by value class.
struct Governing<'a> {
    model: Field<'a>,
    input: Field<'a>,
    stream: Field<'a>,
    stream_options: Field<'a>,
    max_tokens: Field<'a>,
}

impl<'a> Governing<'a> {
    /// From the members' JSON text: model, input, stream and stream_options,
    /// then max_completion_tokens and max_tokens (the first present wins).
    fn of(
        [model, input, stream, stream_options]: [Option<&'a str>; 4],
        [max_completion_tokens, max_tokens]: [Option<&'a str>; 2],
    ) -> Governing<'a> {
        Governing {
            model: Field::of(model),
            input: Field::of(input),
            stream: Field::of(stream),
            stream_options: Field::of(stream_options),
            max_tokens: match Field::of(max_completion_tokens) {
                Field::Absent => Field::of(max_tokens),
                present => present,
            },
        }
    }

    fn validate(
        &self,
        endpoint: Endpoint,
        raw: Bytes,
        model_span: Option<Range<usize>>,
    ) -> Result<ParsedRequest, ApiError> {
        let model = match self.model {
            // The raw value is checked JSON: without a backslash its content is
            // the name as is; an escaped one is decoded by serde.
            Field::Other(m) if m.starts_with('"') && !m.contains('\\') => {
                Some(m[1..m.len() - 1].to_owned()).filter(|m| !m.is_empty())
            }
            Field::Other(m) if m.starts_with('"') => serde_json::from_str::<String>(m)
                .ok()
                .filter(|m| !m.is_empty()),
            Field::Absent => {
                return Err(ApiError::invalid(
                    "missing_required_parameter",
                    "you must provide a model parameter".into(),
                ));
            }
            _ => None,
        }
        .ok_or_else(|| {
            ApiError::invalid("invalid_type", "`model` must be a non-empty string".into())
        })?;
        let name = endpoint.input_field();
        let input = match self.input {
            Field::Absent | Field::Null => {
                return Err(ApiError::invalid(
                    "missing_required_parameter",
                    format!("Missing required parameter: '{name}'"),
                ));
            }
            Field::Bool(true) => "true",
            Field::Bool(false) => "false",
            Field::Other(raw) => raw,
        };
        if endpoint == Endpoint::ChatCompletions && !input.starts_with('[') {
            return Err(ApiError::invalid(
                "invalid_type",
                "`messages` must be an array".into(),
            ));
        }
        let stream = match self.stream {
            Field::Absent | Field::Null => false,
            Field::Bool(true) if !endpoint.streams() => {
                return Err(ApiError::invalid(
                    "invalid_value",
                    format!("{} does not stream", endpoint.path()),
                ));
            }
            Field::Bool(b) => b,
            Field::Other(_) => {
                return Err(ApiError::invalid(
                    "invalid_type",
                    "`stream` must be a boolean".into(),
                ));
            }
        };
        let client_wants_usage = match self.stream_options {
            Field::Other(o) => serde_json::from_str::<Value>(o)
                .ok()
                .and_then(|o| o.get("include_usage").and_then(Value::as_bool))
                .unwrap_or(false),
            _ => false,
        };
        let max_tokens = match self.max_tokens {
            Field::Absent | Field::Null => None,
            Field::Bool(_) => Some(None),
            Field::Other(n) => Some(n.parse::<u64>().ok()),
        }
        .map(|n| {
            n.ok_or_else(|| {
                ApiError::invalid(
                    "invalid_type",
                    "`max_tokens` must be a non-negative integer".into(),
                )
            })
        })
        .transpose()?;
        // The input is valid JSON (the body parsed): serde counts only what
        // the one-pass counter finds unusual, and cannot fail.
        let prompt_estimate = request::prompt_tokens(endpoint, input).unwrap_or_else(|_| {
            tokens::estimate_prompt(endpoint, &mut serde_json::Deserializer::from_str(input))
                .unwrap_or(0)
        });
        Ok(ParsedRequest {
            raw,
            model,
            model_span,
            stream,
            client_wants_usage,
            has_stream_options: !matches!(self.stream_options, Field::Absent),
            max_tokens,
            prompt_estimate,
        })
    }
}

/// [`parse_request`] through a parsed tree: bodies the borrowed view cannot
/// take (a member given twice) and the syntax error of bodies that are not JSON.
fn parse_tree(endpoint: Endpoint, bytes: Bytes) -> Result<ParsedRequest, ApiError> {
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
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
    // Each member re-rendered as JSON text, to go through the same checks.
    let text = |key: &str| body.get(key).map(Value::to_string);
    let (model, input, stream, stream_options, max_completion_tokens, max_tokens) = (
        text("model"),
        text(endpoint.input_field()),
        text("stream"),
        text("stream_options"),
        text("max_completion_tokens"),
        text("max_tokens"),
    );
    let governing = Governing::of(
        [
            model.as_deref(),
            input.as_deref(),
            stream.as_deref(),
            stream_options.as_deref(),
        ],
        [max_completion_tokens.as_deref(), max_tokens.as_deref()],
    );
    governing.validate(endpoint, bytes.clone(), None)
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

/// What kedge reads from an answer (a whole response or one stream chunk).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnswerFacts {
    /// The `usage` object, when the answer carries one.
    pub usage: Option<Usage>,
    /// Bytes of generated text: content, reasoning, completion text, tool calls.
    pub text_bytes: u64,
    /// A chunk that exists only to carry usage (`choices` empty), which the
    /// upstream sends because kedge asked for it.
    pub usage_only: bool,
}

/// Reads an answer's usage and generated-text size; `None` when it is not JSON.
///
/// The one-pass reader in [`answer`] takes the usual shapes; what it finds
/// unusual goes to serde: a typed view borrowed from the bytes, and for an
/// answer of an unexpected shape a full parse. All three agree (tested).
pub fn read_answer(json: &[u8]) -> Option<AnswerFacts> {
    answer::facts(json).ok().or_else(|| read_answer_serde(json))
}

/// [`read_answer`] by serde alone: what the fast reader must agree with.
fn read_answer_serde(json: &[u8]) -> Option<AnswerFacts> {
    if let Ok(view) = serde_json::from_slice::<AnswerView>(json) {
        return Some(view.facts());
    }
    serde_json::from_slice::<Value>(json)
        .ok()
        .map(|v| facts_of(&v))
}

#[derive(Deserialize)]
struct AnswerView<'a> {
    #[serde(default, borrow)]
    choices: Option<Vec<ChoiceView<'a>>>,
    #[serde(default)]
    usage: Option<UsageView>,
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    /// A stream chunk's increment.
    #[serde(default, borrow)]
    delta: Option<MessageView<'a>>,
    /// A whole chat answer.
    #[serde(default, borrow)]
    message: Option<MessageView<'a>>,
    /// A (legacy) completion.
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct MessageView<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct UsageView {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

impl AnswerView<'_> {
    fn facts(&self) -> AnswerFacts {
        let len = |s: &Option<Cow<'_, str>>| s.as_deref().map_or(0, str::len) as u64;
        let text_bytes = self
            .choices
            .iter()
            .flatten()
            .map(|c| {
                len(&c.text)
                    + [&c.delta, &c.message]
                        .into_iter()
                        .flatten()
                        .map(|m| {
                            len(&m.content)
                                + len(&m.reasoning_content)
                                + m.tool_calls.map_or(0, |t| t.get().len() as u64)
                        })
                        .sum::<u64>()
            })
            .sum();
        AnswerFacts {
            usage: self.usage.as_ref().and_then(|u| {
                Some(Usage {
                    prompt_tokens: u.prompt_tokens?,
                    completion_tokens: u.completion_tokens.unwrap_or(0),
                    reported: true,
                })
            }),
            text_bytes,
            usage_only: self.usage.is_some() && self.choices.as_ref().is_some_and(Vec::is_empty),
        }
    }
}

/// [`read_answer`] on an already parsed tree (any shape).
fn facts_of(v: &Value) -> AnswerFacts {
    let usage = v.get("usage").and_then(|u| {
        Some(Usage {
            prompt_tokens: u.get("prompt_tokens")?.as_u64()?,
            completion_tokens: u
                .get("completion_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            reported: true,
        })
    });
    let choices = v.get("choices").and_then(Value::as_array);
    let str_len = |v: Option<&Value>| v.and_then(Value::as_str).map_or(0, str::len) as u64;
    let text_bytes = choices
        .into_iter()
        .flatten()
        .map(|choice| {
            str_len(choice.get("text"))
                + ["delta", "message"]
                    .into_iter()
                    .filter_map(|k| choice.get(k))
                    .map(|m| {
                        str_len(m.get("content"))
                            + str_len(m.get("reasoning_content"))
                            + m.get("tool_calls")
                                .map_or(0, |t| t.to_string().len() as u64)
                    })
                    .sum::<u64>()
        })
        .sum();
    AnswerFacts {
        usage,
        text_bytes,
        usage_only: v.get("usage").is_some_and(|u| !u.is_null())
            && choices.is_some_and(|c| c.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{XorShift, damage, json_value};

    fn parse(endpoint: Endpoint, s: &str) -> Result<ParsedRequest, ApiError> {
        parse_request(endpoint, Bytes::copy_from_slice(s.as_bytes()))
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
    fn upstream_body_is_the_clients_bytes_when_nothing_changes() {
        let sent = "{\"model\":\"m\",  \"messages\":[], \"x\":{\"y\":1.50}}\n";
        let r = parse(Endpoint::ChatCompletions, sent).unwrap();
        assert_eq!(&r.upstream_body("m", true)[..], sent.as_bytes());
        // A stream gets the usage request appended, the rest byte for byte.
        let sent = r#"{"model":"m","messages":[{"role":"user","content":"}"}],"stream":true} "#;
        let r = parse(Endpoint::ChatCompletions, sent).unwrap();
        let up = r.upstream_body("m", true);
        assert!(up.starts_with(&sent.as_bytes()[..sent.len() - 2]));
        let v: Value = serde_json::from_slice(&up).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["messages"][0]["content"], "}");
        // The client's own stream_options are edited, not duplicated.
        let r = parse(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[],"stream":true,"stream_options":{"x":1}}"#,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&r.upstream_body("m", true)).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"x": 1, "include_usage": true})
        );
    }

    #[test]
    fn the_borrowed_view_and_the_tree_agree() {
        // Every body is read by the view (or, given a member twice, the tree)
        // and by the tree alone: the same verdict, fields and estimate.
        for body in [
            r#"{"model":"m","messages":  [ {"role":"user","content":"hello"} ] }"#,
            r#"{"model":"m","messages":[],"model":"n","max_tokens":3}"#,
            r#"{"model":"m","prompt":"abc","stream":null,"max_completion_tokens":null,"max_tokens":9}"#,
            r#"{"model":"m","prompt":"abc","max_tokens":7.0}"#,
            r#"{"model":"m","prompt":"abc","max_tokens":-1}"#,
            r#"{"model":"m","prompt":"abc","max_tokens":"7"}"#,
            r#"{"model":"m","prompt":false}"#,
            r#"{"model":"m","prompt":null}"#,
            r#"{"model":"","prompt":"x"}"#,
            r#"{"model":null,"prompt":"x"}"#,
            r#"{"model":"\u006d","prompt":"x","stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"model":"m\"x\\","prompt":"x"}"#,
            r#"{"model":"llama-3.1-70b/é","prompt":"x"}"#,
            r#"{"model":"m","messages":{"role":"user"}}"#,
            r#"{"model":"m","messages":[]} trailing"#,
        ] {
            for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions] {
                assert_paths_agree(endpoint, body.as_bytes());
            }
        }
    }

    /// Every reader that takes `body` gives the tree's verdict, fields and
    /// estimate; returns whether the one-pass reader took it.
    fn assert_paths_agree(endpoint: Endpoint, body: &[u8]) -> bool {
        let bytes = Bytes::copy_from_slice(body);
        let tree = parse_tree(endpoint, bytes.clone());
        let fields = |r: &ParsedRequest| {
            (
                r.model.clone(),
                r.stream,
                r.client_wants_usage,
                r.max_tokens,
                r.prompt_estimate,
                r.has_stream_options,
            )
        };
        let show = String::from_utf8_lossy(body);
        let fast = parse_fast(endpoint, &bytes);
        for (name, other) in [("fast", &fast), ("view", &parse_view(endpoint, &bytes))] {
            match (other, &tree) {
                (None, _) => {}
                (Some(Ok(o)), Ok(t)) => assert_eq!(fields(o), fields(t), "{name}: {show}"),
                (Some(Err(o)), Err(t)) => assert_eq!(o.code, t.code, "{name}: {show}"),
                (Some(o), t) => panic!("{name}: {show}: {o:?}, tree {t:?}"),
            }
        }
        fast.is_some()
    }

    /// Random request bodies around the governing members, and random
    /// damage to them: the three readers agree wherever they read.
    #[test]
    fn random_requests_read_alike() {
        const KEYS: [&str; 11] = [
            "model",
            "messages",
            "prompt",
            "stream",
            "stream_options",
            "max_tokens",
            "max_completion_tokens",
            "content",
            "name",
            "text",
            "include_usage",
        ];
        const VALUES: [&str; 12] = [
            "\"m\"",
            "\"\"",
            "null",
            "true",
            "false",
            "7",
            "-2",
            "1.5",
            "\"\\u00e9x\"",
            "[]",
            "{}",
            "[\"ab\",3]",
        ];
        let mut rng = XorShift(0x5851_f42d_4c95_7f2d);
        let mut fast = 0;
        for _ in 0..20_000 {
            let mut doc = String::from("{\"model\":\"m\"");
            for _ in 0..rng.below(5) {
                doc.push_str(&format!(",\"{}\":", rng.pick(&KEYS[..7])));
                json_value(&mut rng, &KEYS, &VALUES, 3, &mut doc);
            }
            doc.push('}');
            let mut bytes = doc.into_bytes();
            if rng.below(4) == 0 {
                damage(&mut rng, &mut bytes);
            }
            let endpoint =
                [Endpoint::ChatCompletions, Endpoint::Completions][rng.below(2) as usize];
            fast += assert_paths_agree(endpoint, &bytes) as u32;
        }
        assert!(fast > 5_000, "the one-pass reader took only {fast} bodies");
    }

    #[test]
    fn a_renamed_model_is_replaced_where_it_lies() {
        let sent = r#"{"messages":[{"role":"user","content":"\"model\": \"m\""}], "model" : "m" ,"stream":true}"#;
        let r = parse(Endpoint::ChatCompletions, sent).unwrap();
        let up = r.upstream_body("up/\"q\"", true);
        let text = std::str::from_utf8(&up).unwrap();
        assert!(
            text.starts_with(&sent[..sent.find("\"m\" ,").unwrap()]),
            "{text}"
        );
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["model"], "up/\"q\"");
        assert_eq!(v["messages"][0]["content"], "\"model\": \"m\"");
        assert_eq!(v["stream_options"]["include_usage"], true);
        // A `null` stream_options is replaced, not shadowed by a second member.
        let r = parse(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[],"stream":true,"stream_options":null}"#,
        )
        .unwrap();
        let up = r.upstream_body("m", true);
        let v: Value = serde_json::from_slice(&up).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(
            String::from_utf8_lossy(&up)
                .matches("stream_options")
                .count(),
            1
        );
    }

    #[test]
    fn recognises_usage_and_text() {
        let usage_only =
            br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#;
        assert_eq!(
            read_answer(usage_only),
            Some(AnswerFacts {
                usage: Some(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 5,
                    reported: true
                }),
                text_bytes: 0,
                usage_only: true
            })
        );
        let delta = br#"{"choices":[{"delta":{"content":"Hi \u00e9","reasoning_content":"ab"}}],"usage":null}"#;
        assert_eq!(
            read_answer(delta),
            Some(AnswerFacts {
                usage: None,
                text_bytes: 7,
                usage_only: false
            })
        );
        let full = br#"{"choices":[{"message":{"content":"Hello","tool_calls":[{"id":"c"}]}}]}"#;
        assert_eq!(read_answer(full).unwrap().text_bytes, 5 + 12);
        assert_eq!(read_answer(b"[DONE]"), None);
    }

    #[test]
    fn an_answer_of_an_odd_shape_is_still_read() {
        // `choices` entries that are not objects defeat the typed view; the
        // full parse still finds the usage.
        let odd = br#"{"choices":[1],"usage":{"prompt_tokens":2,"completion_tokens":1.5}}"#;
        let facts = read_answer(odd).unwrap();
        assert_eq!(
            facts.usage,
            Some(Usage {
                prompt_tokens: 2,
                completion_tokens: 0,
                reported: true
            })
        );
        // Every shape agrees with the full parse where both apply.
        for json in [
            &br#"{"choices":[{"text":"abc"},{"delta":{"tool_calls":[1,2]}}]}"#[..],
            br#"{"choices":[],"usage":{}}"#,
            br#"{"usage":{"prompt_tokens":9}}"#,
        ] {
            let v: Value = serde_json::from_slice(json).unwrap();
            assert_eq!(
                read_answer(json),
                Some(facts_of(&v)),
                "{}",
                String::from_utf8_lossy(json)
            );
        }
    }

    #[test]
    fn errors_have_openai_shape() {
        let v: Value = serde_json::from_str(&ApiError::invalid("c", "m".into()).body()).unwrap();
        assert_eq!(v["error"]["message"], "m");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "c");
    }
}
