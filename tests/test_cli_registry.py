"""Registry edits through the real CLI and gateway: proxy delete and rename, parallel edits, health."""

import concurrent.futures
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from conftest import wait_for_trace
from gateway_harness import child_environment, run_cli
from openai import OpenAI

from ext_proc import home as home_paths
from ext_proc.registry import RegistryEditor, RegistryError, load_registry, registry_version

REPO = Path(__file__).resolve().parent.parent
SEED_POLICY = REPO / "policies" / "block_dangerous_tools.rego"
RESPONSE_POLICY = REPO / "policies" / "response_block_drop_table.rego"
MESSAGES = [{"role": "user", "content": "Say hello."}]
ANSWER = "Hello from the Xenovia mock provider."


def chat(key: str, base_url: str):
    client = OpenAI(api_key=key, base_url=base_url, max_retries=0)
    return client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)


def keys_document(home: Path) -> dict:
    return json.loads(home_paths.keys_file(home).read_text())["keys"]


def proxies_document(home: Path) -> dict:
    return json.loads(home_paths.proxies_file(home).read_text())["proxies"]


def key_id_for(gateway, proxy_id: str) -> str:
    result = gateway.cli("key", "list", "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return next(row["id"] for row in rows if row["proxies"] == [proxy_id])


def test_deleted_proxy_rejects_old_key(gateway):
    doomed = gateway.new_proxy("doomed")
    kept = gateway.new_proxy("kept")
    assert gateway.attach(doomed.proxy_id, "request", SEED_POLICY).returncode == 0
    assert gateway.attach(doomed.proxy_id, "response", RESPONSE_POLICY).returncode == 0
    assert gateway.attach(kept.proxy_id, "request", SEED_POLICY).returncode == 0
    shared_key = gateway.change_registry(
        "key", "create", "--proxy", doomed.proxy_id, "--proxy", kept.proxy_id
    ).stdout.strip()
    before = chat(doomed.key, doomed.base_url)
    assert before.parse().choices[0].message.content == ANSWER
    trace_id = before.headers["x-xenovia-trace-id"]
    wait_for_trace(gateway.home, trace_id)

    result = gateway.change_registry("proxy", "delete", doomed.proxy_id)

    assert result.stdout == ""
    assert f"deleted proxy {doomed.proxy_id} and 2 policy files" in result.stderr
    for key in (doomed.key, shared_key):
        with pytest.raises(openai.PermissionDeniedError) as raised:
            chat(key, doomed.base_url)
        error = raised.value.response.json()["error"]
        assert raised.value.status_code == 403
        assert error["code"] == "proxy_access_denied"
        assert error["request_id"] == raised.value.response.headers["x-xenovia-trace-id"]
    assert chat(shared_key, kept.base_url).parse().choices[0].message.content == ANSWER
    assert chat(kept.key, kept.base_url).parse().choices[0].message.content == ANSWER
    assert "registry reload failed" not in gateway.log_tail(400)
    stored = gateway.traces("--proxy", doomed.proxy_id, "--limit", "100")
    assert trace_id in [row["trace_id"] for row in stored]


def test_call_in_flight_keeps_its_policies(gateway):
    doomed = gateway.new_proxy("in-flight")
    assert gateway.attach(doomed.proxy_id, "response", RESPONSE_POLICY).returncode == 0
    client = OpenAI(api_key=doomed.key, base_url=doomed.base_url, max_retries=0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # The provider replies after 3 s, and the proxy is deleted while the call waits.
        call = pool.submit(
            client.chat.completions.with_raw_response.create,
            model="gpt-4o-mini",
            messages=MESSAGES,
            extra_headers={"x-mock-delay-ms": "3000"},
        )
        time.sleep(0.5)
        gateway.change_registry("proxy", "delete", doomed.proxy_id)
        assert not call.done()
        response = call.result(timeout=30)

    assert response.parse().choices[0].message.content == ANSWER
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["status"] == 200
    assert trace["policy_outcome"] == "allow"
    assert "does not compile" not in gateway.log_tail(200)


def test_policy_file_edited_in_place_enforced(gateway, tmp_path):
    access = gateway.new_proxy("edited-in-place")
    allowing = tmp_path / "gate.rego"
    allowing.write_text("package xenovia.policy\n\ndeny := false\n")
    assert gateway.attach(access.proxy_id, "request", allowing).returncode == 0
    assert chat(access.key, access.base_url).parse().choices[0].message.content == ANSWER
    policy_file = home_paths.policy_file(gateway.home, access.proxy_id, "request", "gate")
    original = policy_file.read_text()

    # As a ConfigMap update would: the file changes, proxies.json does not.
    home_paths.write_atomically(policy_file, original.replace("deny := false", "deny := true").encode())
    gateway.wait_for_reload()

    for _ in range(4):
        with pytest.raises(openai.PermissionDeniedError):
            chat(access.key, access.base_url)
    home_paths.write_atomically(policy_file, original.encode())
    gateway.wait_for_reload()
    for _ in range(4):
        assert chat(access.key, access.base_url).parse().choices[0].message.content == ANSWER


def test_key_create_prints_id_first(gateway):
    proxy_id = gateway.new_proxy("closed-pipe").proxy_id
    command = [sys.executable, "-m", "ext_proc.cli", "key", "create", "--proxy", proxy_id]

    # The reader of stdout is gone before the key is printed, so the key cannot be shown:
    # its id must be, for `key revoke`.
    closed = subprocess.run(
        f"{shlex.join(command)} | true", shell=True, env=child_environment(gateway.home),
        stderr=subprocess.PIPE, text=True, timeout=60, check=False,
    )

    assert "created key key_" in closed.stderr


def test_delete_removes_files_and_key_scopes(gateway):
    doomed = gateway.new_proxy("doomed-files")
    kept = gateway.new_proxy("kept-files")
    assert gateway.attach(doomed.proxy_id, "request", SEED_POLICY).returncode == 0
    assert gateway.attach(kept.proxy_id, "request", SEED_POLICY).returncode == 0
    gateway.change_registry("key", "create", "--proxy", doomed.proxy_id, "--proxy", kept.proxy_id)
    kept_policy = home_paths.policy_file(gateway.home, kept.proxy_id, "request", SEED_POLICY.stem)
    kept_entry = proxies_document(gateway.home)[kept.proxy_id]

    gateway.change_registry("proxy", "delete", doomed.proxy_id)

    leftover = list((gateway.home / "config").glob(f"policy.{doomed.proxy_id}.*"))
    assert leftover == []
    proxies = proxies_document(gateway.home)
    assert doomed.proxy_id not in proxies
    assert proxies[kept.proxy_id] == kept_entry
    assert kept_policy.read_text() == SEED_POLICY.read_text()
    keys = keys_document(gateway.home)
    assert all(doomed.proxy_id not in entry["proxies"] for entry in keys.values())
    assert any(entry["proxies"] == [kept.proxy_id] for entry in keys.values())
    assert home_paths.keys_file(gateway.home).stat().st_mode & 0o777 == 0o600
    listed = gateway.cli("policy", "list", "--proxy", doomed.proxy_id, "--json", check=False)
    assert listed.returncode == 2
    assert listed.stdout == ""


def test_delete_reports_key_left_without_proxy(gateway):
    doomed = gateway.new_proxy("doomed-key")
    key_id = key_id_for(gateway, doomed.proxy_id)

    result = gateway.change_registry("proxy", "delete", doomed.proxy_id)

    assert f"key {key_id} is now scoped to no proxy and can call nothing" in result.stderr
    assert keys_document(gateway.home)[key_id]["proxies"] == []
    listing = gateway.cli("key", "list").stdout
    row = next(line for line in listing.splitlines() if line.startswith(key_id))
    assert row.split()[-1] == "-"


def test_delete_unknown_proxy_rejected(gateway):
    gateway.new_proxy("bystander")
    proxies_before = home_paths.proxies_file(gateway.home).read_bytes()
    keys_before = home_paths.keys_file(gateway.home).read_bytes()

    result = gateway.cli("proxy", "delete", "prx_0000000000000000", check=False)

    assert result.returncode == 2
    assert "proxy 'prx_0000000000000000' not found" in result.stderr
    assert "xenovia proxy list" in result.stderr
    assert home_paths.proxies_file(gateway.home).read_bytes() == proxies_before
    assert home_paths.keys_file(gateway.home).read_bytes() == keys_before


def test_delete_twice_rejected(gateway):
    doomed = gateway.new_proxy("doomed-twice")
    gateway.change_registry("proxy", "delete", doomed.proxy_id)

    result = gateway.cli("proxy", "delete", doomed.proxy_id, check=False)

    assert result.returncode == 2
    assert f"proxy {doomed.proxy_id!r} not found" in result.stderr


def test_update_renames_proxy(gateway):
    access = gateway.new_proxy("before")

    gateway.change_registry("proxy", "update", access.proxy_id, "--name", "after")

    rows = [json.loads(line) for line in gateway.cli("proxy", "list", "--json").stdout.splitlines()]
    entry = next(row for row in rows if row["id"] == access.proxy_id)
    assert entry["name"] == "after"
    assert entry["upstream_url"] == gateway.provider.base_url
    assert chat(access.key, access.base_url).parse().choices[0].message.content == ANSWER


def test_update_empty_name_rejected(gateway):
    access = gateway.new_proxy("named")

    result = gateway.cli("proxy", "update", access.proxy_id, "--name", "  ", check=False)

    assert result.returncode == 2
    assert "proxy name must not be empty" in result.stderr
    assert proxies_document(gateway.home)[access.proxy_id]["name"] == "named"


def test_delete_leaves_loadable_registry_after_each_write(tmp_path, monkeypatch):
    editor = RegistryEditor(tmp_path)
    doomed = editor.create_proxy(name="doomed", upstream_url="http://127.0.0.1:9/v1")
    kept = editor.create_proxy(name="kept", upstream_url="http://127.0.0.1:9/v1")
    source = SEED_POLICY.read_text()
    editor.attach_policy(doomed, "request", "seed", source, "0" * 64, dry_run=False)
    editor.create_key([doomed, kept], "a" * 64)
    snapshots = []
    write_json = home_paths.write_json

    def write_and_load(path, document, mode=0o644):
        write_json(path, document, mode)
        snapshots.append(load_registry(tmp_path))

    monkeypatch.setattr(home_paths, "write_json", write_and_load)

    editor.delete_proxy(doomed)

    assert len(snapshots) == 2
    for registry in snapshots:
        for key in registry.keys_by_hash.values():
            assert doomed not in key.proxy_ids
    assert doomed not in snapshots[-1].proxies
    assert kept in snapshots[-1].proxies
    assert load_registry(tmp_path).policy_sources == {}


def test_delete_help_says_traces_stay(tmp_path):
    result = run_cli(tmp_path, "proxy", "delete", "--help")

    assert "Traces already stored" in result.stdout


def _create_proxy_in_child(home: str, index: int) -> str:
    return RegistryEditor(Path(home)).create_proxy(
        name=f"parallel-{index}", upstream_url="http://127.0.0.1:9/v1"
    )


def test_parallel_edits_keep_every_change(tmp_path):
    # Each process reads proxies.json, adds one entry and writes the file back. Without
    # the registry lock, a process that writes back an older copy drops the others' proxies.
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(8) as pool:
        created = pool.starmap(_create_proxy_in_child, [(str(tmp_path), i) for i in range(24)])

    assert sorted(proxies_document(tmp_path)) == sorted(created)
    assert len(load_registry(tmp_path).proxies) == 24


def _health(gateway) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{gateway.url}/healthz", timeout=5) as response:
        return json.loads(response.read())


def _wait_for_health(gateway, predicate, timeout: float = 10.0) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while True:
        health = _health(gateway)
        if predicate(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def test_health_reports_registry_that_fails_to_load(gateway):
    gateway.new_proxy("health-check")
    proxies = home_paths.proxies_file(gateway.home)
    good = proxies.read_bytes()
    try:
        home_paths.write_atomically(proxies, b"{not json")

        broken = _wait_for_health(gateway, lambda health: "registry_error" in health)

        assert broken["status"] == "degraded"
        assert "proxies.json" in broken["registry_error"]
    finally:
        home_paths.write_atomically(proxies, good)
    restored = _wait_for_health(gateway, lambda health: "registry_error" not in health)
    assert "registry_error" not in restored
    assert restored["status"] == "ok"


def test_health_reports_policy_that_fails_to_compile(gateway, tmp_path):
    access = gateway.new_proxy("health-policy")
    gate = tmp_path / "gate.rego"
    gate.write_text("package xenovia.policy\n\ndeny := false\n")
    assert gateway.attach(access.proxy_id, "request", gate).returncode == 0
    policy_file = home_paths.policy_file(gateway.home, access.proxy_id, "request", "gate")
    good = policy_file.read_bytes()
    try:
        home_paths.write_atomically(policy_file, b"package xenovia.policy\n\ndeny := {\n")

        # No call has reached the proxy since the edit: the health check alone must tell.
        broken = _wait_for_health(gateway, lambda health: "policy_errors" in health)

        assert broken["status"] == "degraded"
        [error] = broken["policy_errors"]
        assert error["proxy_id"] == access.proxy_id
        assert error["stage"] == "request"
        assert error["policy"] == "gate"
        assert "does not compile" in error["error"]
    finally:
        home_paths.write_atomically(policy_file, good)
    restored = _wait_for_health(gateway, lambda health: "policy_errors" not in health)
    assert restored["status"] == "ok"


def test_lock_that_is_not_a_file_rejected(tmp_path):
    (tmp_path / ".registry.lock").mkdir()

    with pytest.raises(RegistryError, match="registry lock"):
        RegistryEditor(tmp_path).create_proxy(name="x", upstream_url="http://127.0.0.1:9/v1")


def _proxy_list_stages(gateway, proxy_id: str) -> str:
    listing = gateway.cli("proxy", "list").stdout
    header, *rows = listing.splitlines()
    row = next(line for line in rows if line.startswith(proxy_id))
    return row[header.index("POLICIES"):].split()[0]


def test_detach_last_policy_removes_stage(gateway):
    access = gateway.new_proxy("detach-stage")
    assert gateway.attach(access.proxy_id, "request", SEED_POLICY).returncode == 0
    assert gateway.attach(access.proxy_id, "response", RESPONSE_POLICY).returncode == 0
    assert _proxy_list_stages(gateway, access.proxy_id) == "request,response"

    gateway.change_registry(
        "policy", "detach", "--proxy", access.proxy_id, "--stage", "response"
    )

    assert proxies_document(gateway.home)[access.proxy_id]["policies"].keys() == {"request"}
    assert _proxy_list_stages(gateway, access.proxy_id) == "request"
    listed = gateway.cli("policy", "list", "--proxy", access.proxy_id, "--json").stdout
    assert [json.loads(line)["stage"] for line in listed.splitlines()] == ["request"]
    assert chat(access.key, access.base_url).parse().choices[0].message.content == ANSWER

    gateway.change_registry("policy", "detach", "--proxy", access.proxy_id, "--stage", "request")

    assert proxies_document(gateway.home)[access.proxy_id]["policies"] == {}
    assert _proxy_list_stages(gateway, access.proxy_id) == "-"
    assert chat(access.key, access.base_url).parse().choices[0].message.content == ANSWER
    assert gateway.registry_version() == registry_version(gateway.home)


def test_empty_stage_in_registry_ignored(tmp_path):
    proxy_id = run_cli(
        tmp_path, "proxy", "create", "--name", "old", "--upstream-url", "http://127.0.0.1:9/v1"
    ).stdout.strip()
    path = home_paths.proxies_file(tmp_path)
    document = json.loads(path.read_text())
    document["proxies"][proxy_id]["policies"] = {"request": [], "response": []}
    path.write_text(json.dumps(document))

    listing = run_cli(tmp_path, "proxy", "list").stdout

    assert load_registry(tmp_path).proxies[proxy_id].policies == {}
    assert listing.splitlines()[1].split()[4] == "-"


def test_attach_unreadable_file_prints_error_line(tmp_path):
    missing = tmp_path / "nonexistent.rego"

    result = run_cli(
        tmp_path, "policy", "attach", "--proxy", "prx_none", "--stage", "request", str(missing),
        check=False,
    )

    assert result.returncode == 2
    assert result.stderr == (
        f"error: policy not attached, cannot read {missing}: "
        f"[Errno 2] No such file or directory: '{missing}'\n"
    )


def _create_offline_proxy(home: Path, *options: str) -> str:
    return run_cli(
        home, "proxy", "create", "--name", "offline", "--upstream-url", "http://127.0.0.1:9/v1",
        *options,
    ).stdout.strip()


def test_update_prints_what_changed(tmp_path):
    from ext_proc.registry import DEFAULT_BODY_LIMIT

    proxy_id = _create_offline_proxy(tmp_path)

    result = run_cli(tmp_path, "proxy", "update", proxy_id, "--stream-policy-mode", "live",
                     "--body-limit", "2048", "--upstream-key-env", "PROVIDER_KEY")

    assert result.stdout == ""
    assert result.stderr == (
        f"updated proxy {proxy_id}: upstream_key_env unset -> 'PROVIDER_KEY', "
        f"stream_policy_mode 'hold' -> 'live', body_limit {DEFAULT_BODY_LIMIT} -> 2048\n"
    )
    assert proxies_document(tmp_path)[proxy_id]["stream_policy_mode"] == "live"


def test_update_names_unchanged_value(tmp_path):
    proxy_id = _create_offline_proxy(tmp_path, "--body-mode", "metadata")

    result = run_cli(tmp_path, "proxy", "update", proxy_id, "--body-mode", "metadata",
                     "--name", "renamed")

    assert result.stderr == (
        f"updated proxy {proxy_id}: name 'offline' -> 'renamed', body_mode 'metadata' (unchanged)\n"
    )


def test_update_without_options_rejected(tmp_path):
    proxy_id = _create_offline_proxy(tmp_path)
    before = home_paths.proxies_file(tmp_path).read_bytes()

    result = run_cli(tmp_path, "proxy", "update", proxy_id, check=False)

    assert result.returncode == 2
    assert result.stderr.startswith("error: nothing to update; pass an option")
    assert home_paths.proxies_file(tmp_path).read_bytes() == before


def test_policy_list_unknown_proxy_rejected(tmp_path):
    proxy_id = _create_offline_proxy(tmp_path)
    run_cli(tmp_path, "policy", "attach", "--proxy", proxy_id, "--stage", "request", str(SEED_POLICY))

    result = run_cli(tmp_path, "policy", "list", "--proxy", "prx_0000000000000000", check=False)
    known = run_cli(tmp_path, "policy", "list", "--proxy", proxy_id, "--json")

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "error: proxy 'prx_0000000000000000' not found; see `xenovia proxy list`\n"
    assert [json.loads(line)["name"] for line in known.stdout.splitlines()] == ["block_dangerous_tools"]
