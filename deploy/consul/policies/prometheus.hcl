# rtm-prometheus: Consul service discovery of every process, and Consul's own /v1/agent/metrics.
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
agent_prefix "" { policy = "read" }
