//! The admin listener: plain HTTP for probes and scraping, never exposed to clients.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::body::ProxyBody;
use crate::metrics::TEXT_CONTENT_TYPE;
use crate::reload::SharedGateway;

/// How long `/readyz` waits for the name of one upstream to resolve. Kubernetes probes
/// time out after 1 s by default, so the probe reports a slow resolver as not ready
/// before that.
const RESOLVE_TIMEOUT: Duration = Duration::from_millis(800);

/// Process state that the probes report.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
    draining: AtomicBool,
    /// The result of the last readiness probe, so that only changes are logged.
    last_probe_ready: AtomicBool,
}

impl Health {
    /// Marks the listeners as bound and the certificate as loaded.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Marks the gateway as draining; it is not ready again.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }
}

/// State that the admin endpoints read.
pub struct AdminState {
    pub health: Arc<Health>,
    pub gateway: SharedGateway,
}

pub async fn serve_admin(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::error!(%error, "accepting an admin connection failed; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&request, &state).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            if let Err(error) = builder.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%peer, %error, "admin connection closed with an error");
            }
        });
    }
}

async fn respond(request: &Request<Incoming>, state: &AdminState) -> Response<ProxyBody> {
    let readable = matches!(*request.method(), Method::GET | Method::HEAD);
    match (readable, request.uri().path()) {
        (true, "/healthz") => text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
        (true, "/readyz") => readiness(state).await,
        (true, "/metrics") => {
            let body = state.gateway.load().metrics().encode_text();
            text(StatusCode::OK, TEXT_CONTENT_TYPE, body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: use GET /healthz, /readyz or /metrics\n".into(),
        ),
    }
}

/// Ready when the listeners are bound, the certificate is loaded, the gateway is not
/// draining, and every upstream's host name resolves.
async fn readiness(state: &AdminState) -> Response<ProxyBody> {
    let problems = if state.health.draining.load(Ordering::SeqCst) {
        vec!["draining after a shutdown signal".to_string()]
    } else if !state.health.is_ready() {
        vec!["starting".to_string()]
    } else {
        unresolvable_upstreams(state).await
    };

    let ready = problems.is_empty();
    if state.health.last_probe_ready.swap(ready, Ordering::SeqCst) != ready {
        if ready {
            tracing::info!("ready");
        } else {
            tracing::warn!(problems = ?problems, "not ready");
        }
    }
    if ready {
        text(StatusCode::OK, "text/plain; charset=utf-8", "ready\n".into())
    } else {
        let body = format!("not ready: {}\n", problems.join("; "));
        text(StatusCode::SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", body.into_bytes())
    }
}

async fn unresolvable_upstreams(state: &AdminState) -> Vec<String> {
    let gateway = state.gateway.load_full();
    let lookups = gateway.upstream_authorities().map(|(name, authority)| async move {
        match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(authority.as_str())).await {
            Ok(Ok(mut addresses)) => match addresses.next() {
                Some(_) => None,
                None => Some(format!("upstream {name}: {authority} resolves to no address")),
            },
            Ok(Err(error)) => Some(format!("upstream {name}: cannot resolve {authority}: {error}")),
            Err(_) => Some(format!("upstream {name}: resolving {authority} timed out")),
        }
    });
    futures_util::future::join_all(lookups).await.into_iter().flatten().collect()
}

fn text(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<ProxyBody> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(ProxyBody::full(body))
        .expect("static response is valid")
}
