//! Errors on the request path and the one place where they become HTTP responses.

use std::borrow::Cow;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::body::{BoxError, ProxyBody};

/// Header that Docker clients look for on every `/v2/` response.
pub const DOCKER_API_VERSION: &str = "docker-distribution-api-version";

/// Why the gateway could not pass a request through. Each variant records whether the client,
/// the upstream or the configuration is at fault, which decides the status.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client sent a request that the gateway will not forward.
    #[error("invalid request: {0}")]
    BadRequest(Cow<'static, str>),
    /// The request target is longer than `limits.max_uri_bytes`.
    #[error("the request target is {length} bytes, above the limit of {limit}")]
    UriTooLong { length: usize, limit: usize },
    /// The request header fields are larger than `limits.max_header_bytes`.
    #[error("the request header fields are {size} bytes, above the limit of {limit}")]
    HeadersTooLarge { size: usize, limit: usize },
    /// The client's request body failed: malformed framing, or the client went away.
    #[error("the request body could not be read: {source}")]
    ClientBody {
        #[source]
        source: BoxError,
    },
    /// The client sent no request-body byte for the idle period.
    #[error("the client sent no request body data for {timeout:?}")]
    ClientBodyTimeout { timeout: Duration },
    /// The route table answers this path itself, for example a path blocked with 404.
    #[error("{message}")]
    RouteStatus {
        status: StatusCode,
        message: Cow<'static, str>,
    },
    /// `harbor.enabled` is false, so Harbor's routes are switched off.
    #[error("the Harbor registry is disabled on this gateway")]
    RegistryDisabled,
    /// The gateway does not implement this kind of request, for example a CONNECT tunnel.
    #[error("not implemented: {0}")]
    NotImplemented(Cow<'static, str>),
    #[error("cannot connect to upstream {upstream}: {source}")]
    UpstreamConnect {
        upstream: String,
        #[source]
        source: BoxError,
    },
    #[error("upstream {upstream} sent no response within {timeout:?}")]
    UpstreamTimeout { upstream: String, timeout: Duration },
    #[error("request to upstream {upstream} failed: {source}")]
    UpstreamRequest {
        upstream: String,
        #[source]
        source: BoxError,
    },
}

impl ProxyError {
    /// Maps the error to the status sent downstream. Exhaustive on purpose: a new variant
    /// must choose one.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::ClientBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::ClientBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::RouteStatus { status, .. } => *status,
            ProxyError::RegistryDisabled => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::UpstreamConnect { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamRequest { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// Builds the message shown to the client. Upstream details stay in the log, because internal
    /// host names mean nothing to a client.
    fn client_message(&self) -> Cow<'static, str> {
        match self {
            ProxyError::BadRequest(message) => message.clone(),
            ProxyError::UriTooLong { .. } | ProxyError::HeadersTooLarge { .. } => self.to_string().into(),
            ProxyError::ClientBody { .. } => "the request body could not be read".into(),
            ProxyError::ClientBodyTimeout { timeout } => {
                format!("no request body data arrived for {} s", timeout.as_secs()).into()
            }
            ProxyError::RouteStatus { message, .. } => message.clone(),
            ProxyError::RegistryDisabled => REGISTRY_DISABLED_MESSAGE.into(),
            ProxyError::NotImplemented(message) => message.clone(),
            ProxyError::UpstreamConnect { upstream, .. } => {
                format!("upstream {upstream} is unreachable").into()
            }
            ProxyError::UpstreamTimeout { upstream, timeout } => {
                format!("upstream {upstream} did not respond within {} s", timeout.as_secs()).into()
            }
            ProxyError::UpstreamRequest { upstream, .. } => {
                format!("upstream {upstream} failed to answer").into()
            }
        }
    }

    /// Builds the response: registry-style JSON on `/v2/` paths, plain text elsewhere, and
    /// a small HTML page when the disabled registry is opened in a browser.
    pub fn into_response(self, registry_path: bool) -> Response<ProxyBody> {
        if matches!(self, ProxyError::RegistryDisabled) && !registry_path {
            return registry_disabled_page();
        }
        error_response(self.status(), &self.client_message(), registry_path)
    }
}

const REGISTRY_DISABLED_MESSAGE: &str = "the Harbor registry is disabled on this gateway";

fn registry_disabled_page() -> Response<ProxyBody> {
    let page = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
                <title>Registry disabled</title></head>\n<body><h1>Registry disabled</h1>\n\
                <p>The Harbor registry is disabled on this gateway. \
                An administrator can enable it in the gateway configuration.</p></body></html>\n";
    Response::builder()
        .status(StatusCode::SERVICE_UNAVAILABLE)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(ProxyBody::full(page))
        .expect("static header values are valid")
}

/// Builds a response that the gateway makes itself. On registry paths it carries the Docker API version
/// header and a body in the registry's error format, so clients print the message.
pub fn error_response(status: StatusCode, message: &str, registry_path: bool) -> Response<ProxyBody> {
    let mut builder = Response::builder().status(status);
    let body = if registry_path {
        builder = builder
            .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
            .header(DOCKER_API_VERSION, HeaderValue::from_static("registry/2.0"));
        let body = registry_error_json(registry_error_code(status), message);
        ProxyBody::full(body)
    } else {
        builder = builder.header(header::CONTENT_TYPE, "text/plain; charset=utf-8");
        ProxyBody::full(format!("{message}\n"))
    };
    builder.body(body).expect("static header values are valid")
}

/// Picks the distribution error code closest to a gateway-made status.
fn registry_error_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => "NOT_FOUND",
        429 => "TOOMANYREQUESTS",
        400..=499 => "UNSUPPORTED",
        502..=504 => "UNAVAILABLE",
        _ => "UNKNOWN",
    }
}

/// `{"errors":[{"code":…,"message":…,"detail":null}]}` with the message JSON-escaped.
fn registry_error_json(code: &str, message: &str) -> String {
    let mut escaped = String::with_capacity(message.len());
    for c in message.chars() {
        match c {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            c if (c as u32) < 0x20 => escaped.push_str(&format!("\\u{:04x}", c as u32)),
            c => escaped.push(c),
        }
    }
    format!(r#"{{"errors":[{{"code":"{code}","message":"{escaped}","detail":null}}]}}"#) + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn io_error() -> BoxError {
        Box::new(std::io::Error::other("refused"))
    }

    #[test]
    fn status_mapping() {
        let cases = [
            (ProxyError::BadRequest("x".into()), 400),
            (ProxyError::UriTooLong { length: 9000, limit: 8192 }, 414),
            (ProxyError::HeadersTooLarge { size: 70000, limit: 65536 }, 431),
            (ProxyError::ClientBody { source: io_error() }, 400),
            (ProxyError::ClientBodyTimeout { timeout: Duration::from_secs(900) }, 408),
            (
                ProxyError::RouteStatus {
                    status: StatusCode::NOT_FOUND,
                    message: "Notary is not enabled".into(),
                },
                404,
            ),
            (ProxyError::RegistryDisabled, 503),
            (ProxyError::NotImplemented("CONNECT".into()), 501),
            (
                ProxyError::UpstreamConnect { upstream: "harbor_core".into(), source: io_error() },
                502,
            ),
            (
                ProxyError::UpstreamTimeout {
                    upstream: "harbor_core".into(),
                    timeout: Duration::from_secs(900),
                },
                504,
            ),
            (
                ProxyError::UpstreamRequest { upstream: "harbor_core".into(), source: io_error() },
                502,
            ),
        ];
        for (error, status) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
        }
    }

    #[tokio::test]
    async fn registry_error_is_json() {
        let error = ProxyError::UpstreamConnect { upstream: "harbor_core".into(), source: io_error() };
        let response = error.into_response(true);

        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()[DOCKER_API_VERSION], "registry/2.0");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "{\"errors\":[{\"code\":\"UNAVAILABLE\",\"message\":\"upstream harbor_core is unreachable\",\"detail\":null}]}\n"
        );
    }

    #[tokio::test]
    async fn disabled_registry_json_and_html() {
        let json = ProxyError::RegistryDisabled.into_response(true);
        assert_eq!(json.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json.headers()[DOCKER_API_VERSION], "registry/2.0");
        let body = json.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "{\"errors\":[{\"code\":\"UNAVAILABLE\",\"message\":\"the Harbor registry is disabled on this gateway\",\"detail\":null}]}\n"
        );

        let html = ProxyError::RegistryDisabled.into_response(false);
        assert_eq!(html.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(html.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        let body = html.into_body().collect().await.unwrap().to_bytes();
        assert!(std::str::from_utf8(&body).unwrap().contains("registry is disabled"));
    }

    #[test]
    fn json_message_is_escaped() {
        assert_eq!(
            registry_error_json("UNKNOWN", "a \"b\"\n\\"),
            "{\"errors\":[{\"code\":\"UNKNOWN\",\"message\":\"a \\\"b\\\"\\u000a\\\\\",\"detail\":null}]}\n"
        );
    }
}
