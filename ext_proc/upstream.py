"""Provider upstream URLs: parsing and the server-side request forgery check.

A proxy's upstream is the provider's base URL as an OpenAI client takes it
(``https://api.openai.com/v1``); ``/a/<proxy_id>/openai/v1/X`` goes to ``<upstream>/X``.
Loopback and private addresses are allowed because self-hosted providers (vLLM, Ollama)
live there. Link-local addresses and cloud metadata endpoints are refused, both when a
proxy is created and, after DNS resolution, on every request.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

# Metadata services reachable under names or addresses that are not link-local.
_METADATA_HOSTNAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.internal",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
    )
)

_RESOLVE_TTL_SECONDS = 30.0


class UpstreamError(ValueError):
    """The upstream URL is malformed or points at a forbidden address."""


@dataclass(frozen=True)
class Upstream:
    scheme: str
    host: str
    port: int
    path_prefix: str

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def target_path(self, rest: str) -> str:
        """Join the upstream's path prefix and the path after ``/openai/v1``."""
        return self.path_prefix + rest


def parse_upstream_url(url: str) -> Upstream:
    """Parse and check a provider base URL; raise UpstreamError when it is unusable."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        raise UpstreamError(f"upstream URL must start with http:// or https://, got {url!r}")
    if not parts.hostname:
        raise UpstreamError(f"upstream URL has no host: {url!r}")
    if parts.username or parts.password:
        raise UpstreamError("upstream URL must not contain credentials; use --upstream-key-env")
    if parts.query or parts.fragment:
        raise UpstreamError(f"upstream URL must not have a query or fragment: {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UpstreamError(f"upstream URL has an invalid port: {url!r}") from exc
    host = parts.hostname.lower()
    check_host_allowed(host)
    return Upstream(parts.scheme, host, port, parts.path.rstrip("/"))


def check_host_allowed(host: str) -> None:
    """Raise UpstreamError when the host is a metadata name or a forbidden address."""
    if host.rstrip(".") in _METADATA_HOSTNAMES:
        raise UpstreamError(f"upstream host {host!r} is a cloud metadata endpoint")
    address = _literal_address(host)
    if address is not None:
        check_address_allowed(address)


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Return the address a host names literally, in any form a resolver accepts.

    inet_aton reads the shorthand forms (2852039166, 0xa9fea9fe, 0251.0376.0251.0376,
    169.254.43518) that resolve without DNS and so never reach the DNS check.
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """Return the IPv4 address an IPv6 address carries (mapped, NAT64, 6to4, compatible)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def check_address_allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    if isinstance(address, ipaddress.IPv6Address):
        address = _embedded_ipv4(address) or address
    if address in _METADATA_ADDRESSES:
        raise UpstreamError(f"upstream address {address} is a cloud metadata endpoint")
    if address.is_link_local:
        raise UpstreamError(f"upstream address {address} is link-local")
    if address.is_unspecified or address.is_multicast:
        raise UpstreamError(f"upstream address {address} is not a unicast address")


class ResolvedAddressCheck:
    """Check that a hostname's current DNS answers are all allowed, caching the verdict.

    Envoy resolves the host again on its own, so a DNS answer that changes between
    this check and Envoy's lookup is not caught; the cache keeps that window at most
    ``_RESOLVE_TTL_SECONDS`` wide.
    """

    def __init__(self) -> None:
        self._verdicts: dict[str, tuple[float, str | None]] = {}

    def error_for(self, host: str, port: int) -> str | None:
        """Return why the host is forbidden, or None when it may be used."""
        try:
            ipaddress.ip_address(host)
            return None  # literal addresses were checked when the URL was parsed
        except ValueError:
            pass
        now = time.monotonic()
        cached = self._verdicts.get(host)
        if cached is not None and cached[0] > now:
            return cached[1]
        verdict = _resolve_and_check(host, port)
        self._verdicts[host] = (now + _RESOLVE_TTL_SECONDS, verdict)
        return verdict


def _resolve_and_check(host: str, port: int) -> str | None:
    try:
        answers = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError:
        # Envoy reports the failed lookup itself, as a 503 to the client.
        return None
    for *_, sockaddr in answers:
        try:
            check_address_allowed(ipaddress.ip_address(sockaddr[0]))
        except UpstreamError as exc:
            return str(exc)
    return None
