"""Run wrk against one URL and return its numbers."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_post.lua"
RESULT_MARKER = "BENCH_JSON "


class LoadError(RuntimeError):
    """wrk failed or printed no result."""


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    http_errors: int
    socket_errors: int
    timeouts: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def failures(self) -> int:
        return self.http_errors + self.socket_errors + self.timeouts


@dataclass(frozen=True)
class Request:
    """One POST that a load run repeats: URL, body file and headers."""

    url: str
    body_file: Path
    headers: dict[str, str]


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise LoadError("wrk not found; `make system-deps` installs it (Debian package wrk)")
    return found


def run_wrk(request: Request, connections: int, seconds: float) -> LoadResult:
    """Run wrk with one thread and ``connections`` keep-alive connections for ``seconds``."""
    environment = dict(os.environ)
    environment["BENCH_BODY_FILE"] = str(request.body_file)
    environment["BENCH_HEADERS"] = "\n".join(f"{k}: {v}" for k, v in request.headers.items())
    # One wrk thread is enough for 8 connections and leaves more CPU to the system under test.
    command = [
        wrk_binary(),
        "--threads",
        "1",
        "--connections",
        str(connections),
        "--duration",
        f"{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "--latency",
        "--script",
        str(WRK_SCRIPT),
        request.url,
    ]
    completed = subprocess.run(
        command, check=False, env=environment, capture_output=True, text=True, timeout=seconds + 60
    )
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return _parse(json.loads(line[len(RESULT_MARKER) :]))
    raise LoadError(
        f"wrk exited with {completed.returncode} and printed no result:\n"
        f"{completed.stdout[-2000:]}\n{completed.stderr[-2000:]}"
    )


def _parse(values: dict) -> LoadResult:
    return LoadResult(
        requests=values["requests"],
        seconds=values["duration_us"] / 1e6,
        http_errors=values["http_errors"],
        socket_errors=values["socket_errors"],
        timeouts=values["timeouts"],
        p50_ms=values["p50_us"] / 1000,
        p90_ms=values["p90_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        mean_ms=values["mean_us"] / 1000,
    )
