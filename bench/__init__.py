"""Benchmark of the gateway against plain Envoy and a no-op ext_proc; run with ``make bench``."""
