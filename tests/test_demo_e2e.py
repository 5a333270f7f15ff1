"""`make run`'s job, python -m ext_proc.demo: the banner it prints works as printed."""

import re
import socket
import subprocess
import sys

from gateway_harness import (
    REPO_ROOT,
    child_environment,
    free_port,
    read_lines_until,
    run_cli,
    stop_group,
)
from openai import OpenAI
from other_envoy import start_other_envoy, stop_other_envoy

from ext_proc.mock_provider import DEFAULT_ANSWER


def read_banner(process: subprocess.Popen, timeout: float = 90.0) -> str:
    lines, found = read_lines_until(process.stdout, lambda line: line.startswith("Traces:"), timeout)
    if not found:
        raise AssertionError("the demo printed no banner:\n" + "".join(lines))
    return "".join(lines)


def test_demo_banner_works_as_printed(tmp_path):
    home = tmp_path / "home"
    environment = child_environment(home, {
        "XENOVIA_PORT": str(free_port()),
        "XENOVIA_ADMIN_PORT": str(free_port()),
        "XENOVIA_MOCK_PORT": str(free_port()),
    })
    process = subprocess.Popen(
        [sys.executable, "-m", "ext_proc.demo"], env=environment, cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    try:
        banner = read_banner(process)
        base_url = re.search(r'base_url = "([^"]+)"', banner).group(1)
        api_key = re.search(r'api_key  = "([^"]+)"', banner).group(1)
        client = OpenAI(api_key=api_key, base_url=base_url, max_retries=0)

        answer = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}]
        )

        assert answer.choices[0].message.content == DEFAULT_ANSWER
        assert "MOCK provider" in banner
        assert f"traces list --home {home}" in banner
        proxies = run_cli(home, "proxy", "list", "--json").stdout
        assert '"provider": "openai"' in proxies
    finally:
        stop_group(process)


def test_demo_stops_when_admin_port_taken(tmp_path):
    """Another Envoy on the admin port: make run names the port and never prints the banner."""
    admin_port = free_port()
    other = start_other_envoy(tmp_path / "other", admin_port)
    environment = child_environment(tmp_path / "home", {
        "XENOVIA_PORT": str(free_port()),
        "XENOVIA_ADMIN_PORT": str(admin_port),
        "XENOVIA_MOCK_PORT": str(free_port()),
    })
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ext_proc.demo"], env=environment, cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=120,
        )
        other_alive = other.poll() is None
    finally:
        stop_other_envoy(other)

    assert result.returncode == 1
    assert "is running" not in result.stdout
    assert (f"Envoy admin port {admin_port} on 127.0.0.1 is in use by another process; "
            "choose another with --admin-port or XENOVIA_ADMIN_PORT") in result.stderr
    assert other_alive


def test_demo_stops_when_listener_port_taken(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        environment = child_environment(tmp_path / "home", {
            "XENOVIA_PORT": str(port),
            "XENOVIA_MOCK_PORT": str(free_port()),
        })
        environment.pop("XENOVIA_ADMIN_PORT", None)
        result = subprocess.run(
            [sys.executable, "-m", "ext_proc.demo"], env=environment, cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=120,
        )

    assert result.returncode == 1
    assert "is running" not in result.stdout
    assert (f"listener port {port} on 127.0.0.1 is in use by another process; "
            "choose another with --port or XENOVIA_PORT") in result.stderr


def test_demo_rejects_invalid_port_settings(tmp_path):
    port = str(free_port())
    for settings, message in (
        ({"XENOVIA_PORT": "abc"}, "XENOVIA_PORT must be a port number from 1 to 65535, got 'abc'"),
        ({"XENOVIA_MOCK_PORT": "99999"}, "XENOVIA_MOCK_PORT must be a port number"),
        ({"XENOVIA_PORT": port, "XENOVIA_MOCK_PORT": port}, "are both"),
    ):
        environment = child_environment(tmp_path / "home", settings)
        result = subprocess.run(
            [sys.executable, "-m", "ext_proc.demo"], env=environment, cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=60,
        )

        assert result.returncode == 1
        assert message in result.stderr
        assert "Traceback" not in result.stderr
