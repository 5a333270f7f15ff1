"""envoy/envoy.yaml with real Envoy: its reply to an oversized provider response, and its
marked parts copied into another Envoy configuration."""

import json
import re
import signal
import subprocess
import textwrap
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2 as httpx
import pytest
import yaml
from gateway_harness import free_port

from ext_proc.envoy_config import TEMPLATE_PATH, render_envoy_config
from ext_proc.supervisor import envoy_binary

MESSAGES = [{"role": "user", "content": "Say hello."}]
OVERSIZED_ANSWER_BYTES = 33 << 20
PART_START = re.compile(r"^\s*# --- (?P<name>.+?): copy into .* ---$")
PART_END = re.compile(r"^\s*# --- end of (?P<name>.+?) ---$")
EXT_PROC_DISABLED = {
    "envoy.filters.http.ext_proc": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
        "disabled": True,
    }
}


def marked_parts(text: str) -> dict[str, str]:
    """Return the text of each part between `--- NAME: copy into ... ---` and its end marker."""
    parts: dict[str, str] = {}
    name, lines = None, []
    for line in text.splitlines():
        if name is None:
            if match := PART_START.match(line):
                name, lines = match["name"], []
        elif match := PART_END.match(line):
            assert match["name"] == name, f"part {name!r} ends with {line.strip()!r}"
            parts[name] = textwrap.dedent("\n".join(lines))
            name = None
        else:
            lines.append(line)
    assert name is None, f"part {name!r} has no end marker"
    return parts


def rendered(ext_proc_endpoints, **values) -> str:
    return render_envoy_config(
        listen_port=values.pop("listen_port", free_port()),
        admin_port=values.pop("admin_port", free_port()),
        ext_proc_endpoints=ext_proc_endpoints,
        **values,
    )


def validate(config_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config_path)],
        capture_output=True, text=True, timeout=60,
    )


def test_rendered_config_validates(tmp_path):
    config = tmp_path / "envoy.yaml"
    config.write_text(rendered([tmp_path / "ext_proc.0.sock", ("127.0.0.1", 50051)]))

    result = validate(config)

    assert result.returncode == 0, result.stdout + result.stderr


def test_each_marked_part_stands_alone():
    parts = marked_parts(rendered([Path("/run/xenovia/ext_proc.0.sock")]))

    assert list(parts) == [
        "listener setting", "connection manager settings", "routes", "HTTP filters", "clusters",
    ]
    loaded = {name: yaml.safe_load(text) for name, text in parts.items()}
    assert set(loaded["listener setting"]) == {"per_connection_buffer_limit_bytes"}
    assert set(loaded["connection manager settings"]) == {
        "stream_idle_timeout", "request_timeout", "local_reply_config",
    }
    assert set(loaded["routes"]) == {"route_config"}
    assert set(loaded["HTTP filters"]) == {"http_filters"}
    assert set(loaded["clusters"]) == {"clusters"}
    # The DNS cache is repeated in the filter and both upstream clusters. Envoy rejects two
    # configurations under one cache name.
    caches = [loaded["HTTP filters"]["http_filters"][1]["typed_config"]["dns_cache_config"]]
    for cluster in loaded["clusters"]["clusters"][1:]:
        caches.append(cluster["cluster_type"]["typed_config"]["dns_cache_config"])
    assert len(caches) == 3 and all(cache == caches[0] for cache in caches)


def own_envoy_config(parts: dict[str, str], admin_port: int, port: int, disable_on_own_route: bool,
                     own_match: dict) -> dict:
    """Build someone else's Envoy configuration, with the marked parts pasted in (clusters
    first) and a route of its own on the same listener, before the gateway's when it
    matches a path and after them when it matches a prefix."""
    loaded = {name: yaml.safe_load(text) for name, text in parts.items()}
    route_config = loaded["routes"]["route_config"]
    own_route = {
        "match": own_match,
        "direct_response": {"status": 200, "body": {"inline_string": "own route"}},
    }
    if disable_on_own_route:
        own_route["typed_per_filter_config"] = EXT_PROC_DISABLED
    routes = route_config["virtual_hosts"][0]["routes"]
    routes.insert(0 if "path" in own_match else len(routes), own_route)
    connection_manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "own",
        **loaded["connection manager settings"],
        "route_config": route_config,
        **loaded["HTTP filters"],
    }
    listener = {
        "name": "own",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        **loaded["listener setting"],
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": connection_manager,
        }]}],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"clusters": loaded["clusters"]["clusters"], "listeners": [listener]},
    }


class RunningEnvoy:
    def __init__(self, config_path: Path, log_path: Path):
        self.config_path = config_path
        self.log_path = log_path
        self.admin_url = "http://127.0.0.1:{}".format(
            yaml.safe_load(config_path.read_text())["admin"]["address"]["socket_address"]["port_value"]
        )
        self.process = None

    def __enter__(self):
        result = validate(self.config_path)
        assert result.returncode == 0, result.stdout + result.stderr
        self.process = subprocess.Popen(
            [envoy_binary(), "-c", str(self.config_path), "--disable-hot-restart",
             "--log-level", "warn"],
            stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()
            try:
                if httpx.get(self.admin_url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"Envoy did not start:\n{self.log_path.read_text()}")

    def __exit__(self, *exc):
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class OwnEnvoy(RunningEnvoy):
    """Someone else's Envoy with the gateway's marked parts pasted in."""

    def __init__(self, tmp_path: Path, worker_sockets: list[Path], disable_on_own_route: bool,
                 own_match: dict | None = None):
        self.port = free_port()
        parts = marked_parts(rendered(worker_sockets))
        config_path = tmp_path / f"own-envoy-{disable_on_own_route}.yaml"
        config_path.write_text(json.dumps(own_envoy_config(
            parts, free_port(), self.port, disable_on_own_route, own_match or {"path": "/status"}
        ), indent=1))
        super().__init__(config_path, tmp_path / f"own-envoy-{disable_on_own_route}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def worker_sockets(gateway) -> list[Path]:
    sockets = sorted((gateway.home / "run").glob("ext_proc.*.sock"))
    assert sockets, "the gateway's workers listen on no Unix socket"
    return sockets


def chat(url: str, access) -> httpx.Response:
    return httpx.post(
        f"{url}/a/{access.proxy_id}/openai/v1/chat/completions",
        headers={"authorization": f"Bearer {access.key}"},
        json={"model": "gpt-4o-mini", "messages": MESSAGES}, timeout=30,
    )


def test_copied_parts_serve_both_routes(gateway, tmp_path):
    access = gateway.new_proxy("own-envoy")

    with OwnEnvoy(tmp_path, worker_sockets(gateway), disable_on_own_route=True) as envoy:
        governed = chat(envoy.url, access)
        own = httpx.get(envoy.url + "/status", timeout=10)
        unknown_key = chat(envoy.url, type(access)(access.proxy_id, "xe_unknown", ""))

    assert governed.status_code == 200, governed.text
    assert governed.json()["choices"][0]["message"]["content"]
    assert uuid.UUID(governed.headers["x-xenovia-trace-id"])
    assert gateway.provider.requests[-1]["path"].endswith("/chat/completions")
    assert (own.status_code, own.text) == (200, "own route")
    assert "x-xenovia-trace-id" not in own.headers
    assert unknown_key.status_code == 401


def test_own_route_needs_ext_proc_disabled(gateway, tmp_path):
    with OwnEnvoy(tmp_path, worker_sockets(gateway), disable_on_own_route=False) as envoy:
        own = httpx.get(envoy.url + "/status", timeout=10)

    # The service rejects the path, which is not one of its endpoints, so the route's own
    # response is never sent.
    assert own.status_code != 200
    assert own.text != "own route"
    assert "x-xenovia-trace-id" in own.headers



def test_own_catch_all_route_takes_gateway_calls(gateway, tmp_path):
    """Envoy picks the route, and with it the per-route ext_proc setting, from the request
    as the client sent it. The gateway's routes need the header the service sets, so
    another route matching the call's path takes it even when listed after them."""
    access = gateway.new_proxy("catch-all")

    with OwnEnvoy(tmp_path, worker_sockets(gateway), disable_on_own_route=True,
                  own_match={"prefix": "/"}) as envoy:
        response = chat(envoy.url, access)

    assert (response.status_code, response.text) == (200, "own route")
    assert "x-xenovia-trace-id" not in response.headers


class _OversizedProvider(BaseHTTPRequestHandler):
    body = json.dumps({
        "id": "chatcmpl-oversized", "object": "chat.completion", "created": 0,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "x" * OVERSIZED_ANSWER_BYTES}}],
    }).encode()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def oversized_provider():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OversizedProvider)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_oversized_answer_gets_openai_error(gateway, oversized_provider):
    access = gateway.new_proxy("oversized", upstream_url=oversized_provider)
    session_id = str(uuid.uuid4())

    response = httpx.post(
        access.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {access.key}", "x-xenovia-session-id": session_id},
        json={"model": "gpt-4o-mini", "messages": MESSAGES}, timeout=60,
    )

    assert response.status_code == 500, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["message"] == "the provider's answer is larger than the gateway's limit of 32 MiB"
    assert error["code"] == "gateway_error"
    assert error["request_id"] == response.headers["x-xenovia-trace-id"]
    assert uuid.UUID(response.headers["x-xenovia-trace-id"])
    assert response.headers["x-xenovia-session-id"] == session_id


def test_parts_share_no_anchors():
    text = TEMPLATE_PATH.read_text()
    for name, part in marked_parts(text).items():
        defined = set(re.findall(r"&(\w+)", part))
        used = set(re.findall(r"\*(\w+)", part))
        assert used <= defined, f"part {name!r} uses anchors defined elsewhere: {used - defined}"



@pytest.mark.parametrize("session_id", [None, str(uuid.uuid4())])
def test_envoy_reply_names_one_session(tmp_path, session_id):
    """The service is unreachable, so Envoy replies 503 itself."""
    port = free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(rendered([tmp_path / "absent.sock"], listen_port=port))
    headers = {"authorization": "Bearer xe_unchecked"}
    if session_id:
        headers["x-xenovia-session-id"] = session_id

    with RunningEnvoy(config, tmp_path / "envoy.log"):
        response = httpx.post(f"http://127.0.0.1:{port}/a/prx_absent/openai/v1/chat/completions",
                              headers=headers, json={"model": "gpt-4o-mini", "messages": MESSAGES},
                              timeout=30)

    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "gateway_error"
    assert response.json()["error"]["message"] == (
        "the gateway's policy service is unavailable or did not answer in time; try again shortly"
    )
    sessions = response.headers.get_list("x-xenovia-session-id")
    assert len(sessions) == 1, sessions
    assert "," not in sessions[0], sessions
    assert uuid.UUID(sessions[0])
    if session_id:
        assert sessions[0] == session_id
    assert response.headers.get("x-request-id") == response.json()["error"]["request_id"]
