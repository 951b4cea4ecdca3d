//! Who is this request, and which class does it run in.
//!
//! A chain of steps in the configured order (`classify.order`): the API key,
//! a trusted header, the kernel's tag for the connection. Each attribute
//! (tenant, class) comes from the first step that supplies one; the default
//! class applies last. Pure: the caller hands in the facts, nothing here does I/O.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use hyper::{
    HeaderMap, StatusCode,
    header::{self, HeaderName},
};
use sha2::{Digest, Sha256};

use crate::{
    cidr::Cidr,
    config::{self, ClassifyStep, Loaded},
    idhash::IdHasher,
    openai::ApiError,
};

/// What an `[[api_key]]` grants. The key itself is never held, only its hash.
#[derive(Debug)]
struct KeyGrant {
    name: Arc<str>,
    tenant: Arc<str>,
    class: Option<u32>,
    models: Option<Arc<HashSet<String>>>,
}

/// What the request and its connection tell about the caller.
pub struct Facts<'a> {
    pub headers: &'a HeaderMap,
    pub peer: IpAddr,
    /// The kernel's (class, tenant id) for the connection; tenant 0 = none.
    pub kernel: (u32, u32),
}

/// The outcome: every later stage reads these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Shared names (cloned into the settlement and the ledger row at the
    /// cost of a reference count, not a copy).
    pub tenant: Option<Arc<str>>,
    pub class: u32,
    /// Name of the `[[api_key]]` that authenticated the request.
    pub api_key: Option<Arc<str>>,
    /// Models the key may use; `None` = all.
    pub models: Option<Arc<HashSet<String>>>,
    /// Tenant/class headers arrived from an untrusted source and were ignored.
    pub ignored_untrusted_header: bool,
}

impl Identity {
    /// 403 unless the identity may use `model`.
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        match &self.models {
            Some(allowed) if !allowed.contains(model) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "model_not_allowed",
                format!("This API key may not use the model `{model}`"),
            )),
            _ => Ok(()),
        }
    }
}

pub struct Classifier {
    order: Vec<ClassifyStep>,
    require_key: bool,
    /// Lower-case hex SHA-256 of the key → grant.
    keys: HashMap<String, KeyGrant>,
    trusted: Vec<Cidr>,
    /// Parsed once (validated by the config): a lookup by name costs a parse.
    tenant_header: HeaderName,
    class_header: HeaderName,
    class_ids: HashMap<String, u32>,
    /// Tenant names (shared) by id: the kernel tags by id; a name is looked
    /// up by its id ([`config::tenant_id`], collision-free within a config).
    tenants: HashMap<u32, Arc<str>, IdHasher>,
    default_class: u32,
}

/// Attributes gathered so far along the chain.
#[derive(Default)]
struct Partial {
    tenant: Option<Arc<str>>,
    class: Option<u32>,
}

impl Partial {
    fn offer(&mut self, tenant: Option<Arc<str>>, class: Option<u32>) {
        if self.tenant.is_none() {
            self.tenant = tenant;
        }
        if self.class.is_none() {
            self.class = class;
        }
    }
}

impl Classifier {
    pub fn from_config(cfg: &Loaded) -> Classifier {
        let c = &cfg.raw.classify;
        let keys = cfg
            .raw
            .api_keys
            .iter()
            .map(|k| {
                let grant = KeyGrant {
                    name: k.name.get_ref().as_str().into(),
                    tenant: k.tenant.get_ref().as_str().into(),
                    class: k.class.as_ref().map(|c| cfg.class_ids[c.get_ref()]),
                    models: k
                        .models
                        .as_ref()
                        .map(|m| Arc::new(m.iter().map(|s| s.get_ref().clone()).collect())),
                };
                (k.sha256.get_ref().clone(), grant)
            })
            .collect();
        Classifier {
            order: c.order.clone(),
            require_key: c.require_api_key,
            keys,
            trusted: c.trusted_cidrs.iter().map(|c| *c.get_ref()).collect(),
            tenant_header: header_name(&c.tenant_header),
            class_header: header_name(&c.class_header),
            class_ids: cfg.class_ids.clone(),
            tenants: cfg
                .tenant_ids
                .iter()
                .map(|(name, id)| (*id, Arc::from(name.as_str())))
                .collect(),
            default_class: cfg.default_class,
        }
    }

    /// The tenant of the kernel's tag (tenant id 0: none).
    pub fn kernel_tenant(&self, id: u32) -> Option<Arc<str>> {
        self.tenants.get(&id).cloned()
    }

    /// Headers kedge consumes and must not forward upstream.
    pub fn consumed_headers(&self) -> [&HeaderName; 2] {
        [&self.tenant_header, &self.class_header]
    }

    /// Whether the client's `Authorization` is a kedge key (not the upstream's).
    pub fn owns_authorization(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn classify(&self, facts: &Facts<'_>) -> Result<Identity, ApiError> {
        let mut got = Partial::default();
        let mut ignored_untrusted_header = false;
        // Authentication does not depend on the order: an unknown key is
        // refused wherever the api_key step stands.
        let grant = if self.keys.is_empty() {
            None
        } else {
            self.authenticate(facts.headers)?
        };
        for step in &self.order {
            match step {
                ClassifyStep::ApiKey => {
                    if let Some(g) = grant {
                        got.offer(Some(g.tenant.clone()), g.class);
                    }
                }
                ClassifyStep::Header => {
                    let tenant = header_str(facts.headers, &self.tenant_header);
                    let class = header_str(facts.headers, &self.class_header);
                    if tenant.is_none() && class.is_none() {
                        continue;
                    }
                    if !self.trusted.iter().any(|c| c.contains(facts.peer)) {
                        ignored_untrusted_header = true;
                        continue;
                    }
                    let tenant = tenant.map(|t| self.known_tenant(t)).transpose()?;
                    let class = class.map(|c| self.known_class(c)).transpose()?;
                    got.offer(tenant, class);
                }
                ClassifyStep::Kernel => {
                    let (class, tenant_id) = facts.kernel;
                    let tenant = self.kernel_tenant(tenant_id);
                    got.offer(tenant, Some(class));
                }
            }
        }
        Ok(Identity {
            tenant: got.tenant,
            class: got.class.unwrap_or(self.default_class),
            api_key: grant.map(|g| g.name.clone()),
            models: grant.and_then(|g| g.models.clone()),
            ignored_untrusted_header,
        })
    }

    /// The grant of the presented key; 401 for an unknown key, or a missing
    /// one when keys are required.
    fn authenticate(&self, headers: &HeaderMap) -> Result<Option<&KeyGrant>, ApiError> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty());
        let Some(key) = presented else {
            if self.require_key {
                return Err(unauthorized(
                    "missing_api_key",
                    "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                ));
            }
            return Ok(None);
        };
        let hash = sha256_hex(key.as_bytes());
        match self.keys.get(&hash) {
            Some(grant) => Ok(Some(grant)),
            None => Err(unauthorized(
                "invalid_api_key",
                "Incorrect API key provided.",
            )),
        }
    }

    fn known_tenant(&self, name: &str) -> Result<Arc<str>, ApiError> {
        let known = self.tenants.get(&config::tenant_id(name));
        known.filter(|t| ***t == *name).cloned().ok_or_else(|| {
            ApiError::invalid(
                "unknown_tenant",
                format!("The trusted tenant header names an unknown tenant `{name}`"),
            )
        })
    }

    fn known_class(&self, name: &str) -> Result<u32, ApiError> {
        self.class_ids.get(name).copied().ok_or_else(|| {
            ApiError::invalid(
                "unknown_class",
                format!("The trusted class header names an unknown class `{name}`"),
            )
        })
    }
}

/// A configured header name (checked by the config loader; an invalid one
/// names no header a client can send).
fn header_name(name: &str) -> HeaderName {
    HeaderName::from_bytes(name.as_bytes())
        .unwrap_or_else(|_| HeaderName::from_static("x-kedge-invalid-header-name"))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn unauthorized(code: &'static str, message: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        code,
        message.to_string(),
    )
}

/// Lower-case hex SHA-256, the form `[[api_key]] sha256` is written in.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use hyper::header::HeaderValue;

    use super::*;
    use crate::config;

    fn classifier(extra: &str) -> Classifier {
        let text = format!(
            r#"
[listen]
addr = "127.0.0.1:8080"
[kernel]
attach = "off"
default_class = "standard"
[[class]]
name = "interactive"
priority = 0
[[class]]
name = "standard"
priority = 2
[[class]]
name = "batch"
priority = 3
[[network]]
cidr = "10.1.0.0/16"
class = "batch"
tenant = "lab"
[[backend]]
name = "local"
url = "http://127.0.0.1:8000"
[[route]]
model = "small"
backend = "local"
[[route]]
model = "big"
backend = "local"
[[api_key]]
name = "ci"
sha256 = "{}"
tenant = "product"
class = "interactive"
models = ["small"]
{extra}
"#,
            sha256_hex(b"sk-good")
        );
        Classifier::from_config(&config::parse(Path::new("t.toml"), &text).unwrap())
    }

    fn facts<'a>(headers: &'a HeaderMap, peer: &str, kernel: (u32, u32)) -> Facts<'a> {
        Facts {
            headers,
            peer: peer.parse().unwrap(),
            kernel,
        }
    }

    fn with(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn sha256_matches_a_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn api_key_sets_tenant_class_and_models() {
        let c = classifier("");
        let h = with(&[("authorization", "Bearer sk-good")]);
        let id = c
            .classify(&facts(&h, "10.1.2.3", (2, config::tenant_id("lab"))))
            .unwrap();
        assert_eq!(id.tenant.as_deref(), Some("product"));
        assert_eq!(id.class, 0);
        assert_eq!(id.api_key.as_deref(), Some("ci"));
        assert!(id.check_model("small").is_ok());
        assert_eq!(id.check_model("big").unwrap_err().status, 403);
    }

    #[test]
    fn unknown_key_is_401_and_missing_key_only_when_required() {
        let c = classifier("");
        let h = with(&[("authorization", "Bearer sk-bad")]);
        let e = c.classify(&facts(&h, "10.1.2.3", (2, 0))).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (401, "invalid_api_key"));
        assert!(!e.message.contains("sk-bad"), "the key is never echoed");
        let none = HeaderMap::new();
        let id = c
            .classify(&facts(&none, "10.1.2.3", (2, config::tenant_id("lab"))))
            .unwrap();
        assert_eq!((id.tenant.as_deref(), id.class), (Some("lab"), 2));

        let c = classifier("[classify]\nrequire_api_key = true\n");
        let e = c.classify(&facts(&none, "10.1.2.3", (2, 0))).unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (401, "missing_api_key"));
    }

    #[test]
    fn trusted_headers_only_count_from_trusted_sources() {
        let c = classifier("[classify]\ntrusted_cidrs = [\"192.0.2.0/24\"]\n");
        let h = with(&[("x-kedge-tenant", "lab"), ("x-kedge-class", "batch")]);
        let id = c.classify(&facts(&h, "192.0.2.7", (1, 0))).unwrap();
        assert_eq!((id.tenant.as_deref(), id.class), (Some("lab"), 2));
        assert!(!id.ignored_untrusted_header);

        let id = c.classify(&facts(&h, "198.51.100.1", (1, 0))).unwrap();
        assert_eq!((id.tenant, id.class), (None, 1), "kernel tag decides");
        assert!(id.ignored_untrusted_header);

        let h = with(&[("x-kedge-tenant", "ghost")]);
        let e = c.classify(&facts(&h, "192.0.2.7", (1, 0))).unwrap_err();
        assert_eq!(e.code, "unknown_tenant");
    }

    #[test]
    fn order_decides_who_wins_and_default_comes_last() {
        let h = with(&[
            ("authorization", "Bearer sk-good"),
            ("x-kedge-class", "batch"),
        ]);
        let c = classifier(
            "[classify]\norder = [\"header\", \"api_key\"]\ntrusted_cidrs = [\"127.0.0.0/8\"]\n",
        );
        let id = c.classify(&facts(&h, "127.0.0.1", (0, 0))).unwrap();
        assert_eq!(id.class, 2, "header first: its class wins");
        assert_eq!(id.tenant.as_deref(), Some("product"), "tenant from the key");

        let c = classifier("[classify]\norder = []\n");
        let id = c
            .classify(&facts(&HeaderMap::new(), "127.0.0.1", (0, 0)))
            .unwrap();
        assert_eq!((id.tenant, id.class), (None, 1), "default_class = standard");
    }
}
