"""Admin servers: the stateless entry from the webapp into the fleet."""
