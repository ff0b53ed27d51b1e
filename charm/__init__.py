"""CHARM: the leader-elected ring manager (failover is built in the CHARM issue; until then `rtm up` writes the ring document itself)."""
