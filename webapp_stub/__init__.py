"""webapp_stub: the durable webapp (Slack Web API + SQLite) and its hand-off to Admin Servers.

Modules: ``store`` (SQLite, sans-I/O), ``api`` (aiohttp handlers), ``handoff``
(the ordered outbox to Admin Servers), ``resume`` (where moved connections
stopped), ``seed`` (demo data, ``rtm seed``),
``app`` (start/stop, ``rtm webapp``).
"""
