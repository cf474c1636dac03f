#!/usr/bin/env bash
# Writes a one-layer OCI image archive (no registry, no Docker engine needed) that
# `ctr -n k8s.io images import` accepts, named by the io.containerd.image.name
# annotation. The archive is reproducible: fixed timestamps and owners.
#
# Usage: oci_image.sh --name localhost/x:tag --out x.oci.tar [--entrypoint /bin]
#          [--arg ARG]... [--user UID[:GID]] --file SRC:DST[:MODE]... [--dir DST[:MODE[:UID]]]...
# Arguments must not contain double quotes or backslashes (they go into JSON as is).
set -euo pipefail

name="" out="" entrypoint="" user=""
args=() files=() dirs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --entrypoint) entrypoint=$2; shift 2 ;;
    --arg) args+=("$2"); shift 2 ;;
    --user) user=$2; shift 2 ;;
    --file) files+=("$2"); shift 2 ;;
    --dir) dirs+=("$2"); shift 2 ;;
    *) echo "oci_image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$name" ] && [ -n "$out" ] || { echo "oci_image.sh: --name and --out are required" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
mkdir -p "$root" "$work/oci/blobs/sha256"

for spec in "${files[@]}"; do
  IFS=: read -r src dst mode <<<"$spec"
  mkdir -p "$root$(dirname "$dst")"
  cp "$src" "$root$dst"
  chmod "${mode:-0644}" "$root$dst"
done
owners=()
for spec in "${dirs[@]}"; do
  IFS=: read -r dst mode uid <<<"$spec"
  mkdir -p "$root$dst"
  chmod "${mode:-0755}" "$root$dst"
  [ -n "$uid" ] && owners+=("$dst:$uid")
done
# Everything belongs to root except directories given an owner (e.g. a data directory).
chown -R 0:0 "$root"
for o in "${owners[@]}"; do chown "${o#*:}:${o#*:}" "$root${o%%:*}"; done

# The layer: an uncompressed tar (its digest is also the diff id).
layer="$work/layer.tar"
tar -C "$root" --sort=name --mtime=@0 --numeric-owner -cf "$layer" .

blob() { # blob FILE -> prints "digest size" and stores FILE under blobs/
  local d s
  d=$(sha256sum "$1" | cut -d' ' -f1)
  s=$(stat -c %s "$1")
  cp "$1" "$work/oci/blobs/sha256/$d"
  echo "$d $s"
}
read -r layer_digest layer_size < <(blob "$layer")

json_array() {
  local first=1 a
  printf '['
  for a in "$@"; do
    [ $first = 1 ] || printf ','
    first=0
    printf '"%s"' "$a"
  done
  printf ']'
}

{
  printf '{"architecture":"amd64","os":"linux","config":{'
  printf '"Env":["PATH=/"]'
  [ -n "$entrypoint" ] && printf ',"Entrypoint":%s' "$(json_array "$entrypoint")"
  [ "${#args[@]}" -gt 0 ] && printf ',"Cmd":%s' "$(json_array "${args[@]}")"
  [ -n "$user" ] && printf ',"User":"%s"' "$user"
  printf '},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$layer_digest"
} >"$work/config.json"
read -r config_digest config_size < <(blob "$work/config.json")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
  "$config_digest" "$config_size" "$layer_digest" "$layer_size" >"$work/manifest.json"
read -r manifest_digest manifest_size < <(blob "$work/manifest.json")

printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest_digest" "$manifest_size" "$name" "${name##*:}" >"$work/oci/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$work/oci/oci-layout"

tar -C "$work/oci" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$out.tmp" .
mv "$out.tmp" "$out"
