//! The OpenAI-compatible proxy. A request's path, top to bottom:
//!
//! 1. [`Proxy::classify`]: who is it (API key, trusted header, kernel tag, default) → 401/403
//! 2. [`Proxy::read_request`]: read the body (size and time bounded) and validate it → 400/408/413
//! 3. [`Proxy::route`]: model → backend → 404/403
//! 4. [`Backend::send`](upstream::Backend::send): forward → 502/503/504
//! 5. [`Proxy::respond`]: stream or buffer the answer, read the usage
//! 6. [`Settlement::settle`]: the request's final [`Usage`], exactly once
//!
//! Each stage is a function of what the earlier ones produced ([`RequestCtx`]),
//! so later stages (budgets, scheduling, multi-arm routing) slot in between.

pub mod headers;
mod server;
mod stream;
pub mod tls;
mod upstream;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Result;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, combinators::BoxBody};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
};

use server::InFlight;
pub use server::{ConnInfo, Tags};
use stream::{Meter, MeteredStream};
use upstream::{Backend, bad_gateway};

use crate::{
    classify::{Classifier, Facts, Identity},
    config::Loaded,
    metrics::Metrics,
    openai::{self, ApiError, Endpoint, ParsedRequest, Usage},
    tokens,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

pub struct Proxy {
    cfg: Arc<Loaded>,
    classifier: Classifier,
    backends: Vec<Backend>,
    tags: Tags,
    metrics: Arc<Metrics>,
}

/// Everything the pipeline knows about a request once it is routed.
#[derive(Debug)]
pub struct RequestCtx {
    pub request_id: String,
    pub peer: SocketAddr,
    pub identity: Identity,
    pub endpoint: Endpoint,
    /// The model the client asked for.
    pub model: String,
    pub route: Route,
    pub stream: bool,
    pub client_wants_usage: bool,
    pub max_tokens: Option<u64>,
    /// Prompt tokens by kedge's estimate (tokens.rs), known before the upstream answers.
    pub prompt_estimate: u64,
}

/// Where a model is served.
#[derive(Clone, Debug)]
pub struct Route {
    /// Index into `[[backend]]`.
    pub backend: usize,
    /// The model name sent upstream.
    pub upstream_model: String,
}

/// Labels a request is counted under, refined as the pipeline learns more.
struct Labels {
    class: u32,
    tenant: Option<String>,
}

impl Proxy {
    pub fn new(cfg: Arc<Loaded>, tags: Tags, metrics: Arc<Metrics>) -> Result<Proxy> {
        Ok(Proxy {
            classifier: Classifier::from_config(&cfg),
            backends: upstream::backends(&cfg)?,
            cfg,
            tags,
            metrics,
        })
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        in_flight: InFlight,
    ) -> Response<Body> {
        let request_id = headers::request_id(req.headers());
        let mut labels = Labels {
            class: conn.kernel.0,
            tenant: self.tenant_name(conn.kernel.1),
        };
        let resp = match self.pipeline(req, conn, &request_id, &mut labels).await {
            Ok(resp) => resp,
            Err(e) => error_response(&e),
        };
        let class = self.cfg.class_name(labels.class);
        let tenant = labels.tenant.as_deref().unwrap_or("-");
        self.metrics
            .requests
            .with_label_values(&[class, tenant, resp.status().as_str()])
            .inc();
        tracing::info!(
            request_id = %request_id,
            peer = %conn.peer,
            class,
            tenant,
            status = resp.status().as_u16(),
            "request"
        );
        let (mut parts, body) = resp.into_parts();
        let h = &mut parts.headers;
        for (name, value) in [
            (headers::X_REQUEST_ID, request_id.as_str()),
            (headers::X_KEDGE_CLASS, class),
            (headers::X_KEDGE_TENANT, tenant),
        ] {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(name, v);
            }
        }
        Response::from_parts(
            parts,
            Tracked {
                inner: body,
                _in_flight: in_flight,
            }
            .boxed(),
        )
    }

    async fn pipeline(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        request_id: &str,
        labels: &mut Labels,
    ) -> Result<Response<Body>, ApiError> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        let endpoint = match (&parts.method, Endpoint::from_path(path)) {
            (&Method::POST, Some(endpoint)) => endpoint,
            (&Method::GET, None) if path == "/v1/models" => {
                let identity = self.classify(&parts.headers, conn, labels)?;
                return self
                    .models(&identity, &parts.headers, conn, request_id)
                    .await;
            }
            (_, Some(_)) => return Err(method_not_allowed(&parts.method, path)),
            (_, None) if path == "/v1/models" => {
                return Err(method_not_allowed(&parts.method, path));
            }
            (_, None) => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "not_found",
                    format!("Unknown path {path}"),
                ));
            }
        };
        // Who it is comes before reading the body: an unauthenticated client
        // cannot make kedge buffer megabytes.
        let identity = self.classify(&parts.headers, conn, labels)?;
        let parsed = self.read_request(endpoint, &parts.headers, body).await?;
        let route = self.route(&identity, &parsed.model)?;
        let ctx = RequestCtx {
            request_id: request_id.to_string(),
            peer: conn.peer,
            identity,
            endpoint,
            model: parsed.model.clone(),
            route,
            stream: parsed.stream,
            client_wants_usage: parsed.client_wants_usage,
            max_tokens: parsed.max_tokens,
            prompt_estimate: tokens::estimate_prompt(endpoint, &parsed.body),
        };
        let backend = &self.backends[ctx.route.backend];
        let body = parsed.upstream_body(&ctx.route.upstream_model, backend.stream_usage);
        let headers = self.upstream_headers(&parts.headers, &ctx);
        let resp = backend
            .send(Method::POST, endpoint.path(), headers, Bytes::from(body))
            .await?;
        self.respond(ctx, resp).await
    }

    /// Stage 1: the classification chain.
    fn classify(
        &self,
        headers: &HeaderMap,
        conn: ConnInfo,
        labels: &mut Labels,
    ) -> Result<Identity, ApiError> {
        let identity = self.classifier.classify(&Facts {
            headers,
            peer: conn.peer.ip(),
            kernel: conn.kernel,
        })?;
        if identity.ignored_untrusted_header {
            self.metrics.untrusted_headers.inc();
        }
        labels.class = identity.class;
        labels.tenant = identity.tenant.clone();
        Ok(identity)
    }

    /// Stage 2: the body, bounded in size and time, parsed and validated.
    async fn read_request(
        &self,
        endpoint: Endpoint,
        headers: &HeaderMap,
        body: Incoming,
    ) -> Result<ParsedRequest, ApiError> {
        let limits = &self.cfg.raw.limits;
        let max = limits.max_body_bytes;
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                format!("The request body is larger than {max} bytes"),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(too_large());
        }
        let timeout = Duration::from_millis(limits.body_read_timeout_ms);
        let collected =
            tokio::time::timeout(timeout, Limited::new(body, max as usize).collect()).await;
        let bytes = match collected {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error",
                    "request_timeout",
                    format!(
                        "The request body did not arrive within {} ms",
                        timeout.as_millis()
                    ),
                ));
            }
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return Err(too_large());
            }
            Ok(Err(e)) => {
                return Err(ApiError::invalid(
                    "unreadable_body",
                    format!("The request body could not be read: {e}"),
                ));
            }
            Ok(Ok(c)) => c.to_bytes(),
        };
        openai::parse_request(endpoint, &bytes)
    }

    /// Stage 3: which backend serves the model, and may this identity use it.
    /// Without any `[[route]]`, every model goes to the first backend as is.
    fn route(&self, identity: &Identity, model: &str) -> Result<Route, ApiError> {
        identity.check_model(model)?;
        if self.cfg.raw.routes.is_empty() {
            return Ok(Route {
                backend: 0,
                upstream_model: model.to_string(),
            });
        }
        let Some(&backend) = self.cfg.route_backends.get(model) else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("The model `{model}` does not exist or you do not have access to it."),
            ));
        };
        let upstream_model = self
            .cfg
            .raw
            .routes
            .iter()
            .find(|r| r.model.get_ref() == model)
            .and_then(|r| r.upstream_model.clone())
            .unwrap_or_else(|| model.to_string());
        Ok(Route {
            backend,
            upstream_model,
        })
    }

    /// The client's headers, minus what is for kedge or for this hop only.
    fn upstream_headers(&self, client: &HeaderMap, ctx: &RequestCtx) -> HeaderMap {
        let mut h = client.clone();
        headers::strip_hop_by_hop(&mut h);
        for name in self.classifier.consumed_headers() {
            h.remove(name);
        }
        if self.classifier.owns_authorization() {
            h.remove(header::AUTHORIZATION);
        }
        // kedge reads the answer (usage, SSE): it must arrive uncompressed.
        h.remove(header::ACCEPT_ENCODING);
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
            h.insert(headers::X_REQUEST_ID, v);
        }
        headers::append_forwarded_for(&mut h, ctx.peer.ip());
        h
    }

    /// Stage 5: the upstream's answer to the client, with its usage read.
    async fn respond(
        &self,
        ctx: RequestCtx,
        resp: Response<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        let backend = &self.backends[ctx.route.backend];
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::CONTENT_LENGTH);
        let is_sse = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let settlement = Settlement {
            metrics: self.metrics.clone(),
            class: self.cfg.class_name(ctx.identity.class).to_string(),
            backend: backend.name.clone(),
            ctx,
        };
        let ctx = &settlement.ctx;
        if ctx.stream && parts.status.is_success() && is_sse {
            let strip = backend.stream_usage && !ctx.client_wants_usage;
            let meter = Meter::new(strip, ctx.prompt_estimate);
            let body = MeteredStream::new(
                body,
                meter,
                backend.stream_idle_timeout,
                backend.on_disconnect,
                settlement,
            );
            return Ok(Response::from_parts(parts, body.boxed()));
        }

        // A whole answer: read it (bounded) to learn its usage.
        let max = self.cfg.raw.limits.max_response_bytes as usize;
        let read =
            tokio::time::timeout(backend.response_timeout, Limited::new(body, max).collect()).await;
        let bytes = match read {
            Ok(Ok(c)) => c.to_bytes(),
            Ok(Err(e)) => {
                settlement.settle(Usage::default(), "upstream_broken");
                let what = if e.downcast_ref::<LengthLimitError>().is_some() {
                    "sent an answer over max_response_bytes"
                } else {
                    "broke off its answer"
                };
                return Err(bad_gateway(&backend.name, what));
            }
            Err(_) => {
                settlement.settle(Usage::default(), "upstream_timeout");
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_error",
                    "upstream_timeout",
                    format!(
                        "The backend `{}` did not finish its answer in time",
                        backend.name
                    ),
                ));
            }
        };
        if !parts.status.is_success() {
            // The backend's own error: pass it on; nothing was generated.
            settlement.settle(Usage::default(), "upstream_error");
            return Ok(Response::from_parts(parts, full(bytes)));
        }
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            settlement.settle(Usage::default(), "upstream_garbage");
            return Err(bad_gateway(
                &backend.name,
                "returned a response that is not JSON",
            ));
        };
        let usage = openai::usage_of(&json).unwrap_or_else(|| Usage {
            prompt_tokens: ctx.prompt_estimate,
            completion_tokens: tokens::count_text(&openai::response_text(&json)),
            reported: false,
        });
        settlement.settle(usage, "complete");
        Ok(Response::from_parts(parts, full(bytes)))
    }

    /// `GET /v1/models`: the routed models this identity may use, or, without
    /// routes, the first backend's own list.
    async fn models(
        &self,
        identity: &Identity,
        client: &HeaderMap,
        conn: ConnInfo,
        request_id: &str,
    ) -> Result<Response<Body>, ApiError> {
        if self.cfg.raw.routes.is_empty() {
            let mut h = client.clone();
            headers::strip_hop_by_hop(&mut h);
            if self.classifier.owns_authorization() {
                h.remove(header::AUTHORIZATION);
            }
            if let Ok(v) = HeaderValue::from_str(request_id) {
                h.insert(headers::X_REQUEST_ID, v);
            }
            headers::append_forwarded_for(&mut h, conn.peer.ip());
            let resp = self.backends[0]
                .send(Method::GET, "/v1/models", h, Bytes::new())
                .await?;
            let (mut parts, body) = resp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers);
            return Ok(Response::from_parts(
                parts,
                body.map_err(|e| Box::new(e) as BoxError).boxed(),
            ));
        }
        let data: Vec<_> = self
            .cfg
            .raw
            .routes
            .iter()
            .map(|r| r.model.get_ref())
            .filter(|m| identity.check_model(m).is_ok())
            .map(|m| {
                serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "kedge"})
            })
            .collect();
        let body = serde_json::json!({"object": "list", "data": data}).to_string();
        Ok(json_response(StatusCode::OK, body))
    }

    fn tenant_name(&self, id: u32) -> Option<String> {
        (id != 0)
            .then(|| self.cfg.tenant_name(id).map(str::to_owned))
            .flatten()
    }
}

/// The end of a request: its final usage lands here exactly once, whether it
/// completed, failed upstream, or lost its client mid-stream. Metrics and the
/// usage log line are written here; this is where budgets commit.
pub struct Settlement {
    metrics: Arc<Metrics>,
    class: String,
    backend: String,
    pub ctx: RequestCtx,
}

impl Settlement {
    pub fn settle(self, usage: Usage, outcome: &'static str) {
        let ctx = &self.ctx;
        let tenant = ctx.identity.tenant.as_deref().unwrap_or("-");
        for (direction, n) in [
            ("input", usage.prompt_tokens),
            ("output", usage.completion_tokens),
        ] {
            self.metrics
                .tokens
                .with_label_values(&[direction, &self.class, tenant])
                .inc_by(n);
        }
        tracing::info!(
            request_id = %ctx.request_id,
            tenant,
            class = %self.class,
            api_key = ctx.identity.api_key.as_deref().unwrap_or("-"),
            model = %ctx.model,
            backend = %self.backend,
            stream = ctx.stream,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            usage = if usage.reported { "reported" } else { "counted" },
            outcome,
            "usage"
        );
    }
}

/// A response body that keeps its connection's request counted as open.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn json_response(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(Bytes::from(body)))
        .expect("valid response")
}

/// An error in OpenAI's shape: `{"error":{"message","type","code"}}`.
pub fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.status, e.body())
}

fn method_not_allowed(method: &Method, path: &str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("{method} is not allowed on {path}"),
    )
}
