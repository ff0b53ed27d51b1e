"""rtm's shared runtime library: wire protocol, connections, ring, discovery, identity, config, metrics, errors, process lifecycle. It imports no service and no tooling."""
