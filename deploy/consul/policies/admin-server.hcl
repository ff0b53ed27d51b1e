# rtm-admin-server: registers and keeps passing only "admin-server" instances (Consul scopes service rules
# by service name, not instance: any admin-server token may write any admin-server registration).
service "admin-server" { policy = "write" }
# Every rtm process: find the others, read the fleet's documents (rings, region map, drained flags).
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
key_prefix "rtm/" { policy = "read" }
