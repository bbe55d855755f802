//! harbor-gateway: a TLS-terminating reverse proxy that serves a Harbor registry on the
//! Rancher server's hostname, beside Rancher itself.
//!
//! A request flows through the modules in this order: [`listener`] accepts and terminates
//! TLS, [`proxy`] finds the route in [`routing`], fixes headers with [`headers`], sends the
//! request upstream through [`upstream`], rewrites response URLs with [`rewrite`] and
//! streams the [`body`] back. Failures become responses in [`error`].

pub mod admin;
pub mod body;
pub mod clean_path;
pub mod config;
pub mod error;
pub mod headers;
pub mod listener;
pub mod portal;
pub mod proxy;
pub mod rewrite;
pub mod routing;
pub mod server;
pub mod tls;
pub mod upgrade;
pub mod upstream;
