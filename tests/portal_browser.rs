//! The Harbor portal under `/registry/` in a real headless Chromium: the page loads through
//! the gateway with its `<base href>` rewritten, every asset returns 200, sign-in works and
//! the project list renders. Plus the portal's redirects and the root carve-outs to core,
//! checked with a plain HTTPS client.

mod support;

use std::time::Duration;

use http::{Method, Request, StatusCode};
use serde_json::json;
use support::browser::Browser;
use support::portal::{self, Fixture, PASSWORD, PROJECTS, USERNAME};
use support::rancher::Rancher;
use support::*;

const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

struct Upstreams {
    portal: Fixture,
    core: Fixture,
    _rancher: Rancher,
    gateway: Gateway,
}

async fn start() -> Upstreams {
    let portal = portal::start_portal().await;
    let core = portal::start_core().await;
    let rancher = Rancher::start().await;
    let gateway = Gateway::start(&format!(
        "[upstreams]\nharbor_core = \"{}\"\nharbor_portal = \"{}\"\nrancher = \"{}\"\n[upstream_tls]\nca_file = \"{}\"\n",
        core.url(),
        portal.url(),
        rancher.url(),
        ca_file().display()
    ));
    Upstreams { portal, core, _rancher: rancher, gateway }
}

#[tokio::test(flavor = "multi_thread")]
async fn portal_signs_in_in_chromium() {
    let upstreams = start().await;
    let origin = format!("https://gateway.test:{}", upstreams.gateway.port);
    let browser = Browser::launch("gateway.test").await;
    let page = browser.new_page().await;

    // Without the trailing slash, as a user would type it: the gateway redirects.
    browser.call(Some(&page), "Page.navigate", json!({ "url": format!("{origin}/registry") })).await;
    let describe = "JSON.stringify({url: location.href, status: document.body && document.body.dataset.status, \
                    html: document.documentElement.outerHTML.slice(0, 2000)})";
    browser
        .wait_for(&page, "!!(document.body && document.body.dataset.status)", describe, PAGE_TIMEOUT)
        .await;
    assert_eq!(browser.evaluate(&page, "document.body.dataset.status").await, "sign-in", "{}", browser.evaluate(&page, describe).await);
    assert_eq!(browser.evaluate(&page, "location.href").await, format!("{origin}/registry/"));
    assert_eq!(browser.evaluate(&page, "document.baseURI").await, format!("{origin}/registry/"));
    assert_eq!(
        browser.evaluate(&page, "document.querySelector('base').getAttribute('href')").await,
        "/registry/"
    );
    assert_eq!(browser.evaluate(&page, "document.getElementById('title').textContent").await, "Harbor through harbor-gateway");
    assert_eq!(
        browser.evaluate(&page, "getComputedStyle(document.querySelector('header')).backgroundColor").await,
        "rgb(29, 81, 0)",
        "styles.css did not apply"
    );
    browser
        .wait_for(&page, "document.getElementById('logo').naturalWidth > 0", describe, PAGE_TIMEOUT)
        .await;

    let sign_in = format!(
        "document.getElementById('login_username').value = '{USERNAME}';\n\
         document.getElementById('login_password').value = '{PASSWORD}';\n\
         document.getElementById('log_in').click(); true"
    );
    browser.evaluate(&page, &sign_in).await;
    browser
        .wait_for(&page, "document.body.dataset.status !== 'sign-in'", describe, PAGE_TIMEOUT)
        .await;
    assert_eq!(browser.evaluate(&page, "document.body.dataset.status").await, "projects", "{}", browser.evaluate(&page, describe).await);
    let names = browser
        .evaluate(&page, "Array.from(document.querySelectorAll('#projects tr td:first-child')).map(td => td.textContent)")
        .await;
    assert_eq!(names, json!(PROJECTS));

    let screenshot = repo_path("artifacts/portal-browser.png");
    browser.screenshot(&page, &screenshot).await;
    println!("screenshot: {}", screenshot.display());

    // Network events can trail the DOM by a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let responses = browser.responses();
    for (url, status, _) in &responses {
        assert_eq!(*status, 200, "{url} answered {status}; all responses: {responses:#?}");
    }
    let expected_paths = [
        "/registry/",
        "/registry/styles.css",
        "/registry/main.js",
        "/registry/images/harbor-logo.svg",
        "/registry/setting.json",
        "/registry/i18n/lang/en-us-lang.json",
        "/api/v2.0/systeminfo",
        "/c/login",
        "/api/v2.0/projects?page=1&page_size=15",
    ];
    for path in expected_paths {
        let url = format!("{origin}{path}");
        assert!(responses.iter().any(|(u, _, _)| *u == url), "no response for {url}; got {responses:#?}");
    }
    let failures = browser.failures();
    assert!(failures.is_empty(), "failed requests: {failures:#?}\nchromium log:\n{}", browser.log_text());
    let redirects = browser.redirects();
    assert!(
        redirects.contains(&(format!("{origin}/registry"), 308, "/registry/".to_string())),
        "no 308 from /registry: {redirects:#?}"
    );

    // The navigation asked the portal for identity encoding; assets kept the browser's.
    let portal_seen = upstreams.portal.seen();
    let encoding = |target: &str| {
        let request = portal_seen.iter().find(|r| r.target == target).unwrap_or_else(|| panic!("portal saw no {target}"));
        request.headers.get("accept-encoding").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
    };
    assert_eq!(encoding("/"), "identity");
    assert!(encoding("/main.js").contains("gzip"), "main.js: {}", encoding("/main.js"));

    let login = upstreams.core.seen().into_iter().find(|r| r.target == "/c/login").expect("core saw /c/login");
    assert_eq!(login.method, Method::POST);
    assert!(login.headers.contains_key(portal::CSRF_HEADER));
}

async fn get(client: &HttpsClient, url: String, headers: &[(&str, &str)]) -> http::Response<hyper::body::Incoming> {
    let mut request = Request::get(&url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    client.request(request.body(empty()).unwrap()).await.unwrap_or_else(|e| panic!("{url}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn portal_html_rewritten_assets_untouched() {
    let upstreams = start().await;
    let gateway = &upstreams.gateway;

    for protocol in [Protocol::Http1, Protocol::Http2] {
        let client = https_client(protocol);
        let navigation = [("accept", "text/html,application/xhtml+xml,*/*;q=0.8"), ("accept-encoding", "gzip, br")];

        let page = get(&client, gateway.url("/registry/projects/1/repositories"), &navigation).await;
        assert_eq!(page.status(), StatusCode::OK);
        assert!(page.headers().get("content-length").is_none(), "{protocol:?}: stale Content-Length");
        let html = body_text(page.into_body()).await;
        assert_eq!(html, portal::INDEX_HTML.replace("<base href=\"/\">", "<base href=\"/registry/\">"), "{protocol:?}");

        let head = client
            .request(Request::head(gateway.url("/registry/")).header("accept", "text/html").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(head.status(), StatusCode::OK);
        assert!(head.headers().get("content-length").is_none(), "{protocol:?}: HEAD must match GET");

        let script = get(&client, gateway.url("/registry/main.js"), &[("accept", "*/*"), ("accept-encoding", "gzip, br")]).await;
        assert_eq!(script.status(), StatusCode::OK);
        let length: usize = script.headers()["content-length"].to_str().unwrap().parse().unwrap();
        let body = body_text(script.into_body()).await;
        assert_eq!(body.len(), length);
        assert!(body.contains("fetch('setting.json')"));
    }

    let seen = upstreams.portal.seen();
    let deep_link = seen.iter().find(|r| r.target == "/projects/1/repositories").unwrap();
    assert_eq!(deep_link.headers["accept-encoding"], "identity");
    let script = seen.iter().find(|r| r.target == "/main.js").unwrap();
    assert_eq!(script.headers["accept-encoding"], "gzip, br");
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_get_prefix_back() {
    let upstreams = start().await;
    let gateway = &upstreams.gateway;
    let client = https_client(Protocol::Http1);

    // (request path, expected status, expected Location)
    let cases = [
        ("/registry", 308, "/registry/"),
        ("/registry?lang=en", 308, "/registry/?lang=en"),
        ("/registry/old-sign-in", 302, "/registry/account/sign-in?redirect_url=%2Fharbor"),
        ("/registry/c/oidc/login", 302, "/registry/c/oidc/callback?code=abc"),
        ("/c/oidc/login", 302, "/c/oidc/callback?code=abc"),
    ];
    for (path, status, location) in cases {
        let response = get(&client, gateway.url(path), &[]).await;
        assert_eq!(response.status().as_u16(), status, "{path}");
        assert_eq!(response.headers()["location"], location, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn carve_outs_reach_core_rest_rancher() {
    let upstreams = start().await;
    let gateway = &upstreams.gateway;
    let client = https_client(Protocol::Http2);

    let core_paths = [
        "/api/v2.0/users/current",
        "/c/login",
        "/c/log_out",
        "/c/userExists?target=username&value=admin",
        "/c/oidc/onboard",
        "/c/authproxy/redirect",
        "/registry/api/v2.0/health",
    ];
    for path in core_paths {
        let response = get(&client, gateway.url(path), &[]).await;
        assert_eq!(response.headers().get("x-fixture").map(|v| v.to_str().unwrap()), Some("core"), "{path}");
    }
    let rancher_paths = ["/api/v1/namespaces", "/c/local/explorer", "/c/c-abc12/apps", "/c/login/x", "/c/loginx", "/api/v2.00"];
    for path in rancher_paths {
        let response = get(&client, gateway.url(path), &[]).await;
        assert_eq!(response.headers().get("x-fixture").map(|v| v.to_str().unwrap()), Some("rancher"), "{path}");
    }

    let core_seen: Vec<String> = upstreams.core.seen().into_iter().map(|r| r.target).collect();
    assert!(core_seen.contains(&"/api/v2.0/health".to_string()), "prefix not stripped: {core_seen:?}");
    assert!(core_seen.contains(&"/c/userExists?target=username&value=admin".to_string()), "{core_seen:?}");
}
