# rtm-agent: the Consul server agent's own token (acl.tokens.agent): registers its node, syncs checks.
node_prefix "" { policy = "write" }
service_prefix "" { policy = "read" }
