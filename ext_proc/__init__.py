"""Xenovia Runtime: the ext_proc service behind Envoy, its CLI and its trace pipeline."""

__version__ = "0.1.0"
