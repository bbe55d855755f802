//! Micro-benchmarks of the per-request work that does not touch the network: route
//! lookup on the raw path, `Location` rewriting and `WWW-Authenticate` realm rewriting.
//! Run with `cargo bench --bench micro`.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use harbor_gateway::config::Config;
use harbor_gateway::framing;
use harbor_gateway::rewrite::{InternalOrigins, RewriteContext};
use harbor_gateway::routing::{Action, RouteTable};

const CONFIG: &str = r#"
[listen]
https = "127.0.0.1:8443"

[tls]
cert = "certs-test/tls.crt"
key = "certs-test/tls.key"

[upstreams]
rancher = "https://rancher.cattle-system.svc"
harbor_core = "http://harbor-core"
harbor_portal = "http://harbor-portal"
notary = "http://harbor-notary-server:4443"
"#;

const PUBLIC_HOST: &str = "rancher.example.com";

/// Request paths that a registry pull, the Harbor portal and Rancher send, so each
/// lookup walks the table to a different winning route.
const PATHS: &[(&str, &str)] = &[
    ("manifest", "/v2/library/alpine/manifests/latest"),
    (
        "blob",
        "/v2/library/alpine/blobs/sha256:4abcf20661432fb2d719aaf90656f55c287f8ca915dc1c92ec14ff61e67fbaf8",
    ),
    ("token", "/service/token"),
    ("harbor_api", "/registry/api/v2.0/projects"),
    ("portal_login", "/c/login"),
    ("rancher_cluster", "/k8s/clusters/c-m-abcdef12/api/v1/namespaces/default/pods"),
    ("rancher_ui", "/dashboard/c/local/explorer"),
];

fn load_config() -> Config {
    Config::parse(Path::new("micro-bench.toml"), CONFIG).expect("benchmark configuration is valid")
}

fn route_matching(c: &mut Criterion) {
    let table = RouteTable::from_config(&load_config());
    let mut group = c.benchmark_group("route_find");
    for (name, path) in PATHS {
        group.bench_function(*name, |b| b.iter(|| table.find(black_box(path)).is_some()));
    }
    group.finish();
}

fn registry_route(table: &RouteTable) -> (&harbor_gateway::routing::Route, usize) {
    let route = table
        .find("/v2/library/alpine/blobs/uploads/")
        .expect("/v2/ has a route");
    let Action::Proxy(upstream) = route.action else {
        panic!("/v2/ route does not proxy");
    };
    (route, upstream)
}

/// Route table and upstream origins of the benchmark configuration, for the rewriters.
struct Rewriting {
    table: RouteTable,
    origins: InternalOrigins,
}

impl Rewriting {
    fn load() -> Rewriting {
        let config = load_config();
        Rewriting {
            table: RouteTable::from_config(&config),
            origins: InternalOrigins::new(&config.upstreams),
        }
    }

    /// Returns the rewrite context of a response from the registry route's upstream.
    fn registry_context(&self) -> RewriteContext<'_> {
        let (route, upstream) = registry_route(&self.table);
        RewriteContext {
            table: &self.table,
            origins: &self.origins,
            public_host: PUBLIC_HOST,
            route,
            upstream,
        }
    }
}

fn location_rewrite(c: &mut Criterion) {
    let fixture = Rewriting::load();
    let context = fixture.registry_context();

    let mut group = c.benchmark_group("location_rewrite");
    // An upload Location as distribution returns it, with its signed _state query.
    let upload = "http://harbor-core/v2/library/alpine/blobs/uploads/\
        6b5ed4a2-51c2-4c84-9a0f-2b35c4a5b0c1?_state=9KXdQe2gk3Xx7pYhH1Ww0d%3D%3D\
        &digest=sha256%3A4abcf20661432fb2d719aaf90656f55c287f8ca915dc1c92ec14ff61e67fbaf8";
    group.bench_function("internal_origin", |b| {
        b.iter(|| context.rewrite_url(black_box(upload)))
    });
    // An object-storage redirect must pass through unchanged after one origin check.
    let external = "https://s3.eu-west-1.amazonaws.com/harbor/docker/registry/v2/blobs/\
        sha256/4a/4abcf206/data?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=1200";
    group.bench_function("external_origin", |b| {
        b.iter(|| context.rewrite_url(black_box(external)))
    });
    group.bench_function("relative_path", |b| {
        b.iter(|| context.rewrite_url(black_box("/v2/library/alpine/blobs/uploads/6b5ed4a2")))
    });
    group.finish();
}

fn www_authenticate_rewrite(c: &mut Criterion) {
    let fixture = Rewriting::load();
    let context = fixture.registry_context();

    let mut group = c.benchmark_group("www_authenticate_rewrite");
    let internal = r#"Bearer realm="http://harbor-core/service/token",service="harbor-registry",scope="repository:library/alpine:pull,push""#;
    group.bench_function("internal_realm", |b| {
        b.iter(|| context.rewrite_www_authenticate(black_box(internal)))
    });
    let public = r#"Bearer realm="https://rancher.example.com/service/token",service="harbor-registry",scope="repository:library/alpine:pull""#;
    group.bench_function("public_realm", |b| {
        b.iter(|| context.rewrite_www_authenticate(black_box(public)))
    });
    group.finish();
}

/// Times the HTTP/1.1 framing guard on a typical manifest GET head, read whole and cut in two.
fn framing_guard(c: &mut Criterion) {
    let head = b"GET /v2/library/alpine/manifests/3.20 HTTP/1.1\r\nHost: rancher.example.com\r\n\
        User-Agent: containerd/1.7.20\r\nAccept: application/vnd.oci.image.index.v1+json, \
        application/vnd.docker.distribution.manifest.list.v2+json, \
        application/vnd.docker.distribution.manifest.v2+json\r\nAuthorization: Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln\r\n\
        Accept-Encoding: gzip\r\n\r\n";
    let mut group = c.benchmark_group("framing_guard");
    group.bench_function("manifest_get_head", |b| b.iter(|| framing::released_bytes(black_box(head), usize::MAX)));
    group.bench_function("manifest_get_head_in_two_reads", |b| b.iter(|| framing::released_bytes(black_box(head), 200)));
    group.finish();
}

criterion_group!(benches, route_matching, location_rewrite, www_authenticate_rewrite, framing_guard);
criterion_main!(benches);
