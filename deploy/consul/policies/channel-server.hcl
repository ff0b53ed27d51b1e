# rtm-channel-server: registers and keeps passing only "channel-server" instances (Consul scopes service rules
# by service name, not instance: any channel-server token may write any channel-server registration).
service "channel-server" { policy = "write" }
# Every rtm process: find the others, read the fleet's documents (rings, region map, drained flags).
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
key_prefix "rtm/" { policy = "read" }
