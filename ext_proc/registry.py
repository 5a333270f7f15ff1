"""The registry of proxies, keys and policy attachments, kept as files in the home folder.

The CLI writes the files atomically; the running gateway polls them (``RegistryWatcher``)
and swaps in a new immutable ``Registry`` when they change. A file that fails to parse is
reported and the last good registry stays in force.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from ext_proc import home as home_paths
from ext_proc.upstream import Upstream, UpstreamError, parse_upstream_url

logger = logging.getLogger(__name__)

STAGES = ("request", "response")
STREAM_POLICY_MODES = ("hold", "live")
BODY_MODES = ("full", "metadata", "none")
# Held by every CLI change to the registry files, beside the config and secrets folders.
REGISTRY_LOCK_NAME = ".registry.lock"
POLICY_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_BODY_LIMIT = 16384


class RegistryError(ValueError):
    """A registry file is malformed, or a CLI change would make it inconsistent."""


@dataclass(frozen=True)
class PolicyAttachment:
    stage: str
    name: str
    sha256: str
    dry_run: bool = False


@dataclass(frozen=True)
class Proxy:
    id: str
    name: str
    org_id: str
    environment: str
    upstream_url: str
    upstream: Upstream
    provider: str = "openai"
    upstream_key_env: str | None = None
    stream_policy_mode: str = "hold"
    body_mode: str = "full"
    body_limit: int = DEFAULT_BODY_LIMIT
    # Stage -> the policies attached at that stage, all evaluated; any one can deny.
    policies: Mapping[str, tuple[PolicyAttachment, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class ApiKey:
    id: str
    sha256: str
    org_id: str
    proxy_ids: frozenset[str]
    revoked: bool = False


@dataclass(frozen=True)
class Registry:
    proxies: Mapping[str, Proxy]
    keys_by_hash: Mapping[str, ApiKey]
    # (proxy_id, stage, policy name) -> policy source text, read together with proxies.json.
    policy_sources: Mapping[tuple[str, str, str], str]

    @classmethod
    def empty(cls) -> "Registry":
        return cls(MappingProxyType({}), MappingProxyType({}), MappingProxyType({}))


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def load_registry(home: Path) -> Registry:
    """Read every registry file; raise RegistryError naming the file that is broken."""
    proxies_doc = _read_json(home_paths.proxies_file(home), {"proxies": {}})
    keys_doc = _read_json(home_paths.keys_file(home), {"keys": {}})
    proxies = {pid: _parse_proxy(pid, raw) for pid, raw in proxies_doc.get("proxies", {}).items()}
    keys = {}
    for key_id, raw in keys_doc.get("keys", {}).items():
        key = _parse_key(key_id, raw)
        keys[key.sha256] = key
    sources = {}
    for proxy in proxies.values():
        for stage, attachments in proxy.policies.items():
            for attachment in attachments:
                path = home_paths.policy_file(home, proxy.id, stage, attachment.name)
                try:
                    sources[(proxy.id, stage, attachment.name)] = path.read_text()
                except OSError as exc:
                    raise RegistryError(f"{path}: cannot read attached policy: {exc}") from exc
    return Registry(MappingProxyType(proxies), MappingProxyType(keys), MappingProxyType(sources))


def _read_json(path: Path, default: dict) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return default
    except OSError as exc:
        raise RegistryError(f"{path}: {exc}") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(document, dict):
        raise RegistryError(f"{path}: expected a JSON object at the top level")
    return document


def _parse_proxy(proxy_id: str, raw: dict) -> Proxy:
    try:
        policies = {
            stage: tuple(
                PolicyAttachment(stage, entry["name"], entry["sha256"], bool(entry.get("dry_run")))
                for entry in entries
            )
            for stage, entries in raw.get("policies", {}).items()
            if entries
        }
        unknown = set(policies) - set(STAGES)
        if unknown:
            raise RegistryError(f"proxy {proxy_id}: unknown policy stage {sorted(unknown)}")
        return Proxy(
            id=proxy_id,
            name=raw["name"],
            org_id=raw.get("org_id", "org_default"),
            environment=raw.get("environment", "dev"),
            upstream_url=raw["upstream_url"],
            upstream=parse_upstream_url(raw["upstream_url"]),
            provider=raw.get("provider", "openai"),
            upstream_key_env=raw.get("upstream_key_env"),
            stream_policy_mode=_choice(raw, "stream_policy_mode", STREAM_POLICY_MODES, "hold"),
            body_mode=_choice(raw, "body_mode", BODY_MODES, "full"),
            body_limit=int(raw.get("body_limit", DEFAULT_BODY_LIMIT)),
            policies=MappingProxyType(policies),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, RegistryError):
            raise
        if isinstance(exc, UpstreamError):
            raise RegistryError(f"proxy {proxy_id}: {exc}") from exc
        raise RegistryError(f"proxy {proxy_id}: invalid entry: {exc!r}") from exc


def _choice(raw: dict, name: str, allowed: tuple[str, ...], default: str) -> str:
    value = raw.get(name, default)
    if value not in allowed:
        raise RegistryError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _parse_key(key_id: str, raw: dict) -> ApiKey:
    try:
        return ApiKey(
            id=key_id,
            sha256=raw["sha256"],
            org_id=raw.get("org_id", "org_default"),
            proxy_ids=frozenset(raw["proxies"]),
            revoked=bool(raw.get("revoked_at")),
        )
    except (KeyError, TypeError) as exc:
        raise RegistryError(f"key {key_id}: invalid entry: {exc!r}") from exc


@dataclass(frozen=True)
class ProxyDeletion:
    """Changes made by ``RegistryEditor.delete_proxy``."""

    proxy_id: str
    # Keys whose proxies listed the deleted proxy.
    updated_key_ids: list[str]
    # Those of them, not revoked, that are now scoped to no proxy at all.
    keys_without_proxy: list[str]
    removed_policy_files: list[Path]


class RegistryWatcher:
    """Reload the registry when its files change, keeping the last good one on errors.

    ``poll()`` is cheap (a few ``stat`` calls) and is meant to run every second or so.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.registry = Registry.empty()
        # Identifies the loaded files, the same in every process that loaded the same
        # files, so that callers can tell when a change has taken effect everywhere.
        self.version = ""
        self._signature: tuple | None = None
        self._failed_signature: tuple | None = None
        # Why the files on disk are not in force, or "" when they are.
        self.error = ""

    def poll(self) -> bool:
        """Reload if any file changed; return True when a new registry took effect."""
        signature = self._signature_now()
        if signature == self._signature or signature == self._failed_signature:
            return False
        try:
            registry = load_registry(self.home)
        except RegistryError as exc:
            self._failed_signature = signature
            self.error = str(exc)
            logger.error("registry reload failed, keeping the previous one: %s", exc)
            return False
        self.registry = registry
        self.version = _version_of(signature)
        self._signature = signature
        self._failed_signature = None
        self.error = ""
        logger.info(
            "registry loaded: %d proxies, %d keys, %d policies",
            len(registry.proxies),
            len(registry.keys_by_hash),
            len(registry.policy_sources),
        )
        return True

    def _signature_now(self) -> tuple:
        return _files_signature(self.home)


def registry_version(home: Path) -> str:
    """Return the version a gateway reports once it has loaded the registry files as they are now."""
    return _version_of(_files_signature(home))


def _version_of(signature: tuple) -> str:
    return hashlib.sha256(repr(signature).encode()).hexdigest()[:16]


def _files_signature(home: Path) -> tuple:
    paths = [home_paths.proxies_file(home), home_paths.keys_file(home)]
    config_dir = home / "config"
    if config_dir.is_dir():
        paths.extend(sorted(config_dir.glob("policy.*.rego")))
    entries = []
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:
            entries.append((str(path), None))
            continue
        entries.append((str(path), stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(entries)


def _locked(method):
    """Run an editing method while holding the home's registry lock."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock():
            return method(self, *args, **kwargs)

    return locked


class RegistryEditor:
    """Change the registry files on behalf of the CLI.

    Each change reads, edits and writes the files under an exclusive lock on
    ``<home>/.registry.lock``, so two commands run at the same time take turns instead of
    one writing back a copy that undoes the other.
    """

    def __init__(self, home: Path) -> None:
        self.home = home

    @contextlib.contextmanager
    def _lock(self):
        path = self.home / REGISTRY_LOCK_NAME
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            lock_file = open(path, "a")  # noqa: SIM115 - closed by the with statement below
        except OSError as exc:
            raise RegistryError(
                f"failed to open the registry lock {path}: {exc}; it must be a writable file"
            ) from exc
        with lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _proxies_doc(self) -> dict:
        return _read_json(home_paths.proxies_file(self.home), {"proxies": {}})

    def _keys_doc(self) -> dict:
        return _read_json(home_paths.keys_file(self.home), {"keys": {}})

    @_locked
    def create_proxy(self, **fields) -> str:
        _check_proxy_name(fields["name"])
        parse_upstream_url(fields["upstream_url"])
        document = self._proxies_doc()
        proxy_id = new_id("prx")
        entry = {key: value for key, value in fields.items() if value is not None}
        entry["created_at"] = _now_iso()
        document.setdefault("proxies", {})[proxy_id] = entry
        _parse_proxy(proxy_id, entry)
        home_paths.write_json(home_paths.proxies_file(self.home), document)
        return proxy_id

    @_locked
    def update_proxy(self, proxy_id: str, **fields) -> None:
        document = self._proxies_doc()
        entry = self._require_proxy(document, proxy_id)
        if fields.get("name") is not None:
            _check_proxy_name(fields["name"])
        entry.update({key: value for key, value in fields.items() if value is not None})
        _parse_proxy(proxy_id, entry)
        home_paths.write_json(home_paths.proxies_file(self.home), document)

    @_locked
    def delete_proxy(self, proxy_id: str) -> ProxyDeletion:
        """Delete a proxy, its policy files and its id from every key's proxies.

        Each file is replaced atomically, in the order keys.json, proxies.json, policy files.
        Every step leaves a valid registry, so a gateway that reloads in between loads no
        broken state. Keys lose the proxy first, so its calls get 403 from that step on.
        """
        document = self._proxies_doc()
        entry = self._require_proxy(document, proxy_id)
        keys_document = self._keys_doc()
        updated_keys = []
        keys_left_without_proxy = []
        for key_id, key_entry in sorted(keys_document.get("keys", {}).items()):
            allowed = key_entry.get("proxies", [])
            if proxy_id not in allowed:
                continue
            key_entry["proxies"] = [other for other in allowed if other != proxy_id]
            updated_keys.append(key_id)
            if not key_entry["proxies"] and "revoked_at" not in key_entry:
                keys_left_without_proxy.append(key_id)
        if updated_keys:
            home_paths.write_json(home_paths.keys_file(self.home), keys_document, mode=0o600)
        del document["proxies"][proxy_id]
        home_paths.write_json(home_paths.proxies_file(self.home), document)
        removed_files = self._remove_policy_files(proxy_id, entry.get("policies", {}))
        return ProxyDeletion(proxy_id, updated_keys, keys_left_without_proxy, removed_files)

    def _remove_policy_files(self, proxy_id: str, attached: dict) -> list[Path]:
        # Files of attachments that proxies.json no longer lists (left by an interrupted
        # detach, say) are removed as well.
        paths = {
            home_paths.policy_file(self.home, proxy_id, stage, policy["name"])
            for stage, policies in attached.items()
            for policy in policies
        }
        for stage in STAGES:
            pattern = f"policy.{glob.escape(proxy_id)}.{stage}.*.rego"
            for path in (self.home / "config").glob(pattern):
                name = path.name.removeprefix(f"policy.{proxy_id}.{stage}.").removesuffix(".rego")
                if POLICY_NAME_PATTERN.fullmatch(name):
                    paths.add(path)
        removed = []
        for path in sorted(paths):
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
        return removed

    def list_proxies(self) -> list[dict]:
        proxies = self._proxies_doc().get("proxies", {})
        return [{"id": proxy_id, **entry} for proxy_id, entry in sorted(proxies.items())]

    @_locked
    def create_key(self, proxy_ids: list[str], key_hash: str) -> str:
        proxies = self._proxies_doc().get("proxies", {})
        for proxy_id in proxy_ids:
            if proxy_id not in proxies:
                raise RegistryError(f"proxy {proxy_id!r} not found; see `xenovia proxy list`")
        org_id = proxies[proxy_ids[0]].get("org_id", "org_default")
        document = self._keys_doc()
        key_id = new_id("key")
        document.setdefault("keys", {})[key_id] = {
            "sha256": key_hash,
            "proxies": sorted(proxy_ids),
            "org_id": org_id,
            "created_at": _now_iso(),
        }
        home_paths.write_json(home_paths.keys_file(self.home), document, mode=0o600)
        return key_id

    @_locked
    def revoke_key(self, key_id: str) -> None:
        document = self._keys_doc()
        entry = document.get("keys", {}).get(key_id)
        if entry is None:
            raise RegistryError(f"key {key_id!r} not found; see `xenovia key list`")
        if "revoked_at" in entry:
            raise RegistryError(f"key {key_id!r} was already revoked at {entry['revoked_at']}")
        entry["revoked_at"] = _now_iso()
        home_paths.write_json(home_paths.keys_file(self.home), document, mode=0o600)

    def list_keys(self) -> list[dict]:
        keys = self._keys_doc().get("keys", {})
        return [
            {"id": key_id, **{k: v for k, v in entry.items() if k != "sha256"}}
            for key_id, entry in sorted(keys.items())
        ]

    @_locked
    def attach_policy(
        self, proxy_id: str, stage: str, name: str, source: str, sha256: str, dry_run: bool
    ) -> bool:
        """Attach a policy, replacing one of the same name; return True when it replaced one."""
        if not POLICY_NAME_PATTERN.fullmatch(name):
            raise RegistryError(
                f"policy name {name!r} must be 1 to 64 letters, digits, '_' or '-'; rename the file"
            )
        document = self._proxies_doc()
        entry = self._require_proxy(document, proxy_id)
        # The policy file is written first, so that a watcher that loads the new attachment
        # always finds the matching source.
        path = home_paths.policy_file(self.home, proxy_id, stage, name)
        home_paths.write_atomically(path, source.encode())
        attached = entry.setdefault("policies", {}).setdefault(stage, [])
        kept = [policy for policy in attached if policy["name"] != name]
        kept.append({"name": name, "sha256": sha256, "dry_run": dry_run, "attached_at": _now_iso()})
        entry["policies"][stage] = kept
        home_paths.write_json(home_paths.proxies_file(self.home), document)
        return len(kept) == len(attached)

    @_locked
    def detach_policy(self, proxy_id: str, stage: str, name: str | None) -> list[str]:
        """Detach the named policy, or every policy of the stage; return the names detached."""
        document = self._proxies_doc()
        entry = self._require_proxy(document, proxy_id)
        attached = entry.get("policies", {}).get(stage, [])
        removed = [policy["name"] for policy in attached if name is None or policy["name"] == name]
        if not removed:
            wanted = f"policy {name!r}" if name else "policy"
            raise RegistryError(f"proxy {proxy_id} has no {stage}-stage {wanted}; see `xenovia policy list`")
        remaining = [policy for policy in attached if policy["name"] not in removed]
        if remaining:
            entry["policies"][stage] = remaining
        else:
            # A stage with no policies is left out, as if nothing had ever been attached.
            del entry["policies"][stage]
        home_paths.write_json(home_paths.proxies_file(self.home), document)
        for removed_name in removed:
            home_paths.policy_file(self.home, proxy_id, stage, removed_name).unlink(missing_ok=True)
        return removed

    def list_policies(self, proxy_id: str | None) -> list[dict]:
        rows = []
        for proxy in self.list_proxies():
            if proxy_id is not None and proxy["id"] != proxy_id:
                continue
            for stage, attached in sorted(proxy.get("policies", {}).items()):
                for policy in attached:
                    rows.append({"proxy_id": proxy["id"], "stage": stage, **policy})
        return rows

    @staticmethod
    def _require_proxy(document: dict, proxy_id: str) -> dict:
        entry = document.get("proxies", {}).get(proxy_id)
        if entry is None:
            raise RegistryError(f"proxy {proxy_id!r} not found; see `xenovia proxy list`")
        return entry


def _check_proxy_name(name: str) -> None:
    if not name.strip():
        raise RegistryError("proxy name must not be empty; pass a label with --name")


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
