//! harbor-gateway: a TLS-terminating reverse proxy that serves a Harbor registry on the
//! Rancher server's hostname, beside Rancher itself.
//!
//! A request flows through the modules in this order: [`listener`] accepts and terminates
//! TLS, [`proxy`] finds the route in [`routing`], fixes headers with [`headers`], sends the
//! request upstream through [`upstream`], rewrites response URLs with [`rewrite`] and
//! streams the [`body`] back. Failures become responses in [`error`]. [`telemetry`] wraps
//! each request for [`metrics`] and the access log; [`reload`] swaps the gateway and the
//! certificate at run time.

pub mod admin;
pub mod body;
pub mod ca_bundle;
pub mod clean_path;
pub mod config;
pub mod error;
pub mod framing;
pub mod headers;
pub mod idle;
pub mod listener;
pub mod log_buffer;
pub mod metrics;
pub mod portal;
pub mod proxy;
pub mod redact;
pub mod reload;
pub mod request_body;
pub mod request_checks;
pub mod rewrite;
pub mod routing;
pub mod sanitize;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod tunnels;
pub mod upgrade;
pub mod upstream;
pub mod workers;
