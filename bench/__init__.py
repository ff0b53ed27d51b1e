"""Benchmarks of the rtm fleet: fan-out, idle connections per gateway, channels per channel server.

Run each as a module from the repository root, e.g. ``python -m bench.fanout``;
see bench/RESULTS.md for the commands and the measured numbers.
"""
