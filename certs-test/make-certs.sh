#!/usr/bin/env bash
# Makes the test PKI under certs-test/: a root CA, an intermediate CA and a
# server certificate for gateway.test, localhost, 127.0.0.1 and ::1, issued by
# the intermediate. tls.crt is the served chain (leaf, then intermediate), like
# the tls.crt of Rancher's tls-rancher-ingress secret. The keys exist in every
# PEM form the gateway reads: PKCS#8 (tls.key), PKCS#1 RSA and SEC1 EC.
# Test material only: the private keys are public in this repository.
set -euo pipefail
cd "$(dirname "$0")"
days=36500

openssl req -x509 -newkey rsa:2048 -nodes -days "$days" -sha256 \
  -subj "/CN=harbor-gateway test root CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout ca.key -out ca.crt

openssl req -newkey rsa:2048 -nodes -subj "/CN=harbor-gateway test intermediate CA" \
  -keyout intermediate.key -out intermediate.csr
openssl x509 -req -in intermediate.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
  -days "$days" -sha256 -out intermediate.crt \
  -extfile <(printf 'basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n')

leaf_ext='basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:gateway.test,DNS:localhost,IP:127.0.0.1,IP:::1'

# RSA leaf: tls.key is PKCS#8, tls-rsa-pkcs1.key is the same key as PKCS#1.
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out tls.key
openssl pkey -in tls.key -traditional -out tls-rsa-pkcs1.key
openssl req -new -key tls.key -subj "/CN=gateway.test" -out tls.csr
openssl x509 -req -in tls.csr -CA intermediate.crt -CAkey intermediate.key -CAcreateserial \
  -days "$days" -sha256 -out leaf.crt -extfile <(printf '%s\n' "$leaf_ext")
cat leaf.crt intermediate.crt > tls.crt

# EC P-256 leaf with a SEC1 key, for the EC key format.
openssl ecparam -name prime256v1 -genkey -noout -out tls-ec-sec1.key
openssl req -new -key tls-ec-sec1.key -subj "/CN=gateway.test" -out tls-ec.csr
openssl x509 -req -in tls-ec.csr -CA intermediate.crt -CAkey intermediate.key -CAcreateserial \
  -days "$days" -sha256 -out leaf-ec.crt -extfile <(printf '%s\n' "$leaf_ext")
cat leaf-ec.crt intermediate.crt > tls-ec.crt

# A second, unrelated key, for the mismatched certificate and key case.
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out other.key

rm -f ./*.csr ./*.srl leaf.crt leaf-ec.crt
openssl verify -CAfile ca.crt -untrusted intermediate.crt tls.crt tls-ec.crt
