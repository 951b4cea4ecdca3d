//! Budget alerts to an operator's webhook: one JSON POST per alert, sent in
//! the background, never blocking or failing a request.

use std::{sync::OnceLock, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

use crate::budget::Alert;

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

fn client() -> Option<&'static HttpsClient> {
    static CLIENT: OnceLock<Option<HttpsClient>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            let tls = crate::proxy::tls::client_config(None).ok()?;
            let connector = HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .build();
            Some(Client::builder(TokioExecutor::new()).build(connector))
        })
        .as_ref()
}

/// POSTs `alert` as JSON to `url` in the background (must be called inside the runtime).
pub fn post(url: String, alert: &Alert) {
    let body = serde_json::json!({
        "source": "kedge",
        "scope": alert.scope.to_string(),
        "limit": alert.kind.label(),
        "hard": alert.hard,
        "threshold": alert.threshold_permille as f64 / 1000.0,
        "used": alert.used,
        "max": alert.limit,
        "at": alert.at.to_string(),
        "message": alert.to_string(),
    })
    .to_string();
    let Some(client) = client() else {
        tracing::warn!("no TLS client for the alert webhook");
        return;
    };
    tokio::spawn(async move {
        let req = match Request::post(&url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "alert webhook url is not usable");
                return;
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => {}
            Ok(Ok(resp)) => {
                tracing::warn!(status = %resp.status(), "alert webhook refused the alert")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "alert webhook failed"),
            Err(_) => tracing::warn!("alert webhook timed out"),
        }
    });
}
