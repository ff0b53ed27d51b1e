# rtm-presence: registers and keeps passing only "presence" instances (Consul scopes service rules
# by service name, not instance: any presence token may write any presence registration).
service "presence" { policy = "write" }
# Every rtm process: find the others, read the fleet's documents (rings, region map, drained flags).
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
key_prefix "rtm/" { policy = "read" }
