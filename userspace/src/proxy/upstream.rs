//! Backends: one pooled hyper client each (http, or https through rustls with
//! ALPN h2/http1.1), and the mapping of upstream trouble to a status:
//! - 503 `backend_unavailable`: no connection could be made (refused, connect
//!   timeout, TLS failure); nothing was sent, the backend is down for now
//! - 504 `upstream_timeout`: connected, but no answer within `response_timeout_ms`
//! - 502 `bad_gateway`: the answer was not HTTP, broke off, or was not JSON

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode, Uri,
    body::Incoming,
    header::{self, HeaderValue},
};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};

use crate::{
    config::{self, Loaded, OnDisconnect},
    openai::{ApiError, Endpoint},
};

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One `[[backend]]`, ready to send to.
pub struct Backend {
    pub name: String,
    base: Uri,
    /// The URI of each [`Endpoint`] (`Endpoint as usize`), built once rather
    /// than formatted and parsed per request. `None` if it does not build: the
    /// request then fails as before, from [`uri`].
    endpoint_uris: Vec<Option<Uri>>,
    client: HttpClient,
    /// `Authorization` sent upstream (from `api_key_env`); never logged.
    auth: Option<HeaderValue>,
    pub response_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub stream_usage: bool,
    pub on_disconnect: OnDisconnect,
}

impl Backend {
    fn new(spec: &config::Backend, base: &Uri) -> Result<Backend> {
        let name = spec.name.get_ref().clone();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_millis(spec.connect_timeout_ms)));
        let tls = super::tls::client_config(spec.ca_file.as_ref().map(|p| p.get_ref().as_path()))
            .with_context(|| format!("backend `{name}`"))?;
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .build(connector);
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
        let endpoint_uris = ENDPOINTS.iter().map(|e| uri(base, e.path()).ok()).collect();
        Ok(Backend {
            name,
            base: base.clone(),
            endpoint_uris,
            client,
            auth,
            response_timeout: Duration::from_millis(spec.response_timeout_ms),
            stream_idle_timeout: Duration::from_millis(spec.stream_idle_timeout_ms),
            stream_usage: spec.stream_usage,
            on_disconnect: spec.on_disconnect,
        })
    }

    /// Sends one request; the response head must arrive within `response_timeout`.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response<Incoming>, ApiError> {
        let built = Endpoint::from_path(path).and_then(|e| self.endpoint_uris[e as usize].clone());
        let uri = match built {
            Some(uri) => uri,
            None => uri(&self.base, path).map_err(|e| {
                ApiError::invalid("bad_path", format!("Invalid request target: {e}"))
            })?,
        };
        if let Some(auth) = &self.auth {
            headers.insert(header::AUTHORIZATION, auth.clone());
        }
        headers.remove(header::HOST);
        headers.remove(header::CONTENT_LENGTH);
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(body))
            .map_err(|e| ApiError::invalid("bad_request", e.to_string()))?;
        *req.headers_mut() = headers;
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
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
            Ok(Err(e)) if e.is_connect() => {
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

/// The backend URL's path (if any) prefixes the request path.
fn uri(base: &Uri, path_and_query: &str) -> Result<Uri, hyper::http::Error> {
    let prefix = base.path().trim_end_matches('/');
    Uri::builder()
        .scheme(base.scheme_str().unwrap_or("http"))
        .authority(base.authority().map(|a| a.as_str()).unwrap_or_default())
        .path_and_query(format!("{prefix}{path_and_query}"))
        .build()
}

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
        let base: Uri = "http://h:1/prefix/".parse().unwrap();
        assert_eq!(
            uri(&base, Endpoint::Embeddings.path()).unwrap(),
            "http://h:1/prefix/v1/embeddings"
        );
    }
}
