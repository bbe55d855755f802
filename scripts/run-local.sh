#!/usr/bin/env bash
# Runs the gateway in front of a local docker-registry, the way it fronts Harbor core:
#   registry  http://127.0.0.1:5000  (plain HTTP, loopback only)
#   gateway   https://localhost:8443 (TLS with certs-test/, HTTP/1.1 and HTTP/2)
#   admin     http://127.0.0.1:9090  (/healthz, /readyz)
# It pushes a small generated image through the gateway, prints how to push and pull, and
# serves until Ctrl-C. With --smoke it exits after the push and pull instead.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=false
if [ "${1:-}" = "--smoke" ]; then smoke=true; fi

scripts/install-deps.sh
cargo build --release --locked --quiet

state=${STATE_DIR:-$(mktemp -d /tmp/harbor-gateway-demo.XXXXXX)}
mkdir -p "$state/certs.d" "$state/registry"
# skopeo reads every *.crt in a certificate directory as a CA. certs-test also contains keys,
# which skopeo would take for client certificates, so the CA gets a folder of its own.
cp certs-test/ca.crt "$state/certs.d/ca.crt"

cat > "$state/registry.yml" <<YAML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $state/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:5000
YAML

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if $smoke && [ -z "${STATE_DIR:-}" ]; then rm -rf "$state"; fi
}
trap cleanup EXIT INT TERM

docker-registry serve "$state/registry.yml" >"$state/registry.log" 2>&1 &
pids+=($!)
target/release/harbor-gateway --config config/gateway.toml 2>"$state/gateway.log" &
pids+=($!)

for _ in $(seq 100); do
  if curl -fsS -o /dev/null http://127.0.0.1:9090/readyz 2>/dev/null &&
     curl -fsS -o /dev/null http://127.0.0.1:5000/v2/ 2>/dev/null; then
    break
  fi
  sleep 0.1
done
curl -fsS -o /dev/null --cacert certs-test/ca.crt https://localhost:8443/v2/ || {
  echo "run-local: the gateway did not come up; its log:" >&2
  cat "$state/gateway.log" >&2
  exit 1
}

# A one-layer image in skopeo's dir: layout, made here because this machine may have no
# access to public registries.
image="$state/hello"
mkdir -p "$image"
head -c 1048576 /dev/urandom >"$image/layer"
layer_digest=$(sha256sum "$image/layer" | cut -d' ' -f1)
mv "$image/layer" "$image/$layer_digest"
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$layer_digest" >"$image/config"
config_digest=$(sha256sum "$image/config" | cut -d' ' -f1)
config_size=$(stat -c %s "$image/config")
mv "$image/config" "$image/$config_digest"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":1048576}]}' \
  "$config_digest" "$config_size" "$layer_digest" >"$image/manifest.json"
echo "Directory Transport Version: 1.1" >"$image/version"

skopeo copy --quiet --preserve-digests --dest-cert-dir "$state/certs.d" "dir:$image" docker://localhost:8443/demo/hello:v1
skopeo copy --quiet --preserve-digests --src-cert-dir "$state/certs.d" docker://localhost:8443/demo/hello:v1 "dir:$state/pulled"
if ! cmp -s "$image/$layer_digest" "$state/pulled/$layer_digest"; then
  echo "run-local: the pulled layer differs from the pushed one" >&2
  exit 1
fi
echo "run-local: pushed and pulled demo/hello:v1 through the gateway; layer sha256:$layer_digest matches"

if $smoke; then
  exit 0
fi

cat <<TEXT

harbor-gateway is serving https://localhost:8443 in front of the registry at 127.0.0.1:5000.
Logs: $state/gateway.log

Try it (the test CA is in $state/certs.d):
  skopeo inspect --cert-dir $state/certs.d docker://localhost:8443/demo/hello:v1
  skopeo copy --preserve-digests --dest-cert-dir $state/certs.d dir:$image docker://localhost:8443/demo/copy:v1
  skopeo copy --src-cert-dir $state/certs.d docker://localhost:8443/demo/hello:v1 dir:/tmp/hello
  curl --cacert certs-test/ca.crt https://localhost:8443/v2/_catalog
  curl --http2 --cacert certs-test/ca.crt https://localhost:8443/v2/demo/hello/tags/list
For a Docker engine elsewhere on this host: copy certs-test/ca.crt to
/etc/docker/certs.d/localhost:8443/ca.crt, then docker pull localhost:8443/demo/hello:v1.

Ctrl-C stops the gateway and the registry.
TEXT
wait
