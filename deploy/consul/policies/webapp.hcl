# rtm-webapp: registers and keeps passing only "webapp" instances (Consul scopes service rules
# by service name, not instance: any webapp token may write any webapp registration).
service "webapp" { policy = "write" }
# Every rtm process: find the others, read the fleet's documents (rings, region map, drained flags).
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
key_prefix "rtm/" { policy = "read" }
