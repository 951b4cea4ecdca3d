//! The TOML configuration: schema, strict parsing, validation.
//!
//! Unknown keys are rejected, and every error names the file, the line and what
//! was expected, so `kedge check-config` is the only tool an operator needs.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
};

use hyper::Uri;
use kedge_common::{MAX_CLASSES, MAX_PORTS};
use serde::Deserialize;
use toml::Spanned;

use crate::{
    budget::BudgetConfig,
    cidr::Cidr,
    gpu::GpuConfig,
    route::{RouteConfig, RoutingConfig},
    schedule::{ClassRef, ScheduleConfig},
};

/// Largest rate the kernel buckets accept (connections per second).
pub const MAX_CONN_RATE: u32 = 1_000_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: Listen,
    #[serde(default)]
    pub kernel: Kernel,
    #[serde(rename = "class")]
    pub classes: Vec<Class>,
    #[serde(rename = "network", default)]
    pub networks: Vec<Network>,
    #[serde(rename = "backend")]
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub metrics: Metrics,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub classify: Classify,
    #[serde(rename = "api_key", default)]
    pub api_keys: Vec<ApiKey>,
    #[serde(rename = "route", default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub gpu: GpuConfig,
    #[serde(default)]
    pub budget: BudgetConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Where the OpenAI-compatible proxy listens.
    pub addr: SocketAddr,
    /// Terminate TLS here (ALPN h2 and http/1.1); absent = plain HTTP (h2c allowed).
    pub tls: Option<ListenTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenTls {
    /// PEM certificate chain, leaf first. Re-read on SIGHUP.
    pub cert: Spanned<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Spanned<PathBuf>,
}

/// What one client connection or request may cost the daemon.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request body accepted (413 above).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// HTTP/1 request head (and TLS handshake) must arrive within this.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// The whole request body must arrive within this (408 otherwise).
    #[serde(default = "default_body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// A connection with no request in flight and no bytes moving is closed after this.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// A connection whose writes make no progress this long (the client
    /// stopped reading) is closed, its open request cancelled (default
    /// [`DEFAULT_SEND_TIMEOUT_MS`]; see [`Limits::send_timeout`]).
    #[serde(default)]
    pub send_timeout_ms: Option<Spanned<u64>>,
    /// Largest non-streaming upstream response kedge buffers to read its usage (502 above).
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: default_max_body_bytes(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            body_read_timeout_ms: default_body_read_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            send_timeout_ms: None,
            max_response_bytes: default_max_response_bytes(),
        }
    }
}

fn default_max_body_bytes() -> u64 {
    4 << 20
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_body_read_timeout_ms() -> u64 {
    30_000
}
fn default_idle_timeout_ms() -> u64 {
    120_000
}
/// nginx's `send_timeout`.
const DEFAULT_SEND_TIMEOUT_MS: u64 = 60_000;
/// Below this a client's window closing for a moment, as it does in normal
/// operation, would cut its answer.
const MIN_SEND_TIMEOUT_MS: u64 = 100;

impl Limits {
    pub fn send_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.send_timeout_ms
                .as_ref()
                .map_or(DEFAULT_SEND_TIMEOUT_MS, |t| *t.get_ref()),
        )
    }
}
fn default_max_response_bytes() -> u64 {
    64 << 20
}

/// One link of the classification chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassifyStep {
    /// `Authorization: Bearer <key>` matched against `[[api_key]]`.
    ApiKey,
    /// `tenant_header` / `class_header`, only from `trusted_cidrs`.
    Header,
    /// The kernel's tag for the connection (or the userspace LPM when attach = "off").
    Kernel,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Classify {
    /// Each attribute (tenant, class) comes from the first step that supplies it;
    /// `kernel.default_class` applies last.
    #[serde(default = "default_order")]
    pub order: Vec<ClassifyStep>,
    /// Refuse requests without a known API key (401).
    #[serde(default)]
    pub require_api_key: bool,
    /// Sources allowed to set the tenant/class headers (a gateway in front of kedge).
    #[serde(default)]
    pub trusted_cidrs: Vec<Spanned<Cidr>>,
    #[serde(default = "default_tenant_header")]
    pub tenant_header: String,
    #[serde(default = "default_class_header")]
    pub class_header: String,
}

impl Default for Classify {
    fn default() -> Self {
        Classify {
            order: default_order(),
            require_api_key: false,
            trusted_cidrs: Vec::new(),
            tenant_header: default_tenant_header(),
            class_header: default_class_header(),
        }
    }
}

fn default_order() -> Vec<ClassifyStep> {
    vec![
        ClassifyStep::ApiKey,
        ClassifyStep::Header,
        ClassifyStep::Kernel,
    ]
}
fn default_tenant_header() -> String {
    "x-kedge-tenant".into()
}
fn default_class_header() -> String {
    "x-kedge-class".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Shown in logs and metrics instead of the key.
    pub name: Spanned<String>,
    /// Lower-case hex SHA-256 of the key (`printf %s "$KEY" | sha256sum`).
    pub sha256: Spanned<String>,
    pub tenant: Spanned<String>,
    /// Class for this key's requests (else the next step of the chain decides).
    pub class: Option<Spanned<String>>,
    /// Models this key may use (absent = every routed model).
    pub models: Option<Vec<Spanned<String>>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// tc/TCX ingress: can tag connections with `skb->mark`.
    #[default]
    Tc,
    /// XDP: the cheapest drop; the proxy reads tags from the LPM maps.
    Xdp,
    /// No kernel program: classification happens in userspace only.
    Off,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Tc => "tc",
            AttachMode::Xdp => "xdp",
            AttachMode::Off => "off",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    /// Interface whose ingress the program watches (required unless attach = "off").
    pub interface: Option<String>,
    #[serde(default = "default_attach")]
    pub attach: Spanned<AttachMode>,
    /// Proxy ports the kernel guards; defaults to the port of `listen.addr`.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Class of sources that match no `[[network]]`; defaults to the last class.
    pub default_class: Option<Spanned<String>>,
    /// bpffs directory; maps and links are pinned under `<pin_root>/v<ABI>`.
    #[serde(default = "default_pin_root")]
    pub pin_root: PathBuf,
    /// tc mode: set `skb->mark` on admitted SYNs (and `net.ipv4.tcp_fwmark_accept`).
    #[serde(default = "yes")]
    pub mark: bool,
}

impl Default for Kernel {
    fn default() -> Self {
        Kernel {
            interface: None,
            attach: Spanned::new(0..0, AttachMode::Off),
            ports: Vec::new(),
            default_class: None,
            pin_root: default_pin_root(),
            mark: true,
        }
    }
}

fn default_attach() -> Spanned<AttachMode> {
    Spanned::new(0..0, AttachMode::Tc)
}

fn default_pin_root() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/kedge")
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Class {
    pub name: Spanned<String>,
    /// 0 is the highest priority.
    pub priority: u8,
    /// Drop every new connection of this class in the kernel.
    #[serde(default)]
    pub deny: bool,
    /// New connections per second for the whole class (absent = unlimited).
    pub conn_rate: Option<Spanned<u32>>,
    /// Burst for `conn_rate` (default: the rate, at least 1).
    pub conn_burst: Option<u32>,
    /// New connections per second for each source address of the class.
    pub source_conn_rate: Option<Spanned<u32>>,
    pub source_conn_burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub cidr: Spanned<Cidr>,
    pub class: Spanned<String>,
    pub tenant: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: Spanned<String>,
    /// `http://host:port` or `https://host[:port]` (system roots, plus `ca_file`), spoken to over HTTP/1.1.
    pub url: Spanned<String>,
    /// Ask for `stream_options.include_usage` on streams (turn off for servers that reject it).
    #[serde(default = "yes")]
    pub stream_usage: bool,
    /// When a streaming client goes away: `cancel` the upstream request, or
    /// `drain` it to read the exact usage (paid APIs bill the whole answer anyway).
    #[serde(default)]
    pub on_disconnect: OnDisconnect,
    /// Environment variable holding the key sent upstream as `Authorization: Bearer`.
    pub api_key_env: Option<String>,
    /// Extra PEM CA certificates trusted for this https backend.
    pub ca_file: Option<Spanned<PathBuf>>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Until the response head arrives (and, non-streaming, the whole body): 504 after.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// Longest silence between two chunks of a stream before kedge ends it.
    #[serde(default = "default_stream_idle_timeout_ms")]
    pub stream_idle_timeout_ms: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDisconnect {
    #[default]
    Cancel,
    Drain,
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_response_timeout_ms() -> u64 {
    300_000
}
fn default_stream_idle_timeout_ms() -> u64 {
    120_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Admin listener: `/metrics` (Prometheus text) and `/healthz`.
    pub addr: SocketAddr,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// A config error: where it is and how to fix it.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, when the error has a place in the file.
    pub position: Option<(usize, usize)>,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => {
                write!(f, "{}:{line}:{col}: {}", self.file.display(), self.message)?
            }
            None => write!(f, "{}: {}", self.file.display(), self.message)?,
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The validated configuration, with names resolved to the ids the kernel uses.
#[derive(Debug)]
pub struct Loaded {
    pub path: PathBuf,
    pub raw: Config,
    /// Class id = position in `[[class]]`.
    pub class_ids: HashMap<String, u32>,
    pub default_class: u32,
    /// Tenant name → id (stable: derived from the name).
    pub tenant_ids: HashMap<String, u32>,
    pub ports: Vec<u16>,
    /// Parsed `[[backend]]` URLs, in config order.
    pub backend_uris: Vec<Uri>,
    /// `[[route]]` model → index into `routes`.
    pub route_index: HashMap<String, usize>,
    /// The routes with the `backend` shorthand expanded into one arm.
    pub routes: Vec<RouteConfig>,
    /// `[schedule]` resolved against classes, backends and tenants.
    pub schedule: std::sync::Arc<crate::schedule::Plan>,
    /// The `[budget]` table as written, to tell whether a reload changes it.
    pub budget_toml: String,
}

impl Loaded {
    pub fn class_name(&self, id: u32) -> &str {
        self.raw
            .classes
            .get(id as usize)
            .map(|c| c.name.get_ref().as_str())
            .unwrap_or("unknown")
    }

    pub fn tenant_name(&self, id: u32) -> Option<&str> {
        self.tenant_ids
            .iter()
            .find(|(_, v)| **v == id)
            .map(|(k, _)| k.as_str())
    }

    pub fn attach(&self) -> AttachMode {
        *self.raw.kernel.attach.get_ref()
    }
}

/// Stable tenant id from its name: FNV-1a folded into 1..=65535 (it travels in
/// the low 16 bits of the socket mark). Collisions are config errors.
pub fn tenant_id(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h % 65_535 + 1
}

pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        position: None,
        message: format!("cannot read the config: {e}"),
        hint: None,
    })?;
    parse(path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let err = |span: Option<Range<usize>>, message: String, hint: Option<&str>| ConfigError {
        file: path.to_owned(),
        position: span.map(|s| line_col(text, s.start)),
        message,
        hint: hint.map(str::to_owned),
    };
    let raw: Config = toml::from_str(text).map_err(|e| {
        let hint = if e.message().contains("unknown field") {
            Some("see config/kedge.toml for every key kedge understands")
        } else {
            None
        };
        err(e.span(), e.message().trim().to_string(), hint)
    })?;

    if let Some(t) = &raw.limits.send_timeout_ms
        && *t.get_ref() < MIN_SEND_TIMEOUT_MS
    {
        return Err(err(
            Some(t.span()),
            format!("send_timeout_ms must be at least {MIN_SEND_TIMEOUT_MS}"),
            Some("a client's window closes for moments in normal operation; the default is 60000"),
        ));
    }

    // Classes.
    if raw.classes.is_empty() {
        return Err(err(
            None,
            "no [[class]] defined".into(),
            Some("add at least one, e.g. [[class]] name = \"default\" priority = 3"),
        ));
    }
    if raw.classes.len() > MAX_CLASSES as usize {
        return Err(err(
            Some(raw.classes[MAX_CLASSES as usize].name.span()),
            format!("at most {MAX_CLASSES} classes are supported"),
            None,
        ));
    }
    let mut class_ids = HashMap::new();
    for (i, c) in raw.classes.iter().enumerate() {
        if class_ids
            .insert(c.name.get_ref().clone(), i as u32)
            .is_some()
        {
            return Err(err(
                Some(c.name.span()),
                format!("class `{}` is defined twice", c.name.get_ref()),
                None,
            ));
        }
        for rate in [&c.conn_rate, &c.source_conn_rate].into_iter().flatten() {
            if *rate.get_ref() == 0 || *rate.get_ref() > MAX_CONN_RATE {
                return Err(err(
                    Some(rate.span()),
                    format!("connection rate must be between 1 and {MAX_CONN_RATE} per second"),
                    Some("leave the key out for no limit"),
                ));
            }
        }
    }
    let class_ref = |name: &Spanned<String>| -> Result<u32, ConfigError> {
        class_ids.get(name.get_ref()).copied().ok_or_else(|| {
            let known: Vec<_> = raw
                .classes
                .iter()
                .map(|c| c.name.get_ref().as_str())
                .collect();
            err(
                Some(name.span()),
                format!("unknown class `{}`", name.get_ref()),
                Some(&format!("defined classes: {}", known.join(", "))),
            )
        })
    };
    let default_class = match &raw.kernel.default_class {
        Some(name) => class_ref(name)?,
        None => raw.classes.len() as u32 - 1,
    };

    // Networks, API keys and the tenants they name.
    let mut tenant_ids: HashMap<String, u32> = HashMap::new();
    let mut register_tenant = |t: &Spanned<String>| -> Result<(), ConfigError> {
        let id = tenant_id(t.get_ref());
        if let Some((other, _)) = tenant_ids
            .iter()
            .find(|(k, v)| **v == id && *k != t.get_ref())
        {
            return Err(err(
                Some(t.span()),
                format!(
                    "tenant names `{}` and `{other}` hash to the same id",
                    t.get_ref()
                ),
                Some("rename one of them"),
            ));
        }
        tenant_ids.insert(t.get_ref().clone(), id);
        Ok(())
    };
    let mut seen = HashSet::new();
    for n in &raw.networks {
        class_ref(&n.class)?;
        if !seen.insert(*n.cidr.get_ref()) {
            return Err(err(
                Some(n.cidr.span()),
                format!("network {} is listed twice", n.cidr.get_ref()),
                None,
            ));
        }
        if let Some(t) = &n.tenant {
            register_tenant(t)?;
        }
    }
    let mut key_names = HashSet::new();
    let mut key_hashes = HashSet::new();
    for k in &raw.api_keys {
        if !key_names.insert(k.name.get_ref().as_str()) {
            return Err(err(
                Some(k.name.span()),
                format!("api_key `{}` is defined twice", k.name.get_ref()),
                None,
            ));
        }
        let h = k.sha256.get_ref();
        if h.len() != 64
            || !h
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(err(
                Some(k.sha256.span()),
                "sha256 must be 64 lower-case hex digits".into(),
                Some("printf %s \"$KEY\" | sha256sum"),
            ));
        }
        if !key_hashes.insert(h.as_str()) {
            return Err(err(
                Some(k.sha256.span()),
                "two api keys have the same sha256".into(),
                None,
            ));
        }
        register_tenant(&k.tenant)?;
        if let Some(c) = &k.class {
            class_ref(c)?;
        }
    }
    // Tenants with budgets are tenants too (a trusted header may name them).
    for t in &raw.budget.tenants {
        register_tenant(&t.name)?;
    }
    if raw.classify.require_api_key && raw.api_keys.is_empty() {
        return Err(err(
            None,
            "classify.require_api_key is set but no [[api_key]] is defined".into(),
            Some("add [[api_key]] entries or set require_api_key = false"),
        ));
    }
    let mut steps = HashSet::new();
    if let Some(step) = raw.classify.order.iter().find(|s| !steps.insert(**s)) {
        return Err(err(
            None,
            format!("classify.order names {step:?} twice"),
            None,
        ));
    }
    for name in [&raw.classify.tenant_header, &raw.classify.class_header] {
        if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(err(
                None,
                format!("`{name}` is not a valid header name"),
                None,
            ));
        }
    }

    // Kernel.
    let attach = *raw.kernel.attach.get_ref();
    if attach != AttachMode::Off && raw.kernel.interface.is_none() {
        return Err(err(
            Some(raw.kernel.attach.span()),
            format!("attach = \"{}\" needs kernel.interface", attach.as_str()),
            Some("name the interface clients arrive on, or set attach = \"off\""),
        ));
    }
    let ports = if raw.kernel.ports.is_empty() {
        vec![raw.listen.addr.port()]
    } else {
        raw.kernel.ports.clone()
    };
    if ports.len() > MAX_PORTS || ports.contains(&0) {
        return Err(err(
            None,
            format!("kernel.ports takes 1 to {MAX_PORTS} non-zero ports"),
            None,
        ));
    }

    // Backends.
    if raw.backends.is_empty() {
        return Err(err(
            None,
            "no [[backend]] defined".into(),
            Some("add one, e.g. [[backend]] name = \"local\" url = \"http://127.0.0.1:8000\""),
        ));
    }
    let mut backend_uris = Vec::new();
    let mut backend_ids = HashMap::new();
    for (i, b) in raw.backends.iter().enumerate() {
        if backend_ids.insert(b.name.get_ref().as_str(), i).is_some() {
            return Err(err(
                Some(b.name.span()),
                format!("backend `{}` is defined twice", b.name.get_ref()),
                None,
            ));
        }
        let uri: Uri = b.url.get_ref().parse().map_err(|e| {
            err(
                Some(b.url.span()),
                format!("invalid backend url: {e}"),
                None,
            )
        })?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
            return Err(err(
                Some(b.url.span()),
                format!(
                    "backend url `{}` must be http://host:port or https://host[:port]",
                    b.url.get_ref()
                ),
                None,
            ));
        }
        if let Some(ca) = &b.ca_file
            && !ca.get_ref().is_file()
        {
            return Err(err(
                Some(ca.span()),
                format!("ca_file {} is not a readable file", ca.get_ref().display()),
                None,
            ));
        }
        backend_uris.push(uri);
    }

    // Routes.
    let mut route_index = HashMap::new();
    let mut routes = Vec::new();
    for r in &raw.routes {
        let r = r.normalized().map_err(|(span, message)| {
            err(
                span,
                message,
                Some("e.g. backend = \"local\", or [[route.arm]] tables"),
            )
        })?;
        for arm in &r.arms {
            if !backend_ids.contains_key(arm.backend.get_ref().as_str()) {
                let known: Vec<_> = raw
                    .backends
                    .iter()
                    .map(|b| b.name.get_ref().as_str())
                    .collect();
                return Err(err(
                    Some(arm.backend.span()),
                    format!("unknown backend `{}`", arm.backend.get_ref()),
                    Some(&format!("defined backends: {}", known.join(", "))),
                ));
            }
        }
        routes.push(r.clone());
        if route_index
            .insert(r.model.get_ref().clone(), routes.len() - 1)
            .is_some()
        {
            return Err(err(
                Some(r.model.span()),
                format!("model `{}` is routed twice", r.model.get_ref()),
                None,
            ));
        }
    }
    for k in &raw.api_keys {
        for m in k.models.iter().flatten() {
            if !raw.routes.is_empty() && !route_index.contains_key(m.get_ref()) {
                return Err(err(
                    Some(m.span()),
                    format!(
                        "api_key allows model `{}`, which no [[route]] serves",
                        m.get_ref()
                    ),
                    None,
                ));
            }
        }
    }

    // TLS files: a typo should fail `check-config`, not the first handshake.
    if let Some(tls) = &raw.listen.tls {
        for f in [&tls.cert, &tls.key] {
            if !f.get_ref().is_file() {
                return Err(err(
                    Some(f.span()),
                    format!("{} is not a readable file", f.get_ref().display()),
                    None,
                ));
            }
        }
    }

    // Budgets.
    let backend_names: Vec<&str> = raw
        .backends
        .iter()
        .map(|b| b.name.get_ref().as_str())
        .collect();
    let mut budget_errors = raw.budget.validate();
    budget_errors.extend(raw.budget.check_backends(&backend_names));
    if let Some(e) = budget_errors.into_iter().next() {
        return Err(err(e.span, e.message, e.hint.as_deref()));
    }

    // Scheduling.
    let class_refs: Vec<ClassRef<'_>> = raw
        .classes
        .iter()
        .map(|c| ClassRef {
            name: c.name.get_ref(),
            priority: c.priority,
        })
        .collect();
    let backend_names: Vec<&str> = raw
        .backends
        .iter()
        .map(|b| b.name.get_ref().as_str())
        .collect();
    let schedule = raw
        .schedule
        .resolve(&class_refs, &backend_names, &tenant_ids)
        .map_err(|e| err(e.span, e.message, e.hint.as_deref()))?;

    Ok(Loaded {
        path: path.to_owned(),
        class_ids,
        default_class,
        tenant_ids,
        ports,
        backend_uris,
        route_index,
        routes,
        schedule: std::sync::Arc::new(schedule),
        budget_toml: text
            .parse::<toml::Table>()
            .ok()
            .and_then(|t| t.get("budget").map(|b| b.to_string()))
            .unwrap_or_default(),
        raw,
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[listen]
addr = "0.0.0.0:8080"

[kernel]
interface = "eth0"
attach = "xdp"

[[class]]
name = "interactive"
priority = 0

[[class]]
name = "batch"
priority = 3
conn_rate = 50
source_conn_rate = 5

[[class]]
name = "blocked"
priority = 4
deny = true

[[network]]
cidr = "10.0.0.0/8"
class = "interactive"
tenant = "team-a"

[[network]]
cidr = "fd00::/8"
class = "batch"

[[backend]]
name = "local"
url = "http://127.0.0.1:8000"
"#;

    fn parse_str(s: &str) -> Result<Loaded, ConfigError> {
        parse(Path::new("kedge.toml"), s)
    }

    #[test]
    fn parses_a_full_config() {
        let c = parse_str(GOOD).unwrap();
        assert_eq!(c.attach(), AttachMode::Xdp);
        assert_eq!(c.class_ids["batch"], 1);
        assert_eq!(c.default_class, 2, "defaults to the last class");
        assert_eq!(c.ports, vec![8080]);
        assert_eq!(c.tenant_ids["team-a"], tenant_id("team-a"));
        assert_eq!(c.backend_uris[0].to_string(), "http://127.0.0.1:8000/");
        assert_eq!(c.raw.metrics.addr.port(), 9464);
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let bad = GOOD.replace("deny = true", "deny = true\nbogus = 1");
        let e = parse_str(&bad).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("kedge.toml:23:"), "{s}");
        assert!(s.contains("unknown field `bogus`"), "{s}");
        assert!(s.contains("hint:"), "{s}");
    }

    #[test]
    fn unknown_class_names_its_line_and_the_known_ones() {
        let bad = GOOD.replace("class = \"batch\"", "class = \"bulk\"");
        let e = parse_str(&bad).unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(31));
        let s = e.to_string();
        assert!(s.contains("unknown class `bulk`"), "{s}");
        assert!(s.contains("interactive, batch, blocked"), "{s}");
    }

    #[test]
    fn bad_cidr_points_at_the_value() {
        let bad = GOOD.replace("10.0.0.0/8", "10.1.0.0/8");
        let e = parse_str(&bad).unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(25));
        assert!(e.to_string().contains("did you mean 10.0.0.0/8"), "{e}");
    }

    #[test]
    fn attach_needs_an_interface() {
        let bad = GOOD.replace("interface = \"eth0\"\n", "");
        let e = parse_str(&bad).unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(6));
        assert!(e.to_string().contains("needs kernel.interface"), "{e}");
    }

    #[test]
    fn a_send_timeout_defaults_to_nginx_s_and_a_tiny_one_is_refused_with_its_line() {
        let c = parse_str(GOOD).unwrap();
        assert_eq!(c.raw.limits.send_timeout().as_millis(), 60_000);
        let with = |ms: u64| {
            GOOD.replace(
                "[listen]",
                &format!("[limits]\nsend_timeout_ms = {ms}\n[listen]"),
            )
        };
        let c = parse_str(&with(2500)).unwrap();
        assert_eq!(c.raw.limits.send_timeout().as_millis(), 2500);
        let e = parse_str(&with(0)).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("send_timeout_ms must be at least 100"),
            "{text}"
        );
        assert!(text.contains("kedge.toml:3"), "the key's line: {text}");
        assert!(text.contains("default is 60000"), "a hint: {text}");
    }

    #[test]
    fn rejects_zero_rate_duplicate_class_and_missing_backend() {
        let e = parse_str(&GOOD.replace("conn_rate = 50", "conn_rate = 0")).unwrap_err();
        assert!(e.to_string().contains("between 1 and"), "{e}");
        let e = parse_str(&GOOD.replace("name = \"batch\"", "name = \"interactive\"")).unwrap_err();
        assert!(e.to_string().contains("defined twice"), "{e}");
        let cut = GOOD.find("[[backend]]").unwrap();
        let e = parse_str(&GOOD[..cut]).unwrap_err();
        assert!(e.to_string().contains("missing field `backend`"), "{e}");
        let e = parse_str(&GOOD.replace("http://127.0.0.1:8000", "ftp://x")).unwrap_err();
        assert!(e.to_string().contains("must be http://"), "{e}");
        let e = parse_str(&format!(
            "{GOOD}[[route]]\nmodel = \"m\"\nbackend = \"nope\"\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("unknown backend `nope`"), "{e}");
    }

    #[test]
    fn checks_api_keys_routes_and_tls_files() {
        let key = |sha: &str| {
            format!("{GOOD}[[api_key]]\nname = \"k\"\nsha256 = \"{sha}\"\ntenant = \"t\"\n")
        };
        let bad = key("ABC");
        let e = parse_str(&bad).unwrap_err();
        assert!(e.to_string().contains("64 lower-case hex"), "{e}");
        let line = bad[..bad.find("sha256").unwrap()].matches('\n').count() + 1;
        assert_eq!(e.position.map(|p| p.0), Some(line));
        let c = parse_str(&key(&"a".repeat(64))).unwrap();
        assert_eq!(c.tenant_ids["t"], tenant_id("t"), "key tenants are tenants");

        let routed = format!(
            "{GOOD}[[route]]\nmodel = \"m\"\nbackend = \"local\"\nupstream_model = \"org/m\"\n"
        );
        let loaded = parse_str(&routed).unwrap();
        assert_eq!(loaded.route_index["m"], 0);
        assert_eq!(loaded.routes[0].arms[0].backend.get_ref(), "local");
        assert_eq!(
            loaded.routes[0].arms[0].upstream_model.as_deref(),
            Some("org/m")
        );
        let twice = format!("{routed}[[route]]\nmodel = \"m\"\nbackend = \"local\"\n");
        assert!(
            parse_str(&twice)
                .unwrap_err()
                .to_string()
                .contains("routed twice")
        );

        let required = GOOD.replacen(
            "[[class]]",
            "[classify]\nrequire_api_key = true\n\n[[class]]",
            1,
        );
        let e = parse_str(&required).unwrap_err();
        assert!(e.to_string().contains("no [[api_key]]"), "{e}");

        let tls = GOOD.replace(
            "addr = \"0.0.0.0:8080\"",
            "addr = \"0.0.0.0:8080\"\ntls = { cert = \"/nonexistent.pem\", key = \"/nonexistent.key\" }",
        );
        let e = parse_str(&tls).unwrap_err();
        assert!(
            e.to_string()
                .contains("/nonexistent.pem is not a readable file"),
            "{e}"
        );
        assert_eq!(e.position.map(|p| p.0), Some(4));
    }

    #[test]
    fn tenant_ids_are_stable_and_in_range() {
        assert_eq!(tenant_id("team-a"), tenant_id("team-a"));
        assert_ne!(tenant_id("team-a"), tenant_id("team-b"));
        for name in ["", "a", "a-very-long-tenant-name"] {
            assert!((1..=65_535).contains(&tenant_id(name)));
        }
    }

    #[test]
    fn the_shipped_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/kedge.toml");
        load(&path).unwrap();
    }
}
