"""Presence servers: who is online, for the users their ring slot maps to."""
