# rtm-charm: its own registration; the only writer of the rings (CAS) and of the leader lock.
service "charm" { policy = "write" }
key_prefix "rtm/ring/" { policy = "write" }
key "rtm/charm/leader" { policy = "write" }
# the leader lock is a session on the Consul agent's node (its name is the Consul container's)
session_prefix "" { policy = "write" }
# Every rtm process: find the others, read the fleet's documents (rings, region map, drained flags).
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
key_prefix "rtm/" { policy = "read" }
