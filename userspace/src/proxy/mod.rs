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
mod h1_server;
pub mod headers;
mod meters;
mod server;
mod stream;
pub mod tls;
pub mod upstream;
mod whole;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    header::{self, HeaderName, HeaderValue},
};

use h1_server::RequestBody;
use headers::Forwarded;
use meters::{HeaderValues, ONLY_BACKEND, RequestMeters, tenant_key};
use server::InFlight;
pub use server::{ConnInfo, Tags};
use stream::{Meter, MeteredStream};
use tokio::sync::watch;
use upstream::{Backend, UpstreamBody, bad_gateway};
use whole::{WholeError, read_whole};

use charge::Charge;

use crate::{
    budget::{self, Budget, Estimate, Refusal, Subject},
    classify::{Classifier, Facts, Identity},
    config::Loaded,
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
    meters: RequestMeters,
    header_values: HeaderValues,
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
    pub request_id: Arc<str>,
    pub peer: SocketAddr,
    pub identity: Identity,
    pub endpoint: Endpoint,
    /// The model the client asked for (the route's shared name when routed).
    pub model: Arc<str>,
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
    tenant: Option<Arc<str>>,
    /// Where it went (`None`: no arm) and why, once routed.
    route: Option<(Option<usize>, &'static str)>,
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
            backends.iter().position(|b| &*b.name == name).unwrap_or(0)
        });
        let gates = backends
            .iter()
            .map(|b| Gate::new(cfg.schedule.clone(), cfg.schedule.backend(&b.name)))
            .collect();
        Ok(Proxy {
            classifier: Classifier::from_config(&cfg),
            header_values: HeaderValues::new(&cfg, &backends),
            meters: RequestMeters::new(&metrics),
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
        self.backends.iter().map(|b| &*b.name).zip(&self.gates)
    }

    async fn handle(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        conn: ConnInfo,
        in_flight: InFlight,
    ) -> (Response<Body>, AnswerTags) {
        let request_id = headers::request_id(req.headers());
        let mut labels = Labels {
            class: conn.kernel.0,
            tenant: self.classifier.kernel_tenant(conn.kernel.1),
            route: None,
        };
        let resp = match self.pipeline(req, conn, &request_id, &mut labels).await {
            Ok(resp) => resp,
            Err(e) => error_response(&e),
        };
        let (tenant_id, tenant) = tenant_key(labels.tenant.as_deref());
        let status = resp.status();
        self.meters.requests.with(
            (labels.class, tenant_id, status.as_u16()),
            || [self.cfg.class_name(labels.class), tenant, status.as_str()],
            |c| c.inc(),
        );
        let route_value = labels
            .route
            .filter(|_| self.router.cfg.explain_header)
            .and_then(|(backend, reason)| self.header_values.route(backend, reason));
        tracing::info!(
            request_id = %request_id,
            peer = %conn.peer,
            class = self.cfg.class_name(labels.class),
            tenant,
            status = status.as_u16(),
            route = %RouteNote(labels.route, &self.backends),
            "request"
        );
        let tags = AnswerTags {
            request_id,
            class: self.header_values.class(labels.class),
            tenant: self.header_values.tenant(labels.tenant.as_deref()),
            route: route_value,
        };
        let resp = resp.map(|inner| {
            Tracked {
                inner,
                _in_flight: in_flight,
            }
            .boxed()
        });
        (resp, tags)
    }

    async fn pipeline(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        conn: ConnInfo,
        request_id: &Arc<str>,
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
            request_id: request_id.clone(),
            peer: conn.peer,
            identity,
            endpoint,
            model: route.map_or_else(|| Arc::from(parsed.model.as_str()), |r| r.name.clone()),
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
        let headers = self.upstream_headers(&parts.headers, &ctx.request_id, &conn, true);
        let sent = self
            .forward(&mut ctx, route, &parsed, &headers, labels)
            .await?;
        self.respond(ctx, route, sent).await
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
        labels.tenant.clone_from(&identity.tenant);
        Ok(identity)
    }

    /// Stage 2: the body, bounded in size and time, parsed and validated.
    async fn read_request(
        &self,
        endpoint: Endpoint,
        headers: &HeaderMap,
        body: RequestBody,
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
        let bytes = match tokio::time::timeout(timeout, read_whole(body, max as usize)).await {
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
            Ok(Err(WholeError::TooLarge)) => return Err(too_large()),
            Ok(Err(WholeError::Broken(e))) => {
                return Err(ApiError::invalid(
                    "unreadable_body",
                    format!("The request body could not be read: {e}"),
                ));
            }
            Ok(Ok(bytes)) => bytes,
        };
        openai::parse_request(endpoint, bytes)
    }

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
        headers: &Forwarded,
        labels: &mut Labels,
    ) -> Result<Sent, ApiError> {
        let output = ctx
            .max_tokens
            .unwrap_or(*self.cfg.raw.budget.default_output_cap.get_ref());
        let job = Job {
            class: ctx.identity.class,
            tenant: tenant_key(ctx.identity.tenant.as_deref()).0,
            cost: ctx.prompt_estimate + output,
        };
        let Some(route) = route else {
            // No routes: one attempt on the first backend.
            let charge = self.reserve(ctx, 0, 0).map_err(|r| charge::refused(&r))?;
            let permit = self.acquire(0, job).await?;
            let resp = self
                .send_to(0, ctx.endpoint, &ctx.route.upstream_model, parsed, headers)
                .await?;
            labels.route = Some((Some(0), ONLY_BACKEND));
            return Ok(Sent {
                resp,
                permit,
                arm: None,
                charge,
                price: (0.0, 0.0),
            });
        };

        let now = crate::clock::coarse_instant();
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
        let model = route.model();
        let first = plan.order.first().map(|&i| route.arm(i).1.backend);
        self.meters.route_decisions.with(
            (
                route.index as u32,
                first.map_or(u32::MAX, |b| b as u32),
                plan.reason as u8,
            ),
            || {
                let arm = first.map_or("-", |b| &*self.backends[b].name);
                [model, arm, plan.reason.label()]
            },
            |c| c.inc(),
        );
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
                if !route.try_retry(crate::clock::coarse_instant()) {
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
            if !route.breaker_allows(arm, crate::clock::coarse_instant()) {
                continue;
            }
            tried += 1;
            let (arm_cfg, arm_rt) = route.arm(arm);
            let backend = arm_rt.backend;
            let upstream_model = arm_cfg
                .upstream_model
                .clone()
                .unwrap_or_else(|| model.to_string());
            let more = plan.order.len() > attempt + 1 && attempt + 1 < rc.max_attempts as usize;
            let cost = arm_cfg.cost_micros(ctx.prompt_estimate, output);
            let charge = match self.reserve(ctx, backend, cost) {
                Ok(c) => c,
                Err(refusal) if more && charge::is_per_arm(&refusal) => {
                    // This arm's pool or price does not fit the budget: the next may.
                    self.metrics
                        .route_failovers
                        .with_label_values(&[model, arm_cfg.backend.get_ref(), "budget"])
                        .inc();
                    budget_skipped = true;
                    continue;
                }
                Err(refusal) => return Err(charge::refused(&refusal)),
            };
            let permit = self.acquire(backend, job).await?;
            let guard = route.begin(arm);
            let outcome = self
                .send_to(backend, ctx.endpoint, &upstream_model, parsed, headers)
                .await;
            let failure = match outcome {
                Ok(resp) if more && is_retryable_status(resp.status()) => {
                    // Read the (small) error body to tell a context-length error from others.
                    let status = resp.status();
                    let body = tokio::time::timeout(
                        Duration::from_secs(5),
                        read_whole(resp.into_body(), 64 << 10),
                    )
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .unwrap_or_default();
                    match FailoverCause::from_response(status.as_u16(), &body) {
                        Some(cause) => Attempt::Status(cause),
                        None => {
                            // Not ours to retry (e.g. a plain 400): the upstream's
                            // verdict on the request, passed on in OpenAI's shape.
                            route.record(arm, true, crate::clock::coarse_instant());
                            drop((permit, guard, charge));
                            labels.route = Some((Some(backend), plan.reason.label()));
                            return Err(upstream_rejected(status, &body));
                        }
                    }
                }
                Ok(resp) => {
                    route.record(
                        arm,
                        !resp.status().is_server_error(),
                        crate::clock::coarse_instant(),
                    );
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
            route.record(
                arm,
                cause == FailoverCause::RateLimited,
                crate::clock::coarse_instant(),
            );
            self.metrics
                .route_failovers
                .with_label_values(&[model, arm_cfg.backend.get_ref(), cause.label()])
                .inc();
            tracing::warn!(route = %model, arm = %arm_cfg.backend.get_ref(), cause = cause.label(), "attempt failed");
            drop((permit, guard, charge));
            last = Some(failure);
        }
        labels.route = Some((None, plan.reason.label()));
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
        let backend = arm_rt.backend;
        ctx.route = Route {
            backend,
            upstream_model,
            reason,
            local,
        };
        self.meters.route_served.with(
            (route.index as u32, local),
            || [route.model(), if local { "local" } else { "cloud" }],
            |c| c.inc(),
        );
        self.metrics.count_served(local);
        let class = ctx.identity.class;
        self.meters.first_byte.with(
            (class, backend as u32),
            || [self.cfg.class_name(class), &self.backends[backend].name],
            |h| h.observe(ctx.started.elapsed().as_secs_f64()),
        );
        labels.route = Some((Some(backend), reason));
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
        let name = &*self.backends[backend].name;
        let class = self.cfg.class_name(job.class);
        match self.gates[backend].acquire(job).await {
            Ok(permit) => {
                let key = (backend as u32, job.class);
                self.meters.queue_wait.with(
                    key,
                    || [name, class],
                    |h| h.observe(permit.waited().as_secs_f64()),
                );
                self.meters
                    .queue_admitted
                    .with(key, || [name, class], |c| c.inc());
                Ok(permit)
            }
            Err(rejection) => {
                self.metrics
                    .queue_rejected
                    .with_label_values(&[name, class, rejection.reason.label()])
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
        headers: &Forwarded,
    ) -> Result<Response<UpstreamBody>, ApiError> {
        let b = &self.backends[backend];
        let body = parsed.upstream_body(upstream_model, b.stream_usage);
        b.send(Method::POST, endpoint.path(), headers, body).await
    }

    /// The client's headers as every attempt sends them upstream: minus what
    /// is for kedge (its tenant/class headers, its own API key) or for this
    /// hop only, with the request id and `x-forwarded-for`; a JSON body's
    /// `content-type` is kedge's to set.
    fn upstream_headers(
        &self,
        client: &HeaderMap,
        request_id: &str,
        conn: &ConnInfo,
        json_body: bool,
    ) -> Forwarded {
        let consumed = self.classifier.consumed_headers();
        let owns_authorization = self.classifier.owns_authorization();
        let keep = |name: &HeaderName| {
            !(consumed.contains(&name)
                || (owns_authorization && name == header::AUTHORIZATION)
                // kedge reads the answer (usage, SSE): it must arrive uncompressed.
                || name == header::ACCEPT_ENCODING
                || (json_body && name == header::CONTENT_TYPE)
                || name == headers::X_REQUEST_ID)
        };
        let request_id = ("x-request-id", request_id.as_bytes());
        let content_type = ("content-type", &b"application/json"[..]);
        let extra: &[(&str, &[u8])] = if json_body {
            &[content_type, request_id]
        } else {
            &[request_id]
        };
        Forwarded::render(client, keep, extra, &conn.peer_text)
    }

    /// Stage 5: the upstream's answer to the client, with its usage read.
    async fn respond(
        self: &Arc<Self>,
        ctx: RequestCtx,
        route: Option<&RouteRuntime>,
        sent: Sent,
    ) -> Result<Response<Body>, ApiError> {
        let Sent {
            resp,
            permit,
            arm,
            charge,
            price,
        } = sent;
        let backend = &self.backends[ctx.route.backend];
        // The upstream client keeps end-to-end headers only (and no length).
        let (parts, body) = resp.into_parts();
        let is_sse = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let settlement = Settlement {
            proxy: self.clone(),
            route: route.map(|r| r.index),
            ctx,
            charge: Some(charge),
            price,
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
        let read = tokio::time::timeout(backend.response_timeout, read_whole(body, max)).await;
        let bytes = match read {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => {
                settlement.settle(Usage::default(), "upstream_broken");
                let what = match e {
                    WholeError::TooLarge => "sent an answer over max_response_bytes",
                    WholeError::Broken(_) => "broke off its answer",
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
            let h = self.upstream_headers(client, request_id, &conn, false);
            let resp = self.backends[0]
                .send(Method::GET, "/v1/models", &h, Bytes::new())
                .await?;
            let (parts, body) = resp.into_parts();
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
}

/// `<backend>; reason=<why>` (or `-`) for the access log.
struct RouteNote<'a>(Option<(Option<usize>, &'static str)>, &'a [Backend]);

impl std::fmt::Display for RouteNote<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("-"),
            Some((backend, reason)) => {
                let name = backend.map_or("-", |b| &*self.1[b].name);
                write!(f, "{name}; reason={reason}")
            }
        }
    }
}

/// The end of a request: its final usage lands here exactly once, whether it
/// completed, failed upstream, or lost its client mid-stream. Metrics and the
/// usage log line are written here; this is where budgets commit.
pub struct Settlement {
    /// The proxy the request ran under (its config names the labels).
    proxy: Arc<Proxy>,
    /// Position of the request's route, when it was routed.
    route: Option<usize>,
    pub ctx: RequestCtx,
    charge: Option<Charge>,
    price: (f64, f64),
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
        let proxy = &*self.proxy;
        let ctx = &self.ctx;
        let class_id = ctx.identity.class;
        let class = proxy.cfg.class_name(class_id);
        let backend_id = ctx.route.backend;
        let backend = &proxy.backends[backend_id].name;
        let (tenant_id, tenant) = tenant_key(ctx.identity.tenant.as_deref());
        let took = ctx.started.elapsed().as_secs_f64();
        match self.route {
            Some(route) => proxy.meters.request_duration.with(
                (class_id, route as u32),
                || [class, &ctx.model],
                |h| h.observe(took),
            ),
            // Unrouted models are whatever the client sent: not cached by id.
            None => proxy
                .metrics
                .request_duration
                .with_label_values(&[class, &ctx.model])
                .observe(took),
        }
        proxy.meters.spend.with(
            (tenant_id, backend_id as u32),
            || [tenant, backend],
            |c| c.inc_by(cost_micros as f64 / 1e6),
        );
        for (direction, n) in [(0u8, usage.prompt_tokens), (1, usage.completion_tokens)] {
            proxy.meters.tokens.with(
                (direction, class_id, tenant_id),
                || {
                    [
                        if direction == 0 { "input" } else { "output" },
                        class,
                        tenant,
                    ]
                },
                |c| c.inc_by(n),
            );
        }
        if let Some(charge) = self.charge.take() {
            let started = charge.started();
            charge.commit(spent);
            if let Some(ledger) = &proxy.ledger
                && spent.tokens() > 0
            {
                ledger.record(UsageRecord {
                    request_id: ctx.request_id.clone(),
                    tenant: ctx.identity.tenant.clone().unwrap_or_else(|| Arc::from("")),
                    api_key: ctx.identity.api_key.clone(),
                    route: ctx.endpoint.shared_path(),
                    backend: backend.clone(),
                    model: ctx.model.clone(),
                    usage: spent,
                    started,
                    finished: crate::clock::coarse_timestamp(),
                });
            }
        }
        tracing::info!(
            request_id = %ctx.request_id,
            tenant,
            class,
            api_key = ctx.identity.api_key.as_deref().unwrap_or("-"),
            model = %ctx.model,
            backend = %backend,
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

/// The headers kedge adds to every answer: the request id and the class,
/// tenant and route tags. They travel beside the answer instead of in its
/// header map: the HTTP/1 server writes them straight into the head (four
/// map inserts cost more than writing the rest of it), HTTP/2 inserts them.
/// Any the backend sent under these names are replaced.
pub struct AnswerTags {
    /// ASCII graphic by construction ([`headers::request_id`]).
    request_id: Arc<str>,
    class: Option<HeaderValue>,
    tenant: HeaderValue,
    route: Option<HeaderValue>,
}

impl AnswerTags {
    /// Whether a header of the answer is one of these (and so not sent).
    pub fn replaces(name: &HeaderName) -> bool {
        name == headers::X_REQUEST_ID
            || name == headers::X_KEDGE_CLASS
            || name == headers::X_KEDGE_TENANT
            || name == headers::X_KEDGE_ROUTE
    }

    /// Each tag as a header line's name and value.
    pub fn each(&self, mut line: impl FnMut(&HeaderName, &[u8])) {
        line(&headers::X_REQUEST_ID, self.request_id.as_bytes());
        if let Some(v) = &self.class {
            line(&headers::X_KEDGE_CLASS, v.as_bytes());
        }
        line(&headers::X_KEDGE_TENANT, self.tenant.as_bytes());
        if let Some(v) = &self.route {
            line(&headers::X_KEDGE_ROUTE, v.as_bytes());
        }
    }

    /// Puts the tags into a header map (HTTP/2).
    pub fn insert_into(self, h: &mut HeaderMap) {
        h.remove(headers::X_KEDGE_ROUTE);
        if let Some(v) = self.route {
            h.insert(headers::X_KEDGE_ROUTE, v);
        }
        if let Ok(v) = HeaderValue::from_str(&self.request_id) {
            h.insert(headers::X_REQUEST_ID, v);
        }
        h.remove(headers::X_KEDGE_CLASS);
        if let Some(v) = self.class {
            h.insert(headers::X_KEDGE_CLASS, v);
        }
        h.insert(headers::X_KEDGE_TENANT, self.tenant);
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
