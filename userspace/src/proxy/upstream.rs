//! Backends: one pooled HTTP/1.1 client each (`h1`: http, or https through
//! rustls), and the mapping of upstream trouble to a status:
//! - 503 `backend_unavailable`: no connection could be made (refused, connect
//!   timeout, TLS failure); nothing was sent, the backend is down for now
//! - 504 `upstream_timeout`: connected, but no answer within `response_timeout_ms`
//! - 502 `bad_gateway`: the answer was not HTTP, broke off, or was not JSON

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use bytes::Bytes;
use hyper::{Method, Response, StatusCode, Uri, header::HeaderValue};

use super::{h1, headers::Forwarded};
use crate::{
    config::{self, Loaded, OnDisconnect},
    openai::{ApiError, Endpoint},
};

/// The body of a backend's answer, read by the task that polls it.
pub type UpstreamBody = h1::ResponseBody;

/// One `[[backend]]`, ready to send to.
pub struct Backend {
    /// Shared with settlements and ledger rows.
    pub name: Arc<str>,
    /// The backend URL's path, without a trailing `/`: prefixes request paths.
    prefix: String,
    /// The path of each [`Endpoint`] (`Endpoint as usize`), built once rather
    /// than formatted per request.
    endpoint_paths: Vec<String>,
    client: Arc<h1::Client>,
    /// `Authorization` sent upstream (from `api_key_env`); never logged.
    auth: Option<HeaderValue>,
    pub response_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub stream_usage: bool,
    pub on_disconnect: OnDisconnect,
}

impl Backend {
    fn new(spec: &config::Backend, base: &Uri) -> Result<Backend> {
        let name: Arc<str> = spec.name.get_ref().as_str().into();
        let tls = match base.scheme_str() {
            Some("https") => Some(
                super::tls::client_config(spec.ca_file.as_ref().map(|p| p.get_ref().as_path()))
                    .with_context(|| format!("backend `{name}`"))?,
            ),
            _ => None,
        };
        let client = h1::Client::new(base, tls, Duration::from_millis(spec.connect_timeout_ms))
            .with_context(|| format!("backend `{name}`"))?;
        let auth = match &spec.api_key_env {
            Some(var) => {
                let key = std::env::var(var).with_context(|| {
                    format!("backend `{name}`: environment variable {var} (api_key_env) is not set")
                })?;
                let mut v = HeaderValue::from_str(&format!("Bearer {key}")).with_context(|| {
                    format!("backend `{name}`: {var} is not a valid header value")
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let prefix = base.path().trim_end_matches('/').to_string();
        let endpoint_paths = ENDPOINTS
            .iter()
            .map(|e| format!("{prefix}{}", e.path()))
            .collect();
        Ok(Backend {
            name,
            prefix,
            endpoint_paths,
            client,
            auth,
            response_timeout: Duration::from_millis(spec.response_timeout_ms),
            stream_idle_timeout: Duration::from_millis(spec.stream_idle_timeout_ms),
            stream_usage: spec.stream_usage,
            on_disconnect: spec.on_disconnect,
        })
    }

    /// Sends one request; the response head must arrive within `response_timeout`.
    /// The backend's own key (`api_key_env`) replaces the client's `Authorization`.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &Forwarded,
        body: Bytes,
    ) -> Result<Response<UpstreamBody>, ApiError> {
        let joined;
        let path = match Endpoint::from_path(path) {
            Some(e) => self.endpoint_paths[e as usize].as_str(),
            None => {
                joined = format!("{}{path}", self.prefix);
                joined.as_str()
            }
        };
        let auth = self.auth.as_ref().or(headers.authorization.as_ref());
        let sent = self.client.send(&method, path, &headers.lines, auth, &body);
        match tokio::time::timeout(self.response_timeout, sent).await {
            Err(_) => Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                "upstream_timeout",
                format!(
                    "The backend `{}` did not answer within {} ms",
                    self.name,
                    self.response_timeout.as_millis()
                ),
            )),
            Ok(Err(e @ h1::Error::Connect(_))) => {
                tracing::warn!(backend = %self.name, error = %chain(&e), "upstream connect failed");
                Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream_error",
                    "backend_unavailable",
                    format!("The backend `{}` is not reachable", self.name),
                ))
            }
            Ok(Err(e)) => {
                tracing::warn!(backend = %self.name, error = %chain(&e), "upstream request failed");
                Err(bad_gateway(&self.name, "did not return a valid response"))
            }
            Ok(Ok(resp)) => Ok(resp),
        }
    }
}

/// Every [`Endpoint`], in declaration order (`Endpoint as usize`).
const ENDPOINTS: [Endpoint; 3] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Embeddings,
];

/// An error and its causes, `: `-joined (hyper's own message is terse).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

pub fn bad_gateway(backend: &str, what: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "upstream_error",
        "bad_gateway",
        format!("The backend `{backend}` {what}"),
    )
}

/// Every backend, indexed as in the config.
pub fn backends(cfg: &Loaded) -> Result<Vec<Backend>> {
    cfg.raw
        .backends
        .iter()
        .zip(&cfg.backend_uris)
        .map(|(spec, uri)| Backend::new(spec, uri))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_indexed_in_declaration_order() {
        for (i, e) in ENDPOINTS.iter().enumerate() {
            assert_eq!(*e as usize, i);
        }
    }
}
