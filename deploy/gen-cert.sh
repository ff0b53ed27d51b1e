#!/bin/sh
# Generates what deploy/docker-compose.yml needs besides the image:
#   deploy/certs/edge.crt, deploy/certs/edge.key  - a self-signed TLS certificate
#       for the Envoy edge (CN and SAN: $RTM_EDGE_HOST, default localhost; also
#       localhost and 127.0.0.1), valid 365 days;
#   deploy/.env (0600, created under umask 077)  - each line added only if it is not there yet:
#       RTM_SECRET                      the fleet secret the webapp and the gateways share
#                                       (each job's key is derived from it: services/keys.py);
#       CONSUL_MANAGEMENT_TOKEN         Consul's initial management token (ACLs, default deny);
#       CONSUL_AGENT_TOKEN              the Consul agent's own token;
#       RTM_CONSUL_TOKEN_<SERVICE>      one Consul token per service (WEBAPP, ADMIN_SERVER,
#                                       CHANNEL_SERVER, PRESENCE, CHARM, GATEWAY), OPERATOR
#                                       (the rtm CLI) and PROMETHEUS; consul-acl-init creates
#                                       them with the policies of deploy/consul/policies/;
#       GRAFANA_ADMIN_PASSWORD          Grafana's admin password (no default).
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

# Secrets and tokens: .env is created 0600 (umask 077 before the first write, never chmod-ed).
umask 077
# add NAME VALUE: append NAME=VALUE unless .env has NAME already (a rerun keeps every value).
add() {
    if [ ! -f "$env_file" ] || ! grep -q "^$1=" "$env_file"; then
        echo "$1=$2" >> "$env_file"
        echo "wrote $1 to $env_file"
    fi
}
# A random UUID (Consul token secrets are UUIDs), from 16 random bytes.
uuid() {
    openssl rand -hex 16 | sed 's/^\(.\{8\}\)\(.\{4\}\).\(.\{3\}\)\(.\{4\}\)\(.\{12\}\)$/\1-\2-4\3-\4-\5/'
}
add RTM_SECRET "$(openssl rand -hex 32)"
add CONSUL_MANAGEMENT_TOKEN "$(uuid)"
add CONSUL_AGENT_TOKEN "$(uuid)"
for service in WEBAPP ADMIN_SERVER CHANNEL_SERVER PRESENCE CHARM GATEWAY OPERATOR PROMETHEUS; do
    add "RTM_CONSUL_TOKEN_$service" "$(uuid)"
done
add GRAFANA_ADMIN_PASSWORD "$(openssl rand -hex 24)"
