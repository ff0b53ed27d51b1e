#!/bin/sh
# Generates what deploy/docker-compose.yml needs besides the image:
#   deploy/certs/edge.crt, deploy/certs/edge.key  - a self-signed TLS certificate
#       for the Envoy edge (CN and SAN: $RTM_EDGE_HOST, default localhost; also
#       localhost and 127.0.0.1), valid 365 days;
#   deploy/.env                                   - RTM_SECRET (the ticket secret the
#       webapp and the gateways share), added only if it is not there yet.
# Existing files are kept; --force makes a new certificate.
# Overrides: CERT_DIR, ENV_FILE, RTM_EDGE_HOST. Needs openssl (1.1.1 or later).
# For production, mount a real certificate at deploy/certs instead.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cert_dir=${CERT_DIR:-$here/certs}
env_file=${ENV_FILE:-$here/.env}
host=${RTM_EDGE_HOST:-localhost}
force=no
[ "${1:-}" = "--force" ] && force=yes

mkdir -p "$cert_dir"
if [ "$force" = yes ] || [ ! -s "$cert_dir/edge.crt" ] || [ ! -s "$cert_dir/edge.key" ]; then
    san="DNS:localhost,IP:127.0.0.1"
    [ "$host" = localhost ] || san="DNS:$host,$san"
    openssl req -x509 -newkey rsa:2048 -sha256 -days 365 -nodes \
        -keyout "$cert_dir/edge.key" -out "$cert_dir/edge.crt" \
        -subj "/CN=$host" -addext "subjectAltName=$san"
    # Envoy runs as an unprivileged user (uid 101) in its container and must read
    # the key: this self-signed development key is readable by all.
    chmod 644 "$cert_dir/edge.key" "$cert_dir/edge.crt"
    echo "wrote $cert_dir/edge.crt and edge.key (CN=$host, SAN $san)"
else
    echo "kept $cert_dir/edge.crt (--force makes a new one)"
fi

if [ ! -f "$env_file" ] || ! grep -q '^RTM_SECRET=' "$env_file"; then
    umask 077
    echo "RTM_SECRET=$(openssl rand -hex 32)" >> "$env_file"
    echo "wrote RTM_SECRET to $env_file"
fi
