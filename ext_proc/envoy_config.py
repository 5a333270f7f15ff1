"""Render envoy/envoy.yaml for one gateway instance."""

from __future__ import annotations

import os
import string
from pathlib import Path

# An installed package contains envoy/envoy.yaml as ext_proc/envoy/envoy.yaml, because
# pyproject.toml maps the package ext_proc.envoy to the top-level envoy/ folder. A source
# checkout, run in place or installed in editable mode, reads envoy/envoy.yaml itself.
_PACKAGED_TEMPLATE = Path(__file__).resolve().parent / "envoy" / "envoy.yaml"
_SOURCE_TEMPLATE = Path(__file__).resolve().parent.parent / "envoy" / "envoy.yaml"
TEMPLATE_PATH = _PACKAGED_TEMPLATE if _PACKAGED_TEMPLATE.is_file() else _SOURCE_TEMPLATE
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
SYSTEM_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"


def render_envoy_config(
    *,
    listen_port: int,
    admin_port: int,
    ext_proc_endpoints: list[Path | tuple[str, int]],
    listen_address: str = "127.0.0.1",
    upstream_ca_file: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> str:
    lines = []
    for endpoint in ext_proc_endpoints:
        if isinstance(endpoint, tuple):
            address = f"socket_address: {{ address: {endpoint[0]}, port_value: {endpoint[1]} }}"
        else:
            address = f"pipe: {{ path: {endpoint} }}"
        lines.append(f"        - endpoint: {{ address: {{ {address} }} }}")
    endpoints = "\n".join(lines)
    values = {
        "listen_address": listen_address,
        "listen_port": listen_port,
        "admin_port": admin_port,
        "ext_proc_endpoints": endpoints,
        "max_body_bytes": max_body_bytes,
        "max_body_size": _size_text(max_body_bytes),
        "upstream_ca_file": upstream_ca_file
        or os.environ.get("XENOVIA_UPSTREAM_CA_FILE")
        or SYSTEM_CA_FILE,
    }
    return string.Template(TEMPLATE_PATH.read_text()).substitute(values)


def _size_text(size: int) -> str:
    """Format a size for messages: "32 MiB" for 33554432, else the number of bytes."""
    mib, rest = divmod(size, 1024 * 1024)
    return f"{mib} MiB" if mib and not rest else f"{size} bytes"
