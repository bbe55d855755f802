//! A forwarding HTTP/1.1 hop that records every request path and response status, placed
//! between the gateway and an upstream so that tests can see exactly what reached the
//! upstream and what came back from it.

use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::local_server::{respond, LocalServer};
use super::BoxError;

/// One exchange as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: String,
    /// The request target as sent, query included.
    pub target: String,
    pub status: u16,
}

pub struct Recorder {
    exchanges: Arc<Mutex<Vec<Exchange>>>,
    server: LocalServer,
}

impl Recorder {
    /// Forwards everything to `upstream`, an `http://host:port` origin.
    pub fn start(upstream: &str) -> Recorder {
        let upstream = upstream.trim_end_matches('/').to_string();
        let exchanges = Arc::new(Mutex::new(Vec::new()));
        let recorded = exchanges.clone();
        // The client is built lazily inside the server's runtime, because hyper-util's
        // pool needs a runtime when it starts its idle-connection task.
        let client: Arc<Mutex<Option<Client<HttpConnector, Incoming>>>> = Arc::new(Mutex::new(None));

        let server = LocalServer::start(Arc::new(move |request: hyper::Request<Incoming>| {
            let upstream = upstream.clone();
            let recorded = recorded.clone();
            let client = client
                .lock()
                .unwrap()
                .get_or_insert_with(|| Client::builder(TokioExecutor::new()).build_http())
                .clone();
            Box::pin(async move {
                let method = request.method().to_string();
                let target = request.uri().path_and_query().map(|pq| pq.to_string()).unwrap_or_default();
                let (mut parts, body) = request.into_parts();
                parts.uri = format!("{upstream}{target}").parse().unwrap();
                let result = client.request(hyper::Request::from_parts(parts, body)).await;

                let response = match result {
                    Ok(response) => response.map(|body| body.map_err(|e| Box::new(e) as BoxError).boxed()),
                    Err(error) => respond(502, &[], format!("recorder: upstream failed: {error}")),
                };
                recorded.lock().unwrap().push(Exchange {
                    method,
                    target,
                    status: response.status().as_u16(),
                });
                response
            })
        }));
        Recorder { exchanges, server }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn exchanges(&self) -> Vec<Exchange> {
        self.exchanges.lock().unwrap().clone()
    }
}
