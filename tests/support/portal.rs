//! Stand-ins for Harbor's portal and core, shaped like the real ones where the gateway
//! cares.
//!
//! The portal is a single-page app built for `/`: `index.html` has `<base href="/">` and
//! loads `main.js`, `styles.css`, `setting.json`, `i18n/lang/en-us-lang.json` and images
//! by relative URL, and any unknown path gets `index.html` (the SPA fallback). The page is
//! sent in small frames with a `Content-Length`, as a static file server would, so a
//! gateway that forgot to drop `Content-Length` after rewriting breaks the page.
//!
//! Core serves the portal's absolute calls: `/api/v2.0/systeminfo` hands out a CSRF token
//! (cookie `__csrf` plus header `X-Harbor-CSRF-Token`), `POST /c/login` checks the token and
//! the credentials and sets `sid`, and `/api/v2.0/projects` needs both.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub const USERNAME: &str = "admin";
pub const PASSWORD: &str = "Harbor12345";
pub const PROJECTS: &[&str] = &["library", "rancher-charts", "team-a"];
pub const CSRF_HEADER: &str = "x-harbor-csrf-token";

type FixtureBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A request as a fixture saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: Method,
    pub target: String,
    pub headers: HeaderMap,
}

pub type SeenLog = Arc<Mutex<Vec<SeenRequest>>>;

/// A plain-HTTP fixture server on an ephemeral loopback port.
pub struct Fixture {
    pub addr: SocketAddr,
    pub seen: SeenLog,
}

impl Fixture {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve<F, Fut>(handler: F) -> Fixture
where
    F: Fn(SeenRequest, Bytes) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Response<FixtureBody>> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = SeenLog::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let handler = handler.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let handler = handler.clone();
                    let log = log.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let seen = SeenRequest {
                            method: parts.method,
                            target: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
                            headers: parts.headers,
                        };
                        log.lock().unwrap().push(seen.clone());
                        Ok::<_, Infallible>(handler(seen, body).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Fixture { addr, seen }
}

fn full(data: impl Into<Bytes>) -> FixtureBody {
    http_body_util::Full::new(data.into()).boxed()
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<FixtureBody> {
    let body = body.into();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .body(full(body))
        .unwrap()
}

/// Sends `data` in frames of `size` bytes, with a `Content-Length` for the whole.
fn chunked_response(content_type: &str, data: &'static str, size: usize) -> Response<FixtureBody> {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = data
        .as_bytes()
        .chunks(size)
        .map(|chunk| Ok(Frame::data(Bytes::from_static(chunk))))
        .collect();
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, data.len())
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap()
}

pub const INDEX_HTML: &str = r#"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Harbor</title>
  <base href="/">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <link rel="icon" type="image/x-icon" href="favicon.ico">
  <link rel="stylesheet" href="styles.css">
</head>
<body>
  <harbor-app>
    <header><img id="logo" src="images/harbor-logo.svg" alt="Harbor" width="40" height="40"><span id="brand">Harbor</span></header>
    <main id="app">Loading…</main>
  </harbor-app>
  <script src="main.js"></script>
</body>
</html>
"#;

const MAIN_JS: &str = r#"'use strict';
// Mirrors the portal's start-up: settings and translations by relative URL (resolved
// against <base href>), then the API and sign-in at absolute paths, with Harbor's CSRF
// token taken from a response header and sent back in the same header.
(async function () {
  const app = document.getElementById('app');
  const setStatus = (text) => document.body.setAttribute('data-status', text);
  let csrf = null;
  const remember = (response) => { csrf = response.headers.get('X-Harbor-CSRF-Token') || csrf; };
  try {
    const settings = await (await fetch('setting.json')).json();
    const lang = await (await fetch('i18n/lang/' + settings.defaultLang + '-lang.json')).json();
    const info = await fetch('/api/v2.0/systeminfo');
    remember(info);
    const system = await info.json();
    app.innerHTML =
      '<h1 id="title"></h1><p id="version"></p>' +
      '<form id="sign-in"><label>' + lang['SIGN_IN.USERNAME'] + ' <input id="login_username" name="principal"></label>' +
      '<label>' + lang['SIGN_IN.PASSWORD'] + ' <input id="login_password" name="password" type="password"></label>' +
      '<button id="log_in" type="submit">' + lang['SIGN_IN.LOG_IN'] + '</button></form>';
    document.getElementById('title').textContent = settings.appTitle;
    document.getElementById('version').textContent = 'base ' + document.baseURI + ', ' + system.harbor_version;
    document.getElementById('sign-in').addEventListener('submit', async (event) => {
      event.preventDefault();
      const form = new URLSearchParams(new FormData(event.target));
      const login = await fetch('/c/login', {
        method: 'POST',
        headers: { 'Content-Type': 'application/x-www-form-urlencoded', 'X-Harbor-CSRF-Token': csrf },
        body: form,
      });
      await login.text();
      if (!login.ok) { setStatus('sign-in failed: ' + login.status); return; }
      remember(login);
      const response = await fetch('/api/v2.0/projects?page=1&page_size=15', {
        headers: { 'X-Harbor-CSRF-Token': csrf },
      });
      if (!response.ok) { setStatus('projects failed: ' + response.status); return; }
      const projects = await response.json();
      app.innerHTML = '<h2>' + lang['PROJECT.PROJECTS'] + '</h2><table id="projects"><tbody></tbody></table>';
      const rows = document.querySelector('#projects tbody');
      for (const project of projects) {
        const row = rows.insertRow();
        row.insertCell().textContent = project.name;
        row.insertCell().textContent = project.repo_count + ' repositories';
      }
      setStatus('projects');
    });
    setStatus('sign-in');
  } catch (error) {
    setStatus('error: ' + error);
  }
})();
"#;

const STYLES_CSS: &str = "body { font-family: sans-serif; margin: 0; }\n\
header { background: #1d5100; color: #fff; padding: 8px 16px; display: flex; gap: 12px; align-items: center; }\n\
main { padding: 16px; }\n\
#projects td { border-bottom: 1px solid #ccc; padding: 4px 24px 4px 0; }\n";

const SETTING_JSON: &str = r#"{"appTitle":"Harbor through harbor-gateway","defaultLang":"en-us"}"#;

const EN_US_LANG: &str = r#"{"SIGN_IN.USERNAME":"Username","SIGN_IN.PASSWORD":"Password","SIGN_IN.LOG_IN":"LOG IN","PROJECT.PROJECTS":"Projects"}"#;

const LOGO_SVG: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 40 40"><circle cx="20" cy="20" r="18" fill="#60b932"/></svg>"##;

/// Starts the portal: static files, the SPA fallback, and one relative redirect.
pub async fn start_portal() -> Fixture {
    serve(|request: SeenRequest, _body: Bytes| async move {
        let path = request.target.split('?').next().unwrap_or("").to_string();
        match path.as_str() {
            "/main.js" => respond(StatusCode::OK, "application/javascript", MAIN_JS),
            "/styles.css" => respond(StatusCode::OK, "text/css", STYLES_CSS),
            "/setting.json" => respond(StatusCode::OK, "application/json", SETTING_JSON),
            "/i18n/lang/en-us-lang.json" => respond(StatusCode::OK, "application/json", EN_US_LANG),
            "/images/harbor-logo.svg" => respond(StatusCode::OK, "image/svg+xml", LOGO_SVG),
            "/favicon.ico" => respond(StatusCode::OK, "image/svg+xml", LOGO_SVG),
            "/old-sign-in" => Response::builder()
                .status(StatusCode::FOUND)
                .header(header::LOCATION, "/account/sign-in?redirect_url=%2Fharbor")
                .body(full(""))
                .unwrap(),
            // Small frames, so that `<base href="/">` is cut across frame boundaries.
            _ => chunked_response("text/html; charset=utf-8", INDEX_HTML, 37),
        }
    })
    .await
}

/// Starts Harbor core: CSRF token, sign-in, projects, and an echo for other carve-out paths.
pub async fn start_core() -> Fixture {
    let sessions: Arc<Mutex<HashMap<String, ()>>> = Arc::default();
    let counter = Arc::new(AtomicU64::new(1));
    serve(move |request: SeenRequest, body: Bytes| {
        let sessions = sessions.clone();
        let counter = counter.clone();
        async move { core_response(&request, &body, &sessions, &counter) }
    })
    .await
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The CSRF check of Harbor's core: the header must carry the token of the cookie.
fn csrf_valid(headers: &HeaderMap) -> bool {
    let header = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
    matches!((header, cookie(headers, "__csrf")), (Some(h), Some(c)) if !h.is_empty() && h == c)
}

fn core_response(
    request: &SeenRequest,
    body: &Bytes,
    sessions: &Mutex<HashMap<String, ()>>,
    counter: &AtomicU64,
) -> Response<FixtureBody> {
    let path = request.target.split('?').next().unwrap_or("");
    match (&request.method, path) {
        (&Method::GET, "/api/v2.0/systeminfo") => {
            let token = format!("csrf-{}", counter.fetch_add(1, Ordering::Relaxed));
            let mut response = respond(StatusCode::OK, "application/json", r#"{"harbor_version":"v2.13.0-fixture","auth_mode":"db_auth"}"#);
            let headers = response.headers_mut();
            headers.insert(CSRF_HEADER, token.parse().unwrap());
            headers.insert(header::SET_COOKIE, format!("__csrf={token}; Path=/; Secure; HttpOnly; SameSite=Strict").parse().unwrap());
            response
        }
        (&Method::POST, "/c/login") => {
            if !csrf_valid(&request.headers) {
                return respond(StatusCode::FORBIDDEN, "text/plain", "CSRF token invalid\n");
            }
            let form: HashMap<String, String> = String::from_utf8_lossy(body)
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            if form.get("principal").map(String::as_str) != Some(USERNAME) || form.get("password").map(String::as_str) != Some(PASSWORD) {
                return respond(StatusCode::UNAUTHORIZED, "text/plain", "invalid credentials\n");
            }
            let sid = format!("sid-{}", counter.fetch_add(1, Ordering::Relaxed));
            sessions.lock().unwrap().insert(sid.clone(), ());
            let mut response = respond(StatusCode::OK, "text/plain", "");
            response
                .headers_mut()
                .insert(header::SET_COOKIE, format!("sid={sid}; Path=/; Secure; HttpOnly").parse().unwrap());
            response
        }
        (&Method::GET, "/api/v2.0/projects") => {
            let signed_in = cookie(&request.headers, "sid").is_some_and(|sid| sessions.lock().unwrap().contains_key(sid));
            if !signed_in {
                return respond(StatusCode::UNAUTHORIZED, "application/json", r#"{"errors":[{"code":"UNAUTHORIZED","message":"sign in first"}]}"#);
            }
            if !csrf_valid(&request.headers) {
                return respond(StatusCode::FORBIDDEN, "application/json", r#"{"errors":[{"code":"FORBIDDEN","message":"CSRF token invalid"}]}"#);
            }
            let projects: Vec<String> = PROJECTS
                .iter()
                .enumerate()
                .map(|(i, name)| format!(r#"{{"project_id":{},"name":"{name}","repo_count":{}}}"#, i + 1, i * 3))
                .collect();
            respond(StatusCode::OK, "application/json", format!("[{}]", projects.join(",")))
        }
        (&Method::GET, "/c/oidc/login") => Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, "/c/oidc/callback?code=abc")
            .body(full(""))
            .unwrap(),
        _ => {
            let mut response = respond(StatusCode::OK, "text/plain", format!("core {} {}\n", request.method, request.target));
            response.headers_mut().insert("x-fixture", "core".parse().unwrap());
            response
        }
    }
}
