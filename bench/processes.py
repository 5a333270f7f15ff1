"""Start and stop the benchmark's child processes, each in its own process group.

Every child is stopped by its PID (SIGTERM to its group, then SIGKILL after a grace
period), so the benchmark leaves nothing running, whatever way it ends.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_SECONDS = 15.0
START_TIMEOUT_SECONDS = 90.0


class StartError(RuntimeError):
    """A benchmark component did not start or did not become ready."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    environment = dict(os.environ)
    # regorus attaches a Rust backtrace to every error when this is set, which is slow.
    environment.pop("RUST_BACKTRACE", None)
    environment["PYTHONPATH"] = str(REPO_ROOT)
    environment.update(extra or {})
    return environment


def envoy_binary() -> str:
    beside_python = Path(sys.executable).parent / "envoy"
    if not beside_python.exists():
        raise StartError(f"envoy not found at {beside_python}; run `make .venv/.installed`")
    return str(beside_python)


class ChildProcess:
    """One child process started in a new session; its output goes to a log file."""

    def __init__(
        self,
        name: str,
        command: list[str],
        log_path: Path,
        environment: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        log = open(log_path, "ab")  # noqa: SIM115 - closed once Popen has its copy
        try:
            self.process = subprocess.Popen(
                command,
                env=child_environment(environment),
                stdout=log,
                stderr=log,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        finally:
            log.close()
        logger.info("started %s (pid %d)", name, self.process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise StartError(
                f"{self.name} exited with status {self.process.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, stop_signal: int = signal.SIGTERM) -> int:
        """Signal the child (and its process group), wait, and kill it after the grace period."""
        if self.process.poll() is None:
            self.process.send_signal(stop_signal)
            try:
                self.process.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                logger.error("%s (pid %d) did not stop; killing its group", self.name, self.pid)
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()
        self._kill_leftover_group()
        logger.info("stopped %s (pid %d, status %s)", self.name, self.pid, self.process.returncode)
        return self.process.returncode

    def _kill_leftover_group(self) -> None:
        # The child was a session leader, so its group id is its PID; grandchildren it
        # failed to stop are still in that group.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        logger.warning("killed processes left in the group of %s (pid %d)", self.name, self.pid)


def wait_until(
    ready, what: str, children: list[ChildProcess], timeout: float = START_TIMEOUT_SECONDS
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for child in children:
            child.check_alive()
        if time.monotonic() > deadline:
            raise StartError(f"{what} was not ready within {timeout:.0f} s")
        time.sleep(0.05)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def resident_kib(pid: int) -> int | None:
    """Return VmRSS of a process in KiB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def context_switches(pid: int) -> int | None:
    """Return the context switches of all live threads of a process, or None when it is gone.

    Voluntary switches (the thread waited, for a socket or a lock) and involuntary ones (the
    scheduler took the core away) are added up. Threads that ended are not counted.
    """
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            with open(task / "status") as status:
                for line in status:
                    if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def children_of(pid: int) -> list[tuple[int, str]]:
    """Return (pid, command line) of the direct children of a process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # The command name in field 2 may contain spaces, so fields are counted after ")".
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid:
            found.append((int(entry.name), cmdline.strip()))
    return found


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """Return the user plus system CPU time a process has used, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # After the command name: fields[11] is utime and fields[12] is stime, in clock ticks.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
