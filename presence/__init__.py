"""Presence servers (built in the presence issue)."""
