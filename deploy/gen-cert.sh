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
#       GRAFANA_ADMIN_PASSWORD          Grafana's admin password (no default);
#       RTM_TLS_GID                     the group the rtm containers get (compose group_add) to
#                                       read their TLS files: 10001 (their own) when this ran as
#                                       root, else the operator's group (see below);
#   deploy/tls/ (directory 0700)  - the fleet's internal mutual TLS (docs/trust.md), made with the
#       project's own code (`rtm certs`, services/certs.py):
#       ca.crt, ca.key                  the fleet CA (ca.key stays 0600 and its maker's);
#       <instance>.crt, <instance>.key  one per compose process (FLEET below), naming
#                                       spiffe://rtm/<service>/<instance>, the process's --instance-id;
#       operator.crt, operator.key      spiffe://rtm/operator/operator, for `rtm ring` (the
#                                       compose `operator` service).
#       Who may read them: the containers run as uid 10001 (deploy/Dockerfile). Run as root
#       (sudo), the files are 0600 and given to 10001:10001 when created (fchown before the first
#       byte); run as another user, they are 0640 to that user's own group, which the containers
#       get through RTM_TLS_GID. Never world-readable. RTM_TLS_ACCESS=owner|group picks the way.
#       Certificates are kept on a rerun, and issued anew when missing, for another identity or
#       CA, or expiring within 30 days; --roll-fleet-ca takes the next step of a rotation with
#       a two-CA overlap (run it three times, restarting every service after each: begin, reissue,
#       finish; nothing refuses anything meanwhile); --rotate-fleet-ca makes a new CA and issues every
#       certificate again at once (a leaked CA key; then restart every service: docs/deploy.md,
#       "Certificates").
# Existing files are kept; --force makes a new edge certificate.
# Overrides: CERT_DIR, ENV_FILE, TLS_DIR, RTM_EDGE_HOST, RTM_CONTAINER_UID (10001), RTM_PYTHON
# (a Python with the cryptography package; default: the repository's .venv, else python3).
# Needs openssl (1.1.1 or later).
# For production, mount a real edge certificate at deploy/certs instead.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cert_dir=${CERT_DIR:-$here/certs}
env_file=${ENV_FILE:-$here/.env}
tls_dir=${TLS_DIR:-$here/tls}
host=${RTM_EDGE_HOST:-localhost}
container_uid=${RTM_CONTAINER_UID:-10001}
envoy_uid=101  # the envoy image's unprivileged user (and group)
force=no
rotate=no
for arg in "$@"; do
    case $arg in
        --force) force=yes ;;
        --rotate-fleet-ca) rotate=yes ;;
        --roll-fleet-ca) rotate=roll ;;
        *) echo "usage: $0 [--force] [--rotate-fleet-ca | --roll-fleet-ca]" >&2; exit 2 ;;
    esac
done

# The compose processes and their identities: "<service> <instance id>..." (the instance ids are
# the compose service names and each one's --instance-id; tests/system/test_deploy.py checks
# that this list and deploy/docker-compose.yml agree).
FLEET="webapp webapp-1
admin-server admin-server-1 admin-server-2
channel-server channel-server-1 channel-server-2 channel-server-3 channel-server-spare-1
presence presence-1 presence-2 presence-spare-1
charm charm-1 charm-2
gateway gateway-us-east-1 gateway-eu-west-1
operator operator"

mkdir -p "$cert_dir"
if [ "$force" = yes ] || [ ! -s "$cert_dir/edge.crt" ] || [ ! -s "$cert_dir/edge.key" ]; then
    san="DNS:localhost,IP:127.0.0.1"
    [ "$host" = localhost ] || san="DNS:$host,$san"
    # Created 0600 in one step (umask in a subshell, never chmod-ed) and read by their owner only:
    # the edge container runs Envoy as RTM_EDGE_UID:RTM_EDGE_GID (compose `user:`, below). Run as
    # root, the files go to the envoy image's own unprivileged user (uid 101), never root.
    (umask 077 && openssl req -x509 -newkey rsa:2048 -sha256 -days 365 -nodes \
        -keyout "$cert_dir/edge.key" -out "$cert_dir/edge.crt" \
        -subj "/CN=$host" -addext "subjectAltName=$san")
    if [ "$(id -u)" = 0 ]; then chown "$envoy_uid:$envoy_uid" "$cert_dir/edge.key" "$cert_dir/edge.crt"; fi
    echo "wrote $cert_dir/edge.crt and edge.key (CN=$host, SAN $san)"
else
    echo "kept $cert_dir/edge.crt (--force makes a new one)"
    case $(ls -l "$cert_dir/edge.key") in
        -rw-------*) ;;
        *) echo "warning: $cert_dir/edge.key is readable by others (made by an older gen-cert.sh): run with --force" >&2 ;;
    esac
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
# Envoy runs as the owner of deploy/certs/edge.key (0600): this user, or uid 101 when run as root.
if [ "$(id -u)" = 0 ]; then edge_uid=$envoy_uid edge_gid=$envoy_uid; else edge_uid=$(id -u) edge_gid=$(id -g); fi
add RTM_EDGE_UID "$edge_uid"
add RTM_EDGE_GID "$edge_gid"

# The fleet's CA and certificates, with the project's own code (rtm certs: services/certs.py).
access=${RTM_TLS_ACCESS:-}
if [ -z "$access" ]; then
    if [ "$(id -u)" = 0 ]; then access=owner; else access=group; fi
fi
case $access in
    owner) access_flags="--owner $container_uid:$container_uid"; tls_gid=$container_uid ;;
    group) access_flags="--group-readable"; tls_gid=$(id -g) ;;
    *) echo "RTM_TLS_ACCESS must be owner or group, not $access" >&2; exit 2 ;;
esac
add RTM_TLS_GID "$tls_gid"
if ! grep -q "^RTM_TLS_GID=$tls_gid\$" "$env_file"; then
    echo "$env_file has another RTM_TLS_GID than this run's ($tls_gid): fix it, or remove $tls_dir and rerun" >&2
    exit 1
fi
python=${RTM_PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python=$repo/.venv/bin/python; else python=python3; fi
fi
if ! "$python" -c "import cryptography" 2>/dev/null; then
    echo "$python cannot import cryptography: install it (pip install cryptography), or set RTM_PYTHON" >&2
    exit 1
fi
certs() {
    action=$1
    shift
    # $access_flags is unquoted on purpose: one or two words
    # shellcheck disable=SC2086
    PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -m rtmctl.cli certs "$action" --dir "$tls_dir" $access_flags "$@"
}
if [ "$rotate" = yes ]; then
    certs rotate --immediate
elif [ "$rotate" = roll ]; then
    certs rotate
fi
certs init
echo "$FLEET" | while read -r service instances; do
    # shellcheck disable=SC2086
    certs issue "$service" $instances
done
echo "fleet certificates in $tls_dir ($access: $([ "$access" = owner ] && echo "0600, owner $container_uid" || echo "0640, group $tls_gid"))"
