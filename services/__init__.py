"""rtm's shared library: wire protocol, ring, discovery, config, metrics, process lifecycle, CLI."""
