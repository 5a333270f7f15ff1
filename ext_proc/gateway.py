"""State shared by every request a worker process handles.

One ``Gateway`` lives on the worker's asyncio loop thread. Policy engines are built on
that thread too, because a regorus engine may only be used by the thread that made it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ext_proc import policy
from ext_proc.registry import Proxy, Registry, RegistryWatcher
from ext_proc.upstream import ResolvedAddressCheck

logger = logging.getLogger(__name__)

REGISTRY_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Settings:
    home: Path
    redis_url: str | None = None
    # Response-stage policies and session resolution fail closed unless this is set.
    fail_open: bool = False

    @classmethod
    def from_environment(cls, home: Path) -> "Settings":
        return cls(home=home, redis_url=os.environ.get("XENOVIA_REDIS_URL") or None)


class Gateway:
    def __init__(self, settings: Settings, sessions, exporter) -> None:
        self.settings = settings
        self.sessions = sessions
        self.exporter = exporter
        self.watcher = RegistryWatcher(settings.home)
        self.address_check = ResolvedAddressCheck()
        self._engines: dict[tuple, policy.PolicyEngine] = {}
        self._engine_errors: dict[tuple, PolicyUnavailable] = {}
        self._poll_task: asyncio.Task | None = None
        self.watcher.poll()

    @property
    def registry(self) -> Registry:
        return self.watcher.registry

    def start(self) -> None:
        self._compile_attached()
        self._poll_task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(REGISTRY_POLL_SECONDS)
            try:
                if self.watcher.poll():
                    self._drop_stale_engines()
                    self._compile_attached()
            except Exception:
                logger.exception("registry poll failed")

    def _drop_stale_engines(self) -> None:
        live = set()
        for proxy in self.registry.proxies.values():
            for stage in proxy.policies:
                live.add(self._engine_key(proxy, stage))
        for key in list(self._engines):
            if key not in live:
                del self._engines[key]
        self._engine_errors = {k: v for k, v in self._engine_errors.items() if k in live}

    def _compile_attached(self) -> None:
        # Compiling every attached policy as soon as it loads, instead of at its first call,
        # lets /healthz report a policy that does not compile before a call is denied by it.
        for proxy in self.registry.proxies.values():
            for stage in proxy.policies:
                try:
                    self.policy_engine(proxy, stage)
                except PolicyUnavailable:
                    pass  # policy_engine logged it, and policy_errors() reports it

    def policy_errors(self) -> list[dict[str, str]]:
        """Return the attached policies that do not compile, one entry per proxy and stage."""
        return [
            {"proxy_id": proxy_id, "stage": stage, "policy": error.policy_name, "error": str(error)}
            for (proxy_id, stage, _), error in self._engine_errors.items()
        ]

    def _engine_key(self, proxy: Proxy, stage: str) -> tuple:
        # Keyed by the policy text on disk, not the hash recorded at attach time, so that a
        # file edited in place (a ConfigMap update) is enforced by every worker once loaded.
        sources = self.registry.policy_sources
        attached = tuple(
            (a.name, sources.get((proxy.id, stage, a.name), ""), a.dry_run)
            for a in proxy.policies[stage]
        )
        return (proxy.id, stage, attached)

    def policy_engine(self, proxy: Proxy, stage: str) -> "policy.PolicyEngine | None":
        """Return the engine of every policy attached at the stage, None when there is none.

        Raises PolicyUnavailable when an attached source does not compile; the caller
        fails closed.
        """
        if stage not in proxy.policies:
            return None
        key = self._engine_key(proxy, stage)
        engine = self._engines.get(key)
        if engine is not None:
            return engine
        if key in self._engine_errors:
            raise self._engine_errors[key]
        attached = []
        for attachment in proxy.policies[stage]:
            source = self.registry.policy_sources.get((proxy.id, stage, attachment.name), "")
            try:
                attached.append((policy.compile_policy(source, attachment.name), attachment.dry_run))
            except policy.PolicyCompileError as exc:
                logger.error("policy %s for proxy %s does not compile: %s", attachment.name, proxy.id, exc)
                error = PolicyUnavailable(attachment.name, str(exc))
                self._engine_errors[key] = error
                raise error from exc
        engine = policy.PolicyEngine(attached, stage=stage)
        self._engines[key] = engine
        return engine


class PolicyUnavailable(policy.PolicyCompileError):
    """An attached policy does not compile, so its stage cannot be evaluated."""

    def __init__(self, policy_name: str, message: str) -> None:
        super().__init__(policy_name, f"policy does not compile: {message}")
        self.policy_name = policy_name
