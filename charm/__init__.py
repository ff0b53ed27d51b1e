"""CHARM: the leader-elected ring manager; replaces a failed channel or presence server with a spare."""
