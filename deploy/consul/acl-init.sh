#!/bin/sh
# One-shot ACL bootstrap for deploy/docker-compose.yml (service consul-acl-init), run with the
# management token (CONSUL_HTTP_TOKEN) against the Consul server once it has a leader.
# Idempotent: a policy that exists is updated from its file, a token that exists is kept.
#
# For each policies/<name>.hcl: policy rtm-<name>; for each name below, a token whose SecretID
# is the value generated into deploy/.env by gen-cert.sh (so each container gets its own token
# through its environment, and nothing has to be copied back from Consul).
set -eu
policies=${POLICY_DIR:-/rtm/policies}

for file in "$policies"/*.hcl; do
    name=rtm-$(basename "$file" .hcl)
    if consul acl policy read -name "$name" >/dev/null 2>&1; then
        consul acl policy update -name "$name" -rules @"$file" >/dev/null
        echo "updated policy $name"
    else
        consul acl policy create -name "$name" -rules @"$file" >/dev/null
        echo "created policy $name"
    fi
done

# token <policy> <secret>: create the token unless a token with that secret exists already.
token() {
    if CONSUL_HTTP_TOKEN=$2 consul acl token read -self >/dev/null 2>&1; then
        echo "kept token for rtm-$1"
    else
        consul acl token create -secret "$2" -policy-name "rtm-$1" -description "rtm $1" >/dev/null
        echo "created token for rtm-$1"
    fi
}

token agent "$CONSUL_AGENT_TOKEN"
token webapp "$RTM_CONSUL_TOKEN_WEBAPP"
token admin-server "$RTM_CONSUL_TOKEN_ADMIN_SERVER"
token channel-server "$RTM_CONSUL_TOKEN_CHANNEL_SERVER"
token presence "$RTM_CONSUL_TOKEN_PRESENCE"
token charm "$RTM_CONSUL_TOKEN_CHARM"
token gateway "$RTM_CONSUL_TOKEN_GATEWAY"
token operator "$RTM_CONSUL_TOKEN_OPERATOR"
token prometheus "$RTM_CONSUL_TOKEN_PROMETHEUS"
echo "ACL policies and tokens are in place"
