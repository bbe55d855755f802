# Generate an image of random layers and push it to the upstream registry with
# plain curl: one monolithic upload per blob (POST, then PUT with ?digest=),
# then a Docker schema2 manifest under tag "bench" in repository "bench".
# shellcheck shell=bash

MANIFEST_TYPE=application/vnd.docker.distribution.manifest.v2+json
# The registry returns 404 for a manifest request whose Accept does not list
# the manifest's media type, so every manifest request sends this.
MANIFEST_ACCEPT="Accept: $MANIFEST_TYPE, application/vnd.oci.image.manifest.v1+json"
REPO=bench

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Usage: push_blob BASE_URL REPO FILE. Prints the digest.
push_blob() {
    local base=$1 repo=$2 file=$3 digest location sep
    digest=sha256:$(sha256_of "$file")
    location=$(curl -sS -D - -o /dev/null -X POST "$base/v2/$repo/blobs/uploads/" |
        awk 'tolower($1) == "location:" {print $2}' | tr -d '\r')
    [[ -n $location ]] || die "upload POST to $base returned no Location"
    [[ $location == /* ]] && location=$base$location
    sep='?'
    [[ $location == *\?* ]] && sep='&'
    curl -sS -f -o /dev/null -H 'Expect:' -H 'Content-Type: application/octet-stream' \
        -T "$file" "$location${sep}digest=$digest" ||
        die "upload PUT of $file failed"
    echo "$digest"
}

seed_image() {
    local base=http://127.0.0.1:${UP_PORT[registry]} blobs=$WORK/blobs size name
    mkdir -p "$blobs"
    log "generating layers: ${LAYER_SIZES[*]}"
    for name in "${!LAYER_SIZES[@]}"; do
        size=${LAYER_SIZES[$name]}
        head -c "$size" /dev/urandom >"$blobs/$name"
    done

    declare -gA DIGEST SIZE
    for name in "${!LAYER_SIZES[@]}"; do
        DIGEST[$name]=$(push_blob "$base" "$REPO" "$blobs/$name")
        SIZE[$name]=$(stat -c %s "$blobs/$name")
    done

    write_image_config "$blobs/config.json"
    DIGEST[config]=$(push_blob "$base" "$REPO" "$blobs/config.json")
    SIZE[config]=$(stat -c %s "$blobs/config.json")

    write_manifest "$blobs/manifest.json"
    curl -sS -f -o /dev/null -X PUT -H "Content-Type: $MANIFEST_TYPE" \
        --data-binary "@$blobs/manifest.json" "$base/v2/$REPO/manifests/bench" ||
        die "manifest PUT failed"
    curl -sS -f -o /dev/null -H "$MANIFEST_ACCEPT" "$base/v2/$REPO/manifests/bench" ||
        die "manifest GET by tag failed after the push"
    log "seeded $REPO:bench, manifest $(sha256_of "$blobs/manifest.json" | cut -c1-12)"
}

write_image_config() {
    local diff_ids="" name
    for name in $(layer_order); do
        diff_ids+="${diff_ids:+,}\"${DIGEST[$name]}\""
    done
    printf '{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[%s]}}' \
        "$diff_ids" >"$1"
}

write_manifest() {
    local layers="" name
    for name in $(layer_order); do
        layers+="${layers:+,}{\"mediaType\":\"application/vnd.docker.image.rootfs.diff.tar.gzip\",\"size\":${SIZE[$name]},\"digest\":\"${DIGEST[$name]}\"}"
    done
    printf '{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":%s,"digest":"%s"},"layers":[%s]}' \
        "$MANIFEST_TYPE" "${SIZE[config]}" "${DIGEST[config]}" "$layers" >"$1"
}

# Layers smallest first, so the manifest lists them in a stable order.
layer_order() {
    local name
    for name in "${!LAYER_SIZES[@]}"; do echo "${LAYER_SIZES[$name]} $name"; done |
        sort -n | cut -d' ' -f2
}
