"""Operator tooling: the ``rtm`` command line, ``rtm up`` (the fleet on one machine), the launcher
that starts fleet processes and waits for their ready line, operator commands (status, kill,
drain, ring changes) and the demo client (tail, post). The shared library (``services``) never
imports this package; this package imports the library and starts the services as processes."""
