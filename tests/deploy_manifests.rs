//! Offline checks of the Kubernetes manifests in deploy/kustomize.
//!
//! Each overlay is rendered with `kubectl kustomize`, which needs no cluster,
//! and the rendered objects are checked field by field against what the
//! gateway expects: ports, probes, mounts, security settings and the
//! gateway.toml carried in the ConfigMap. `kubectl create --dry-run=client`
//! is not used because it still downloads the OpenAPI schema from a cluster.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_norway::Value;

/// Namespace of the Secret `tls-rancher-ingress`, where the gateway must run to mount it.
const NAMESPACE: &str = "cattle-system";
const TLS_SECRET: &str = "tls-rancher-ingress";
const TLS_DIR: &str = "/etc/harbor-gateway/tls";
const CONFIG_DIR: &str = "/etc/harbor-gateway/config";
const HTTPS_PORT: i64 = 8443;
const ADMIN_PORT: i64 = 9090;

fn kustomize_dir(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/kustomize")
        .join(relative)
}

/// Renders a directory under deploy/kustomize.
fn render(relative: &str) -> Vec<Value> {
    render_dir(&kustomize_dir(relative))
}

/// Runs `kubectl kustomize DIR` and parses every YAML document it prints.
fn render_dir(dir: &Path) -> Vec<Value> {
    let output = match Command::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(output) => output,
        Err(err) if err.kind() == ErrorKind::NotFound => panic!(
            "kubectl was not found on PATH. Run scripts/install-deps.sh to install it, \
             because these tests render the manifests with kubectl kustomize."
        ),
        Err(err) => panic!("failed to run kubectl kustomize {}: {err}", dir.display()),
    };
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed ({}):\n{}",
        dir.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let yaml = String::from_utf8(output.stdout).expect("kubectl kustomize printed invalid UTF-8");
    serde_norway::Deserializer::from_str(&yaml)
        .map(|document| Value::deserialize(document).expect("rendered YAML is invalid"))
        .filter(|value| !value.is_null())
        .collect()
}

/// Rendered objects of one overlay, looked up by kind.
struct Rendered {
    overlay: String,
    objects: Vec<Value>,
}

impl Rendered {
    fn new(overlay: &str) -> Self {
        Self {
            overlay: overlay.to_owned(),
            objects: render(overlay),
        }
    }

    /// Returns the single object of `kind`, failing if there is none or more than one.
    fn one(&self, kind: &str) -> &Value {
        let found: Vec<&Value> = self
            .objects
            .iter()
            .filter(|object| object["kind"].as_str() == Some(kind))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{}: expected exactly one {kind}, found {}",
            self.overlay,
            found.len()
        );
        found[0]
    }

    fn pod_spec(&self) -> &Value {
        &self.one("Deployment")["spec"]["template"]["spec"]
    }

    fn container(&self) -> &Value {
        let containers = self.pod_spec()["containers"]
            .as_sequence()
            .expect("Deployment has no containers list");
        assert_eq!(
            containers.len(),
            1,
            "{}: expected one container",
            self.overlay
        );
        &containers[0]
    }

    fn pod_labels(&self) -> &Value {
        &self.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    }

    /// Resolves a probe or Service port, given by name or number, to the container port number.
    fn container_port(&self, port: &Value) -> i64 {
        if let Some(number) = port.as_i64() {
            return number;
        }
        let name = port.as_str().expect("port is neither a number nor a name");
        self.container()["ports"]
            .as_sequence()
            .expect("container has no ports")
            .iter()
            .find(|entry| entry["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("{}: no container port named {name}", self.overlay))
            ["containerPort"]
            .as_i64()
            .expect("containerPort is not a number")
    }

    fn volume_mount(&self, volume: &str) -> &Value {
        self.container()["volumeMounts"]
            .as_sequence()
            .expect("container has no volumeMounts")
            .iter()
            .find(|mount| mount["name"].as_str() == Some(volume))
            .unwrap_or_else(|| panic!("{}: volume {volume} is not mounted", self.overlay))
    }

    /// Returns the volume whose source has `source_key` (`secret`, `configMap`, …).
    fn volume_with(&self, source_key: &str) -> &Value {
        self.pod_spec()["volumes"]
            .as_sequence()
            .expect("pod has no volumes")
            .iter()
            .find(|volume| !volume[source_key].is_null())
            .unwrap_or_else(|| panic!("{}: no {source_key} volume", self.overlay))
    }

    /// Reads a container securityContext field, falling back to the pod-level one.
    fn security_field(&self, field: &str) -> &Value {
        let container_value = &self.container()["securityContext"][field];
        if container_value.is_null() {
            &self.pod_spec()["securityContext"][field]
        } else {
            container_value
        }
    }

    fn gateway_toml(&self) -> toml::Table {
        let text = self.one("ConfigMap")["data"]["gateway.toml"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: ConfigMap has no gateway.toml key", self.overlay));
        text.parse::<toml::Table>()
            .unwrap_or_else(|err| panic!("{}: gateway.toml is not valid TOML: {err}", self.overlay))
    }
}

fn toml_str<'a>(table: &'a toml::Table, section: &str, key: &str) -> &'a str {
    table
        .get(section)
        .and_then(|value| value.get(key))
        .and_then(|value| value.as_str())
        .unwrap_or_else(|| panic!("gateway.toml: missing string [{section}] {key}"))
}

fn check_objects(rendered: &Rendered) {
    let overlay = &rendered.overlay;
    for kind in ["Deployment", "Service", "PodDisruptionBudget", "ConfigMap"] {
        let object = rendered.one(kind);
        assert_eq!(
            object["metadata"]["namespace"].as_str(),
            Some(NAMESPACE),
            "{overlay}: {kind} must be in {NAMESPACE}, the namespace of the Secret {TLS_SECRET}"
        );
    }

    let replicas = rendered.one("Deployment")["spec"]["replicas"].as_i64();
    assert!(
        replicas.is_some_and(|n| n >= 2),
        "{overlay}: replicas {replicas:?}, expected >= 2"
    );

    let labels = rendered.pod_labels();
    assert!(
        labels.as_mapping().is_some_and(|m| !m.is_empty()),
        "{overlay}: pod has no labels"
    );
    let service_selector = &rendered.one("Service")["spec"]["selector"];
    assert_eq!(
        service_selector, labels,
        "{overlay}: Service selector differs from pod labels"
    );
    let pdb = &rendered.one("PodDisruptionBudget")["spec"];
    assert_eq!(
        &pdb["selector"]["matchLabels"], labels,
        "{overlay}: PDB selector differs from pod labels"
    );

    // The budget must allow evictions (a node drain) but never all replicas at once.
    let replicas = replicas.unwrap();
    if let Some(max_unavailable) = pdb["maxUnavailable"].as_i64() {
        assert!(
            (1..replicas).contains(&max_unavailable),
            "{overlay}: PDB maxUnavailable {max_unavailable}"
        );
    } else {
        let min_available = pdb["minAvailable"].as_i64();
        assert!(
            min_available.is_some_and(|n| n >= 1 && n < replicas),
            "{overlay}: PDB needs a numeric maxUnavailable or minAvailable below replicas, found {min_available:?}"
        );
    }

    let service_port = &rendered.one("Service")["spec"]["ports"][0];
    assert_eq!(
        service_port["port"].as_i64(),
        Some(443),
        "{overlay}: Service port"
    );
    assert_eq!(
        rendered.container_port(&service_port["targetPort"]),
        HTTPS_PORT,
        "{overlay}: Service targetPort must reach the https listener"
    );
}

fn check_anti_affinity(rendered: &Rendered) {
    let overlay = &rendered.overlay;
    let anti = &rendered.pod_spec()["affinity"]["podAntiAffinity"];
    let mut terms: Vec<&Value> = Vec::new();
    if let Some(preferred) = anti["preferredDuringSchedulingIgnoredDuringExecution"].as_sequence() {
        terms.extend(
            preferred
                .iter()
                .map(|weighted| &weighted["podAffinityTerm"]),
        );
    }
    if let Some(required) = anti["requiredDuringSchedulingIgnoredDuringExecution"].as_sequence() {
        terms.extend(required.iter());
    }
    assert!(!terms.is_empty(), "{overlay}: no podAntiAffinity terms");

    let spreads_over_nodes = terms.iter().any(|term| {
        term["topologyKey"].as_str() == Some("kubernetes.io/hostname")
            && &term["labelSelector"]["matchLabels"] == rendered.pod_labels()
    });
    assert!(
        spreads_over_nodes,
        "{overlay}: no anti-affinity term on kubernetes.io/hostname selecting the gateway's own pods"
    );
}

fn check_probes_and_scrape(rendered: &Rendered) {
    let overlay = &rendered.overlay;
    let container = rendered.container();
    assert_eq!(
        rendered.container_port(&"https".into()),
        HTTPS_PORT,
        "{overlay}: https containerPort"
    );
    assert_eq!(
        rendered.container_port(&"admin".into()),
        ADMIN_PORT,
        "{overlay}: admin containerPort"
    );

    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{overlay}: {probe} path");
        assert_eq!(
            rendered.container_port(&get["port"]),
            ADMIN_PORT,
            "{overlay}: {probe} port"
        );
        assert!(
            get["scheme"].is_null() || get["scheme"].as_str() == Some("HTTP"),
            "{overlay}: {probe} must use plain HTTP, the admin listener has no TLS"
        );
    }

    let annotations = &rendered.one("Deployment")["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        annotations["prometheus.io/scrape"].as_str(),
        Some("true"),
        "{overlay}: scrape annotation"
    );
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some("9090"),
        "{overlay}: scrape port"
    );
    assert_eq!(
        annotations["prometheus.io/path"].as_str(),
        Some("/metrics"),
        "{overlay}: scrape path"
    );
}

fn check_volumes(rendered: &Rendered) {
    let overlay = &rendered.overlay;

    let tls = rendered.volume_with("secret");
    assert_eq!(
        tls["secret"]["secretName"].as_str(),
        Some(TLS_SECRET),
        "{overlay}: TLS Secret name"
    );
    if let Some(items) = tls["secret"]["items"].as_sequence() {
        let keys: Vec<&str> = items
            .iter()
            .filter_map(|item| item["key"].as_str())
            .collect();
        assert!(
            keys.contains(&"tls.crt"),
            "{overlay}: Secret items lack tls.crt"
        );
        assert!(
            keys.contains(&"tls.key"),
            "{overlay}: Secret items lack tls.key"
        );
    }
    let tls_name = tls["name"].as_str().unwrap();
    let tls_mount = rendered.volume_mount(tls_name);
    assert_eq!(
        tls_mount["mountPath"].as_str(),
        Some(TLS_DIR),
        "{overlay}: TLS mount path"
    );
    assert!(
        tls_mount["subPath"].is_null(),
        "{overlay}: a subPath TLS mount never sees renewals"
    );

    let config = rendered.volume_with("configMap");
    let config_map_name = rendered.one("ConfigMap")["metadata"]["name"].as_str();
    assert_eq!(
        config["configMap"]["name"].as_str(),
        config_map_name,
        "{overlay}: the config volume must reference the rendered ConfigMap"
    );
    let config_mount = rendered.volume_mount(config["name"].as_str().unwrap());
    assert_eq!(
        config_mount["mountPath"].as_str(),
        Some(CONFIG_DIR),
        "{overlay}: config mount path"
    );
    assert!(
        config_mount["subPath"].is_null(),
        "{overlay}: a subPath config mount never sees ConfigMap updates"
    );

    let args: Vec<&str> = rendered.container()["args"]
        .as_sequence()
        .map(|args| args.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let expected_config = format!("{CONFIG_DIR}/gateway.toml");
    assert_eq!(
        args,
        ["--config", expected_config.as_str()],
        "{overlay}: container args"
    );
}

fn check_security(rendered: &Rendered) {
    let overlay = &rendered.overlay;
    assert_eq!(
        rendered.security_field("runAsNonRoot").as_bool(),
        Some(true),
        "{overlay}: runAsNonRoot"
    );
    assert_eq!(
        rendered.container()["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true),
        "{overlay}: readOnlyRootFilesystem"
    );
    assert_eq!(
        rendered.container()["securityContext"]["allowPrivilegeEscalation"].as_bool(),
        Some(false),
        "{overlay}: allowPrivilegeEscalation"
    );
    let dropped: Vec<&str> = rendered.container()["securityContext"]["capabilities"]["drop"]
        .as_sequence()
        .map(|caps| caps.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(dropped, ["ALL"], "{overlay}: capabilities.drop");
    assert_eq!(
        rendered.security_field("seccompProfile")["type"].as_str(),
        Some("RuntimeDefault"),
        "{overlay}: seccompProfile"
    );
    assert_eq!(
        rendered.pod_spec()["automountServiceAccountToken"].as_bool(),
        Some(false),
        "{overlay}: the gateway needs no service account token"
    );

    let resources = &rendered.container()["resources"];
    for bound in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                resources[bound][resource].is_string(),
                "{overlay}: resources.{bound}.{resource} is not set"
            );
        }
    }
}

fn check_gateway_toml(rendered: &Rendered, expect_notary: bool) {
    let overlay = &rendered.overlay;
    let config = rendered.gateway_toml();

    let https: SocketAddr = toml_str(&config, "listen", "https")
        .parse()
        .expect("[listen] https is not an address");
    let admin: SocketAddr = toml_str(&config, "listen", "admin")
        .parse()
        .expect("[listen] admin is not an address");
    assert_eq!(
        https.to_string(),
        "0.0.0.0:8443",
        "{overlay}: [listen] https"
    );
    assert_eq!(
        admin.to_string(),
        "0.0.0.0:9090",
        "{overlay}: [listen] admin must accept kubelet probes"
    );

    assert_eq!(
        toml_str(&config, "tls", "cert"),
        format!("{TLS_DIR}/tls.crt"),
        "{overlay}: [tls] cert"
    );
    assert_eq!(
        toml_str(&config, "tls", "key"),
        format!("{TLS_DIR}/tls.key"),
        "{overlay}: [tls] key"
    );

    let upstreams: BTreeMap<&str, &str> = config
        .get("upstreams")
        .and_then(toml::Value::as_table)
        .expect("gateway.toml: missing [upstreams]")
        .iter()
        .map(|(name, url)| {
            (
                name.as_str(),
                url.as_str().expect("upstream URL is not a string"),
            )
        })
        .collect();
    for (name, url) in &upstreams {
        let uri: http::Uri = url
            .parse()
            .unwrap_or_else(|err| panic!("{overlay}: upstream {name} = {url}: {err}"));
        assert!(
            matches!(uri.scheme_str(), Some("http" | "https")),
            "{overlay}: upstream {name} = {url} must be http or https"
        );
        assert!(
            uri.authority().is_some(),
            "{overlay}: upstream {name} = {url} has no host"
        );
    }
    for required in ["rancher", "harbor_core", "harbor_portal"] {
        assert!(
            upstreams.contains_key(required),
            "{overlay}: [upstreams] lacks {required}"
        );
    }
    assert_eq!(
        upstreams.contains_key("notary"),
        expect_notary,
        "{overlay}: [upstreams] notary present"
    );
    if !expect_notary {
        let notary_urls: Vec<_> = upstreams
            .values()
            .filter(|url| url.contains("notary"))
            .collect();
        assert!(
            notary_urls.is_empty(),
            "{overlay}: upstream pointing at Notary: {notary_urls:?}"
        );
    }

    // Kubernetes sends SIGKILL terminationGracePeriodSeconds after deletion
    // starts, and that period includes the preStop sleep, so the drain must
    // fit in what is left.
    let drain = config
        .get("timeouts")
        .and_then(|timeouts| timeouts.get("drain"))
        .and_then(toml::Value::as_integer)
        .expect("gateway.toml: missing integer [timeouts] drain");
    let grace = rendered.pod_spec()["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds is not set");
    let pre_stop = rendered.container()["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .expect("preStop sleep is not set");
    assert!(
        pre_stop >= 1,
        "{overlay}: preStop sleep {pre_stop}s leaves no time to remove endpoints"
    );
    assert!(
        grace > pre_stop + drain,
        "{overlay}: terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} + drain {drain}"
    );
}

fn check_overlay(overlay: &str, expect_notary: bool) {
    let rendered = Rendered::new(overlay);
    check_objects(&rendered);
    check_anti_affinity(&rendered);
    check_probes_and_scrape(&rendered);
    check_volumes(&rendered);
    check_security(&rendered);
    check_gateway_toml(&rendered, expect_notary);
}

#[test]
fn base_renders_without_notary() {
    check_overlay("base", false);
}

#[test]
fn harbor_2_8_overlay_has_notary() {
    check_overlay("overlays/harbor-2.8", true);
}

#[test]
fn harbor_2_14_overlay_has_no_notary() {
    check_overlay("overlays/harbor-2.14", false);
}

#[test]
fn dockerfile_matches_manifests() {
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/Dockerfile"))
            .expect("deploy/Dockerfile is missing");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();

    assert!(
        dockerfile.contains("cargo build --release --locked"),
        "Dockerfile must build with --locked"
    );
    let from_lines = instructions
        .iter()
        .filter(|line| line.starts_with("FROM "))
        .count();
    assert!(
        from_lines >= 2,
        "Dockerfile must be multi-stage, found {from_lines} FROM lines"
    );

    let user = instructions
        .iter()
        .rev()
        .find_map(|line| line.strip_prefix("USER "))
        .expect("runtime stage sets no USER");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("USER must be numeric for runAsNonRoot");
    assert_ne!(uid, 0, "runtime USER must not be root");

    let exposed: Vec<&str> = instructions
        .iter()
        .filter_map(|line| line.strip_prefix("EXPOSE "))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(
        exposed.contains(&"8443/tcp"),
        "Dockerfile must expose 8443, found {exposed:?}"
    );
    assert!(
        exposed.contains(&"9090/tcp"),
        "Dockerfile must expose 9090, found {exposed:?}"
    );

    let cmd = format!(r#"CMD ["--config", "{CONFIG_DIR}/gateway.toml"]"#);
    assert!(
        instructions.contains(&cmd.as_str()),
        "Dockerfile CMD must read the mounted config: {cmd}"
    );
}

/// Paths that the gateway takes over from Rancher on the shared hostname.
const GATEWAY_PATHS: [&str; 10] = [
    "/v2",
    "/service/token",
    "/service/notifications",
    "/registry",
    "/api/v2.0",
    "/c/login",
    "/c/log_out",
    "/c/userExists",
    "/c/oidc",
    "/c/authproxy",
];

/// Builds a relative path from `from` to `to`, because kustomize rejects
/// absolute paths in `resources` and `components`.
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let depth = from.components().count() - 1;
    let mut path: PathBuf = std::iter::repeat_n("..", depth).collect();
    path.push(to.strip_prefix("/").expect("path is not absolute"));
    path
}

#[test]
fn ingress_component_routes_harbor_paths() {
    let scratch = tempfile::tempdir().expect("failed to create a temporary directory");
    let scratch_dir = scratch.path().canonicalize().unwrap();
    let overlay = relative_path(
        &scratch_dir,
        &kustomize_dir("overlays/harbor-2.14")
            .canonicalize()
            .unwrap(),
    );
    let component = relative_path(
        &scratch_dir,
        &kustomize_dir("components/ingress-nginx-paths")
            .canonicalize()
            .unwrap(),
    );
    let kustomization = format!(
        "resources:\n  - {}\ncomponents:\n  - {}\n",
        overlay.display(),
        component.display()
    );
    std::fs::write(scratch_dir.join("kustomization.yaml"), kustomization).unwrap();

    let objects = render_dir(&scratch_dir);
    let ingresses: Vec<&Value> = objects
        .iter()
        .filter(|object| object["kind"].as_str() == Some("Ingress"))
        .collect();
    assert_eq!(
        ingresses.len(),
        1,
        "expected one Ingress from the component"
    );
    let ingress = ingresses[0];
    assert_eq!(
        ingress["metadata"]["namespace"].as_str(),
        Some(NAMESPACE),
        "Ingress namespace"
    );
    assert_eq!(
        ingress["spec"]["tls"][0]["secretName"].as_str(),
        Some(TLS_SECRET),
        "Ingress TLS Secret"
    );

    let annotations = &ingress["metadata"]["annotations"];
    assert_eq!(
        annotations["nginx.ingress.kubernetes.io/backend-protocol"].as_str(),
        Some("HTTPS"),
        "the gateway only listens with TLS"
    );
    assert_eq!(
        annotations["nginx.ingress.kubernetes.io/proxy-body-size"].as_str(),
        Some("0"),
        "blob uploads need an unlimited body size"
    );
    assert_eq!(
        annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"].as_str(),
        Some("off"),
        "blob uploads must stream"
    );

    let service_name = objects
        .iter()
        .find(|object| object["kind"].as_str() == Some("Service"))
        .expect("no Service rendered")["metadata"]["name"]
        .clone();
    let paths = ingress["spec"]["rules"][0]["http"]["paths"]
        .as_sequence()
        .expect("Ingress has no paths");
    let routed: Vec<&str> = paths
        .iter()
        .filter_map(|path| path["path"].as_str())
        .collect();
    for expected in GATEWAY_PATHS {
        assert!(
            routed.contains(&expected),
            "Ingress does not send {expected} to the gateway"
        );
    }
    for path in paths {
        let backend = &path["backend"]["service"];
        assert_eq!(
            backend["name"], service_name,
            "backend of {:?}",
            path["path"]
        );
        assert_eq!(
            backend["port"]["name"].as_str(),
            Some("https"),
            "port of {:?}",
            path["path"]
        );
        assert_eq!(
            path["pathType"].as_str(),
            Some("Prefix"),
            "pathType of {:?}",
            path["path"]
        );
    }
    assert_eq!(
        routed.len(),
        GATEWAY_PATHS.len(),
        "Ingress routes extra paths: {routed:?}"
    );
}
