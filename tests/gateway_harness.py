"""Start the real gateway (`xenovia up`: collector, ext_proc worker, Envoy) for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ext_proc.registry import registry_version

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 90.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_environment(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    environment = dict(os.environ)
    environment.pop("RUST_BACKTRACE", None)
    environment["XENOVIA_HOME"] = str(home)
    environment["PYTHONPATH"] = str(REPO_ROOT)
    environment.update(extra or {})
    return environment


def run_cli(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "ext_proc.cli", *args],
        env=child_environment(home), capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"xenovia {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def read_lines_until(stream, found, timeout: float = 90.0) -> tuple[list[str], bool]:
    """Read lines from ``stream`` until ``found(line)`` is true; return them and whether it was."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if found(line):
            return lines, True
    return lines, False


def stop_group(process: subprocess.Popen) -> None:
    """Stop a process started in a session of its own, and its children: SIGINT, then SIGKILL."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class RunningGateway:
    def __init__(self, home: Path, environment: dict[str, str] | None = None, workers: int = 1) -> None:
        self.home = home
        self.port = free_port()
        self.admin_port = free_port()
        self.environment = environment or {}
        self.workers = workers
        self.process: subprocess.Popen | None = None
        self.log_path = home / "gateway.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def base_url(self, proxy_id: str) -> str:
        return f"{self.url}/a/{proxy_id}/openai/v1"

    def start(self) -> "RunningGateway":
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ext_proc.cli", "up", "--port", str(self.port),
             "--admin-port", str(self.admin_port), "--workers", str(self.workers)],
            env=child_environment(self.home, self.environment), stdout=log, stderr=log,
            cwd=REPO_ROOT, start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.health()
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"gateway did not become healthy:\n{self.log_tail()}")

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
            return json.loads(response.read())

    def wait_for_reload(self, timeout: float = 10.0) -> None:
        """Wait until every worker has loaded the registry files as they are now.

        Envoy spreads health checks over the workers, so several matching answers in a row
        mean that all of them have loaded the change.
        """
        expected = registry_version(self.home)
        deadline = time.monotonic() + timeout
        streak = 0
        while time.monotonic() < deadline:
            try:
                version = self.registry_version()
            except (urllib.error.URLError, OSError):
                version = None  # a worker restarting answers 503 for a moment
            streak = streak + 1 if version == expected else 0
            if streak >= self.workers * 4:
                return
            time.sleep(0.02)
        raise AssertionError("the gateway did not reload its registry in time")

    def registry_version(self) -> str:
        return self.health()["registry_version"]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run_cli(self.home, *args, check=check)

    def change_registry(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a CLI command that changes the registry and wait until the gateway applies it."""
        result = self.cli(*args, check=check)
        if result.returncode == 0:
            self.wait_for_reload()
        return result

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()
