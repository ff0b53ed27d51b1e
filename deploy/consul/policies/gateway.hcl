# rtm-gateway: registers and keeps passing only "gateway" instances (Consul scopes service rules
# by service name, not instance: any gateway token may write any gateway registration).
service "gateway" { policy = "write" }
# Every rtm process: find the others, read the fleet's documents (rings, region map, drained flags).
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
key_prefix "rtm/" { policy = "read" }
