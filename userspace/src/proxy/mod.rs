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

mod charge;
mod h1;
pub mod headers;
mod server;
mod stream;
pub mod tls;
pub mod upstream;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

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
use tokio::sync::watch;
use upstream::{Backend, UpstreamBody, bad_gateway};

use charge::Charge;

use crate::{
    budget::{self, Budget, Estimate, Refusal, Subject},
    classify::{Classifier, Facts, Identity},
    config::{self, Loaded},
    gpu::GpuSample,
    ledger::{Ledger, UsageRecord},
    metrics::Metrics,
    openai::{self, ApiError, Endpoint, ParsedRequest, Usage},
    route::{
        self, ArmGuard, ArmKind, FailoverCause, RouteRequest, RouteRuntime, Router, breaker, task,
    },
    schedule::{Gate, Job, Permit},
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
    router: Router,
    budget: Arc<Budget>,
    ledger: Option<Arc<Ledger>>,
    /// One scheduler per backend, same order as `backends`.
    gates: Vec<Gate>,
    gpu: watch::Receiver<Vec<GpuSample>>,
}

/// The proxy currently in force; a config reload swaps in a new one.
pub struct ProxySlot {
    current: std::sync::RwLock<Arc<Proxy>>,
}

impl ProxySlot {
    pub fn new(proxy: Proxy) -> ProxySlot {
        ProxySlot {
            current: std::sync::RwLock::new(Arc::new(proxy)),
        }
    }

    pub fn get(&self) -> Arc<Proxy> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn replace(&self, proxy: Proxy) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(proxy);
    }
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
    /// When the request's body had been read and validated.
    pub started: Instant,
}

/// Where a model is served: the arm that answered, and why it was chosen.
#[derive(Clone, Debug)]
pub struct Route {
    /// Index into `[[backend]]`.
    pub backend: usize,
    /// The model name sent upstream.
    pub upstream_model: String,
    /// The routing reason (`local_first`, `context_too_long`, …).
    pub reason: &'static str,
    /// The answering arm is a local (GPU) one.
    pub local: bool,
}

/// Labels a request is counted under, refined as the pipeline learns more.
struct Labels {
    class: u32,
    tenant: Option<String>,
    /// `<backend>; reason=<reason>` once routed.
    route: Option<String>,
}

impl Proxy {
    pub fn new(
        cfg: Arc<Loaded>,
        tags: Tags,
        metrics: Arc<Metrics>,
        gpu: watch::Receiver<Vec<GpuSample>>,
        budget: Arc<Budget>,
        ledger: Option<Arc<Ledger>>,
    ) -> Result<Proxy> {
        let backends = upstream::backends(&cfg)?;
        let router = Router::new(cfg.raw.routing.clone(), &cfg.routes, |name| {
            backends.iter().position(|b| b.name == name).unwrap_or(0)
        });
        let gates = backends
            .iter()
            .map(|b| Gate::new(cfg.schedule.clone(), cfg.schedule.backend(&b.name)))
            .collect();
        Ok(Proxy {
            classifier: Classifier::from_config(&cfg),
            backends,
            cfg,
            tags,
            metrics,
            router,
            budget,
            ledger,
            gates,
            gpu,
        })
    }

    pub fn config(&self) -> &Arc<Loaded> {
        &self.cfg
    }

    /// The budget engine (kept across reloads that do not change `[budget]`).
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// The schedulers, for the feedback loop and `/status`.
    pub fn gates(&self) -> impl Iterator<Item = (&str, &Gate)> {
        self.backends
            .iter()
            .map(|b| b.name.as_str())
            .zip(&self.gates)
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
            route: None,
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
            route = labels.route.as_deref().unwrap_or("-"),
            "request"
        );
        let (mut parts, body) = resp.into_parts();
        let h = &mut parts.headers;
        if self.router.cfg.explain_header
            && let Some(v) = labels
                .route
                .as_deref()
                .and_then(|r| HeaderValue::from_str(r).ok())
        {
            h.insert(headers::X_KEDGE_ROUTE, v);
        }
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
        identity.check_model(&parsed.model)?;
        let route = self.find_route(&parsed.model)?;
        let mut ctx = RequestCtx {
            request_id: request_id.to_string(),
            peer: conn.peer,
            identity,
            endpoint,
            model: parsed.model.clone(),
            route: Route {
                backend: 0,
                upstream_model: parsed.model.clone(),
                reason: "only_backend",
                local: true,
            },
            stream: parsed.stream,
            client_wants_usage: parsed.client_wants_usage,
            max_tokens: parsed.max_tokens,
            prompt_estimate: parsed.prompt_estimate,
            started: Instant::now(),
        };
        let headers = self.upstream_headers(&parts.headers, &ctx);
        let sent = self
            .forward(&mut ctx, route, &parsed, headers, labels)
            .await?;
        self.respond(ctx, sent).await
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
        openai::parse_request(endpoint, bytes)
    }

    /// Stage 3: which backend serves the model, and may this identity use it.
    /// Without any `[[route]]`, every model goes to the first backend as is.
    /// Stage 3: the route of a model. `None` when no `[[route]]` is configured:
    /// every model then goes to the first backend as is.
    fn find_route(&self, model: &str) -> Result<Option<&RouteRuntime>, ApiError> {
        if self.cfg.routes.is_empty() {
            return Ok(None);
        }
        self.router.find(model).map(Some).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("The model `{model}` does not exist or you do not have access to it."),
            )
        })
    }

    /// Stages 4 and 5: plan the arms, wait for a slot on the chosen backend,
    /// send, and fail over to the next arm on a connect error, a timeout, a 429,
    /// a 5xx or a context-length error — all before any byte reached the client.
    async fn forward(
        &self,
        ctx: &mut RequestCtx,
        route: Option<&RouteRuntime>,
        parsed: &ParsedRequest,
        headers: HeaderMap,
        labels: &mut Labels,
    ) -> Result<Sent, ApiError> {
        let output = ctx
            .max_tokens
            .unwrap_or(*self.cfg.raw.budget.default_output_cap.get_ref());
        let job = Job {
            class: ctx.identity.class,
            tenant: ctx.identity.tenant.as_deref().map_or(0, config::tenant_id),
            cost: ctx.prompt_estimate + output,
        };
        let Some(route) = route else {
            // No routes: one attempt on the first backend.
            let charge = self.reserve(ctx, 0, 0).map_err(|r| charge::refused(&r))?;
            let permit = self.acquire(0, job).await?;
            let resp = self
                .send_to(0, ctx.endpoint, &ctx.route.upstream_model, parsed, headers)
                .await?;
            labels.route = Some(format!("{}; reason=only_backend", self.backends[0].name));
            return Ok(Sent {
                resp,
                permit,
                arm: None,
                charge,
                price: (0.0, 0.0),
            });
        };

        let now = Instant::now();
        // Only the score policy weighs task kinds; local_first needs no label.
        let task = if route.cfg.policy == route::PolicyKind::Score {
            task::classify(ctx.endpoint.label(), &parsed.body(), ctx.prompt_estimate)
        } else {
            task::TaskLabel::unclassified()
        };
        // The GPU samples are borrowed only while the states are built (no await).
        let states = {
            let samples = self.gpu.borrow();
            route.states(
                now,
                |arm| {
                    arm.gpus
                        .iter()
                        .filter_map(|g| samples.iter().find(|s| s.index == *g))
                        .map(|s| s.utilization_pct)
                        .max()
                },
                |backend| self.gates[backend].queued() as u32,
            )
        };
        let request = RouteRequest {
            prompt_tokens: ctx.prompt_estimate,
            max_output_tokens: output,
            task,
            priority: self
                .cfg
                .raw
                .classes
                .get(ctx.identity.class as usize)
                .map_or(u8::MAX, |c| c.priority),
            cloud_budget_ok: true,
        };
        let plan = route::plan(&route.cfg, &request, &states, route.next_rotation());
        let model = route.model().to_string();
        let first = plan
            .order
            .first()
            .map_or("-", |&i| route.arm(i).0.backend.get_ref().as_str());
        self.metrics
            .route_decisions
            .with_label_values(&[&model, first, plan.reason.label()])
            .inc();
        if plan.order.is_empty() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_error",
                "no_arm_available",
                format!(
                    "No arm of route `{model}` can serve this request now ({})",
                    plan.reason.label()
                ),
            ));
        }

        route.on_request(now);
        let rc = &self.router.cfg;
        let mut last: Option<Attempt> = None;
        let mut tried = 0;
        let mut budget_skipped = false;
        for (attempt, &arm) in plan
            .order
            .iter()
            .enumerate()
            .take(rc.max_attempts.max(1) as usize)
        {
            if attempt > 0 {
                if !route.try_retry(Instant::now()) {
                    break;
                }
                let wait = breaker::backoff(
                    attempt as u32,
                    Duration::from_millis(rc.backoff_base_ms),
                    Duration::from_millis(rc.backoff_max_ms),
                    jitter(),
                );
                tokio::time::sleep(wait).await;
            }
            if !route.breaker_allows(arm, Instant::now()) {
                continue;
            }
            tried += 1;
            let (arm_cfg, arm_rt) = route.arm(arm);
            let backend = arm_rt.backend;
            let upstream_model = arm_cfg
                .upstream_model
                .clone()
                .unwrap_or_else(|| model.clone());
            let more = plan.order.len() > attempt + 1 && attempt + 1 < rc.max_attempts as usize;
            let cost = arm_cfg.cost_micros(ctx.prompt_estimate, output);
            let charge = match self.reserve(ctx, backend, cost) {
                Ok(c) => c,
                Err(refusal) if more && charge::is_per_arm(&refusal) => {
                    // This arm's pool or price does not fit the budget: the next may.
                    self.metrics
                        .route_failovers
                        .with_label_values(&[&model, arm_cfg.backend.get_ref(), "budget"])
                        .inc();
                    budget_skipped = true;
                    continue;
                }
                Err(refusal) => return Err(charge::refused(&refusal)),
            };
            let permit = self.acquire(backend, job).await?;
            let guard = route.begin(arm);
            let outcome = self
                .send_to(
                    backend,
                    ctx.endpoint,
                    &upstream_model,
                    parsed,
                    headers.clone(),
                )
                .await;
            let failure = match outcome {
                Ok(resp) if more && is_retryable_status(resp.status()) => {
                    // Read the (small) error body to tell a context-length error from others.
                    let status = resp.status();
                    let body = tokio::time::timeout(
                        Duration::from_secs(5),
                        Limited::new(resp.into_body(), 64 << 10).collect(),
                    )
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                    match FailoverCause::from_response(status.as_u16(), &body) {
                        Some(cause) => Attempt::Status(cause),
                        None => {
                            // Not ours to retry (e.g. a plain 400): the upstream's
                            // verdict on the request, passed on in OpenAI's shape.
                            route.record(arm, true, Instant::now());
                            drop((permit, guard, charge));
                            labels.route = Some(format!(
                                "{}; reason={}",
                                arm_cfg.backend.get_ref(),
                                plan.reason.label()
                            ));
                            return Err(upstream_rejected(status, &body));
                        }
                    }
                }
                Ok(resp) => {
                    route.record(arm, !resp.status().is_server_error(), Instant::now());
                    let reason = if budget_skipped {
                        "cloud_budget_spent"
                    } else {
                        plan.reason.label()
                    };
                    return Ok(self.sent(
                        ctx,
                        labels,
                        route,
                        arm,
                        reason,
                        (permit, guard, charge),
                        upstream_model,
                        resp,
                    ));
                }
                Err(e) => Attempt::Error(e),
            };
            let cause = failure.cause();
            // A 429 says "slow down", not "broken": it does not trip the breaker.
            route.record(arm, cause == FailoverCause::RateLimited, Instant::now());
            self.metrics
                .route_failovers
                .with_label_values(&[&model, arm_cfg.backend.get_ref(), cause.label()])
                .inc();
            tracing::warn!(route = %model, arm = %arm_cfg.backend.get_ref(), cause = cause.label(), "attempt failed");
            drop((permit, guard, charge));
            last = Some(failure);
        }
        labels.route = Some(format!("-; reason={}", plan.reason.label()));
        Err(match last {
            Some(Attempt::Error(e)) if tried == 1 => e,
            Some(last) => ApiError::new(
                last.status(),
                "upstream_error",
                "all_arms_failed",
                format!(
                    "Every arm of route `{model}` failed ({tried} tried; last: {})",
                    last.cause().label()
                ),
            ),
            None => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_error",
                "no_arm_available",
                format!(
                    "Every arm of route `{model}` is unavailable (circuit open); try again shortly"
                ),
            ),
        })
    }

    /// The answering arm is known: record it in the context and the labels.
    #[allow(clippy::too_many_arguments)]
    fn sent(
        &self,
        ctx: &mut RequestCtx,
        labels: &mut Labels,
        route: &RouteRuntime,
        arm: usize,
        reason: &'static str,
        (permit, guard, charge): (Permit, ArmGuard, Charge),
        upstream_model: String,
        resp: Response<UpstreamBody>,
    ) -> Sent {
        let (arm_cfg, arm_rt) = route.arm(arm);
        let local = arm_cfg.kind == ArmKind::Local;
        ctx.route = Route {
            backend: arm_rt.backend,
            upstream_model,
            reason,
            local,
        };
        self.metrics.served(route.model(), local);
        self.metrics
            .first_byte
            .with_label_values(&[
                self.cfg.class_name(ctx.identity.class),
                arm_cfg.backend.get_ref(),
            ])
            .observe(ctx.started.elapsed().as_secs_f64());
        labels.route = Some(format!("{}; reason={reason}", arm_cfg.backend.get_ref()));
        Sent {
            resp,
            permit,
            arm: Some(guard),
            charge,
            price: (arm_cfg.price_input_per_mtok, arm_cfg.price_output_per_mtok),
        }
    }

    /// Reserves the request's estimate against its tenant's, key's and the
    /// backend pool's limits.
    fn reserve(
        &self,
        ctx: &RequestCtx,
        backend: usize,
        cost_micros: u64,
    ) -> Result<Charge, Box<Refusal>> {
        Charge::reserve(
            &self.budget,
            Subject {
                tenant: ctx.identity.tenant.as_deref().unwrap_or(""),
                api_key: ctx.identity.api_key.as_deref(),
                backend: Some(&self.backends[backend].name),
            },
            Estimate {
                prompt_tokens: ctx.prompt_estimate,
                max_output_tokens: ctx.max_tokens,
                cost_micros,
            },
        )
    }

    /// Waits for a slot on `backend` per the scheduling policy.
    async fn acquire(&self, backend: usize, job: Job) -> Result<Permit, ApiError> {
        let name = self.backends[backend].name.as_str();
        let class = self.cfg.class_name(job.class).to_string();
        match self.gates[backend].acquire(job).await {
            Ok(permit) => {
                self.metrics
                    .queue_wait
                    .with_label_values(&[name, &class])
                    .observe(permit.waited().as_secs_f64());
                self.metrics
                    .queue_admitted
                    .with_label_values(&[name, &class])
                    .inc();
                Ok(permit)
            }
            Err(rejection) => {
                self.metrics
                    .queue_rejected
                    .with_label_values(&[name, &class, rejection.reason.label()])
                    .inc();
                let status = StatusCode::from_u16(rejection.status())
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                let code = if status == StatusCode::TOO_MANY_REQUESTS {
                    "queue_full"
                } else {
                    "backend_saturated"
                };
                let mut e = ApiError::new(
                    status,
                    "rate_limit_error",
                    code,
                    format!(
                        "The `{class}` queue for backend `{name}` cannot take this request ({}); retry after {} s",
                        rejection.reason.label(),
                        rejection.retry_after_secs()
                    ),
                );
                e.retry_after = Some(rejection.retry_after_secs());
                Err(e)
            }
        }
    }

    async fn send_to(
        &self,
        backend: usize,
        endpoint: Endpoint,
        upstream_model: &str,
        parsed: &ParsedRequest,
        headers: HeaderMap,
    ) -> Result<Response<UpstreamBody>, ApiError> {
        let b = &self.backends[backend];
        let body = parsed.upstream_body(upstream_model, b.stream_usage);
        b.send(Method::POST, endpoint.path(), headers, body).await
    }

    /// The client's headers, minus what is for kedge or for this hop only.
    /// Built by copying what passes rather than cloning the whole map and
    /// removing a dozen names from it (each removal hashes and probes).
    fn upstream_headers(&self, client: &HeaderMap, ctx: &RequestCtx) -> HeaderMap {
        let connection_named = headers::connection_named(client);
        let consumed = self.classifier.consumed_headers();
        let owns_authorization = self.classifier.owns_authorization();
        let mut h = HeaderMap::with_capacity(client.keys_len() + 3);
        for (name, value) in client {
            let dropped = headers::is_hop_by_hop(name)
                || connection_named.contains(name)
                || consumed.iter().any(|c| name.as_str().eq_ignore_ascii_case(c))
                || (owns_authorization && name == header::AUTHORIZATION)
                // kedge reads the answer (usage, SSE): it must arrive uncompressed.
                || name == header::ACCEPT_ENCODING
                // Set below.
                || name == header::CONTENT_TYPE
                || name == headers::X_REQUEST_ID;
            if !dropped {
                h.append(name.clone(), value.clone());
            }
        }
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
    async fn respond(&self, ctx: RequestCtx, sent: Sent) -> Result<Response<Body>, ApiError> {
        let Sent {
            resp,
            permit,
            arm,
            charge,
            price,
        } = sent;
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
            charge: Some(charge),
            price,
            ledger: self.ledger.clone(),
            _slot: permit,
            _arm: arm,
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
        let Some(answer) = openai::read_answer(&bytes) else {
            settlement.settle(Usage::default(), "upstream_garbage");
            return Err(bad_gateway(
                &backend.name,
                "returned a response that is not JSON",
            ));
        };
        let usage = answer.usage.unwrap_or(Usage {
            prompt_tokens: ctx.prompt_estimate,
            completion_tokens: tokens::count_bytes(answer.text_bytes),
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
    charge: Option<Charge>,
    price: (f64, f64),
    ledger: Option<Arc<Ledger>>,
    /// The backend slot and the arm's in-flight count: released when the
    /// request is settled (a stream holds them to its end).
    _slot: Permit,
    _arm: Option<ArmGuard>,
}

impl Settlement {
    pub fn settle(mut self, usage: Usage, outcome: &'static str) {
        let cost_micros = (usage.prompt_tokens as f64 * self.price.0
            + usage.completion_tokens as f64 * self.price.1)
            .ceil() as u64;
        let spent = budget::Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_tokens: 0,
            cost_micros,
        };
        let class_route = [self.class.as_str(), self.ctx.model.as_str()];
        self.metrics
            .request_duration
            .with_label_values(&class_route)
            .observe(self.ctx.started.elapsed().as_secs_f64());
        self.metrics
            .spend
            .with_label_values(&[
                self.ctx.identity.tenant.as_deref().unwrap_or("-"),
                &self.backend,
            ])
            .inc_by(cost_micros as f64 / 1e6);
        if let Some(charge) = self.charge.take() {
            let started = charge.started();
            charge.commit(spent);
            if let Some(ledger) = &self.ledger
                && spent.tokens() > 0
            {
                let ctx = &self.ctx;
                ledger.record(UsageRecord {
                    request_id: ctx.request_id.clone(),
                    tenant: ctx.identity.tenant.clone().unwrap_or_default(),
                    api_key: ctx.identity.api_key.clone(),
                    route: ctx.endpoint.path().to_string(),
                    backend: self.backend.clone(),
                    model: ctx.model.clone(),
                    usage: spent,
                    started,
                    finished: jiff::Timestamp::now(),
                });
            }
        }
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
            cost_micros,
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
    let mut resp = json_response(e.status, e.body());
    let h = resp.headers_mut();
    if let Some(secs) = e.retry_after
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        h.insert(header::RETRY_AFTER, v);
    }
    for (name, value) in &e.headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(*name, v);
        }
    }
    resp
}

/// What the upstream stage hands to the response stage: the answer, the
/// scheduler slot and the arm's in-flight count, both held until the body ends.
pub struct Sent {
    resp: Response<UpstreamBody>,
    permit: Permit,
    arm: Option<ArmGuard>,
    charge: Charge,
    /// USD per million input and output tokens on the answering arm.
    price: (f64, f64),
}

/// A failed attempt on one arm.
enum Attempt {
    Error(ApiError),
    Status(FailoverCause),
}

impl Attempt {
    fn cause(&self) -> FailoverCause {
        match self {
            Attempt::Error(e) if e.status == StatusCode::GATEWAY_TIMEOUT => FailoverCause::Timeout,
            Attempt::Error(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {
                FailoverCause::Connect
            }
            Attempt::Error(_) => FailoverCause::ServerError,
            Attempt::Status(cause) => *cause,
        }
    }

    /// The status of the one error naming the route: 503 when the arms were
    /// unreachable or throttled (come back later), else 502 (they misbehaved).
    fn status(&self) -> StatusCode {
        match self.cause() {
            FailoverCause::Connect | FailoverCause::RateLimited => StatusCode::SERVICE_UNAVAILABLE,
            FailoverCause::Timeout => StatusCode::GATEWAY_TIMEOUT,
            FailoverCause::ServerError | FailoverCause::ContextLength => StatusCode::BAD_GATEWAY,
        }
    }
}

/// Answers worth trying elsewhere (the body decides for 400 and 413).
fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
        || status == StatusCode::BAD_REQUEST
        || status == StatusCode::PAYLOAD_TOO_LARGE
}

/// A 4xx the upstream gave a request, re-issued in OpenAI's shape with the
/// upstream's own message when it sent one.
fn upstream_rejected(status: StatusCode, body: &[u8]) -> ApiError {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned());
    ApiError::new(
        status,
        "invalid_request_error",
        "upstream_rejected",
        message,
    )
}

/// A cheap random number for backoff jitter (no RNG crate for this).
fn jitter() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish() as u32
}

fn method_not_allowed(method: &Method, path: &str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("{method} is not allowed on {path}"),
    )
}
