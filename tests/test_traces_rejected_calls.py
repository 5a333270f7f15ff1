"""Calls the gateway rejects before admitting them to a session, as `xenovia traces` lists them."""

import json
import urllib.error
import urllib.request

from conftest import wait_for_trace

BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello."}]}
).encode()


def post_chat(base_url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(
        f"{base_url}/chat/completions",
        data=BODY,
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        error.read()
        return error.code, dict(error.headers)


def json_rows(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_rejected_calls_left_out_of_sessions(gateway):
    access = gateway.new_proxy("rejected-calls")
    bearer = {"Authorization": f"Bearer {access.key}"}
    admitted_status, admitted_headers = post_chat(access.base_url, bearer)
    rejected = [
        post_chat(access.base_url, {}),
        post_chat(access.base_url, {"Authorization": "Bearer xen-not-a-key"}),
        post_chat(access.base_url, {**bearer, "X-Xenovia-Session-Id": "not-a-uuid"}),
    ]
    assert admitted_status == 200
    assert [status for status, _ in rejected] == [401, 401, 400]
    for _, headers in [*rejected, (admitted_status, admitted_headers)]:
        wait_for_trace(gateway.home, headers["x-xenovia-trace-id"])
    admitted_session = admitted_headers["x-xenovia-session-id"]

    listed = json_rows(gateway.cli("traces", "list", "--proxy", access.proxy_id, "--json").stdout)
    sessions = json_rows(
        gateway.cli("traces", "sessions", "--proxy", access.proxy_id, "--json").stdout
    )
    stats = json.loads(gateway.cli("traces", "stats", "--proxy", access.proxy_id, "--json").stdout)

    assert sorted(row["status"] for row in listed) == [200, 400, 401, 401]
    assert [row["session_turn"] for row in listed if row["status"] != 200] == [0, 0, 0]
    assert [row["session_id"] for row in sessions] == [admitted_session]
    assert sessions[0]["turns"] == 1
    assert [row["session_id"] for row in stats["cost_by_session"]] == [admitted_session]
