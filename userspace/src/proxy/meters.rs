//! The metric children one request touches, found by the proxy's config ids
//! ([`Children`]), and the response header values it sends, built once per
//! config: a request formats no label and no header value of its own.

use std::{collections::HashMap, sync::Arc};

use hyper::header::HeaderValue;
use prometheus::{Counter, Histogram, IntCounter};

use super::upstream::Backend;
use crate::{
    config::{self, Loaded},
    idhash::IdHasher,
    metrics::{Children, Metrics},
    route::Reason,
};

/// Label of a request without a tenant.
pub const NO_TENANT: &str = "-";

/// Keys: `class` and `route` are positions in the config, `tenant` is
/// [`config::tenant_id`] (0: none), `backend` an index into `[[backend]]`.
pub struct RequestMeters {
    /// class, tenant, status
    pub requests: Children<(u32, u32, u16), IntCounter>,
    /// route, first arm's backend, reason
    pub route_decisions: Children<(u32, u32, u8), IntCounter>,
    /// route, served locally
    pub route_served: Children<(u32, bool), IntCounter>,
    /// backend, class
    pub queue_wait: Children<(u32, u32), Histogram>,
    /// backend, class
    pub queue_admitted: Children<(u32, u32), IntCounter>,
    /// class, backend
    pub first_byte: Children<(u32, u32), Histogram>,
    /// class, route
    pub request_duration: Children<(u32, u32), Histogram>,
    /// tenant, backend
    pub spend: Children<(u32, u32), Counter>,
    /// direction (0 input, 1 output), class, tenant
    pub tokens: Children<(u8, u32, u32), IntCounter>,
}

impl RequestMeters {
    pub fn new(metrics: &Arc<Metrics>) -> RequestMeters {
        RequestMeters {
            requests: Children::of(&metrics.requests),
            route_decisions: Children::of(&metrics.route_decisions),
            route_served: Children::of(&metrics.route_served),
            queue_wait: Children::of(&metrics.queue_wait),
            queue_admitted: Children::of(&metrics.queue_admitted),
            first_byte: Children::of(&metrics.first_byte),
            request_duration: Children::of(&metrics.request_duration),
            spend: Children::of(&metrics.spend),
            tokens: Children::of(&metrics.tokens),
        }
    }
}

/// The tenant key and label of an optional tenant name.
pub fn tenant_key(tenant: Option<&str>) -> (u32, &str) {
    match tenant {
        Some(t) => (config::tenant_id(t), t),
        None => (0, NO_TENANT),
    }
}

/// `x-kedge-class`, `x-kedge-tenant` and `x-kedge-route` values, built from
/// the config; names that are not valid header values are left out, as before.
pub struct HeaderValues {
    classes: Vec<Option<HeaderValue>>,
    tenants: HashMap<u32, HeaderValue, IdHasher>,
    /// (backend or `u32::MAX` for none, reason) → `<backend>; reason=<why>`.
    routes: HashMap<(u32, &'static str), HeaderValue, IdHasher>,
}

/// Every routing reason a request can carry.
pub const ONLY_BACKEND: &str = "only_backend";

impl HeaderValues {
    pub fn new(cfg: &Loaded, backends: &[Backend]) -> HeaderValues {
        let reasons = Reason::ALL.iter().map(|r| r.label()).chain([ONLY_BACKEND]);
        let mut routes = HashMap::default();
        for reason in reasons {
            let named = backends
                .iter()
                .enumerate()
                .map(|(i, b)| (i as u32, &*b.name));
            for (id, name) in named.chain([(u32::MAX, "-")]) {
                if let Ok(v) = HeaderValue::from_str(&format!("{name}; reason={reason}")) {
                    routes.insert((id, reason), v);
                }
            }
        }
        HeaderValues {
            classes: cfg
                .raw
                .classes
                .iter()
                .map(|c| HeaderValue::from_str(c.name.get_ref()).ok())
                .collect(),
            tenants: cfg
                .tenant_ids
                .iter()
                .filter_map(|(name, id)| Some((*id, HeaderValue::from_str(name).ok()?)))
                .collect(),
            routes,
        }
    }

    pub fn class(&self, class: u32) -> Option<HeaderValue> {
        self.classes.get(class as usize).cloned().flatten()
    }

    pub fn tenant(&self, tenant: Option<&str>) -> HeaderValue {
        match tenant {
            Some(t) => self
                .tenants
                .get(&config::tenant_id(t))
                .cloned()
                .unwrap_or_else(|| {
                    HeaderValue::from_str(t).unwrap_or(HeaderValue::from_static(NO_TENANT))
                }),
            None => HeaderValue::from_static(NO_TENANT),
        }
    }

    pub fn route(&self, backend: Option<usize>, reason: &'static str) -> Option<HeaderValue> {
        let id = backend.map_or(u32::MAX, |b| b as u32);
        self.routes.get(&(id, reason)).cloned()
    }
}
