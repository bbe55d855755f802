#!/usr/bin/env bash
# Installs what the gateway's tests and demo need on a Debian machine: the real registry,
# Notary, clients and browser from Debian's packages. Safe to run again: it installs only
# what is missing. Needs root (or sudo) for apt-get.
set -euo pipefail

packages=(
  docker-registry   # the CNCF distribution registry, as Harbor core's stand-in on /v2/
  skopeo            # Docker registry client for push and pull
  notary            # notary-server, notary-signer and the notary client
  chromium          # headless browser for the Harbor UI test
  nginx             # baseline in the load benchmarks
  nghttp2-client    # h2load
  apache2-utils     # ab, for HEAD load
  curl
  openssl
  python3
  ca-certificates
  procps
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if ((${#missing[@]})); then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo=sudo; fi
  echo "install-deps: installing ${missing[*]}"
  $sudo apt-get update -qq
  # Debian's docker-registry and nginx packages try to start their services; policy-rc.d
  # is not needed because they fail harmlessly where no init system runs.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo is missing; install Rust with rustup (https://rustup.rs) and run again" >&2
  exit 1
fi
