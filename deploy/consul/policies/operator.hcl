# rtm-operator: the rtm CLI (rtm status, drain, undrain, ring show): the only writer of the
# drained-regions flags and of the region map; reads everything else. Registers nothing.
key_prefix "rtm/regions/drained/" { policy = "write" }
key "rtm/regions/map" { policy = "write" }
# Every rtm process: find the others, read the fleet's documents (rings, region map, drained flags).
service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }
key_prefix "rtm/" { policy = "read" }
