"""The package as the Docker image installs it (deploy/Dockerfile), and the Kubernetes sidecar
manifest (deploy/kubernetes/xenovia-sidecar.yaml)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from gateway_harness import free_port, stop_group

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "deploy" / "Dockerfile"
SIDECAR = REPO / "deploy" / "kubernetes" / "xenovia-sidecar.yaml"
GENERATED = shutil.ignore_patterns("__pycache__", "*_pb2.py", "*_pb2_grpc.py", "*_pb2.pyi")
# Resident memory in MB of the processes `xenovia up` starts, measured with the embedded
# trace store.
COLLECTOR_MB, WORKER_MB, ENVOY_MB = 520, 66, 78


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def install_like_the_image(context: Path, site: Path) -> None:
    """Copy what the Dockerfile copies, then run its RUN steps with pip --target.

    Dependencies come from this virtual environment rather than from the index, so the
    step that installs them (`pip install '.[build]'`) is only checked, not run.
    """
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY":
            *sources, destination = shlex.split(rest)
            for source in sources:
                target = context / destination / (Path(source).name if destination.endswith("/") else "")
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, target, ignore=GENERATED)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(REPO / source, target)
        elif keyword == "RUN":
            for step in rest.split("&&"):
                words = shlex.split(step)
                if words[:2] == ["pip", "install"] and "--no-deps" not in words:
                    assert words[-1] == ".[build]", step
                elif words[:2] == ["pip", "install"]:
                    assert words[-1] == ".", step
                    subprocess.run(
                        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                         "--no-build-isolation", "--no-index", "--target", str(site), "."],
                        cwd=context, check=True, capture_output=True, timeout=300,
                    )
                else:
                    assert words[0] == "python", step
                    subprocess.run([sys.executable, *words[1:]], cwd=context, check=True,
                                   capture_output=True, timeout=120)


def installed_environment(site: Path, home: Path) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("RUST_BACKTRACE", "PYTHONPATH")}
    environment["PYTHONPATH"] = str(site)
    environment["XENOVIA_HOME"] = str(home)
    environment["XENOVIA_TEST_PROVIDER_KEY"] = "sk-provider-test-credential"
    return environment


class Installed:
    def __init__(self, root: Path):
        self.root = root
        self.site = root / "site"
        self.home = root / "home"
        self.environment = installed_environment(self.site, self.home)

    def xenovia(self, *args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(self.site / "bin" / "xenovia"), *args], env=self.environment, cwd=self.root,
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("installed")
    install_like_the_image(root / "context", root / "site")
    return Installed(root)


@pytest.fixture(scope="module")
def running(installed):
    port, admin_port = free_port(), free_port()
    log = (installed.root / "up.log").open("ab")
    process = subprocess.Popen(
        [str(installed.site / "bin" / "xenovia"), "up", "--listen", "127.0.0.1",
         "--port", str(port), "--admin-port", str(admin_port)],
        env=installed.environment, cwd=installed.root, stdout=log, stderr=log,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    try:
        while True:
            assert process.poll() is None, (installed.root / "up.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()
                break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, (installed.root / "up.log").read_text()[-4000:]
                time.sleep(0.2)
        yield port
    finally:
        stop_group(process)


def test_installed_package_carries_envoy_config(installed):
    assert (installed.site / "ext_proc" / "envoy" / "envoy.yaml").read_bytes() == (
        REPO / "envoy" / "envoy.yaml"
    ).read_bytes()
    result = subprocess.run(
        [sys.executable, "-c", "import ext_proc.envoy_config as c; print(c.TEMPLATE_PATH)"],
        env=installed.environment, cwd=installed.root, capture_output=True, text=True, check=True,
    )
    assert Path(result.stdout.strip()) == installed.site / "ext_proc" / "envoy" / "envoy.yaml"


def test_pyproject_lists_every_package():
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    folders = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "ext_proc").rglob("__init__.py")
    }
    assert set(listed) == folders | {"ext_proc.envoy"}


def test_installed_gateway_serves_call(installed, running, provider):
    proxy_id = installed.xenovia(
        "proxy", "create", "--name", "installed", "--upstream-url", provider.base_url,
        "--upstream-key-env", "XENOVIA_TEST_PROVIDER_KEY",
    ).stdout.strip()
    key = installed.xenovia("key", "create", "--proxy", proxy_id).stdout.strip()
    request = urllib.request.Request(
        f"http://127.0.0.1:{running}/a/{proxy_id}/openai/v1/chat/completions",
        data=json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}).encode(),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    deadline = time.monotonic() + 10
    while True:  # the workers pick up the new proxy within a second
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = json.loads(response.read())
            break
        except urllib.error.HTTPError as error:
            if error.code not in (401, 403, 404) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert answer["choices"][0]["message"]["content"]


def sidecar_container() -> dict:
    documents = [doc for doc in yaml.safe_load_all(SIDECAR.read_text()) if doc]
    deployment = next(doc for doc in documents if doc["kind"] == "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(container for container in containers if container["name"] == "xenovia")


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_sidecar_probes_use_loopback():
    container = sidecar_container()
    args = container["args"]
    assert option(args, "--listen") == "127.0.0.1"
    probes = [container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")]
    for probe in probes:
        # httpGet and tcpSocket probes go to the pod's IP, where nothing listens.
        assert set(probe) & {"httpGet", "tcpSocket", "grpc"} == set()
        command = probe["exec"]["command"]
        assert f"http://127.0.0.1:{option(args, '--port')}/healthz" in " ".join(command)
        assert probe["timeoutSeconds"] >= 3


def probe_command(port: int) -> list[str]:
    command = sidecar_container()["readinessProbe"]["exec"]["command"]
    assert command[0] == "python"
    return [sys.executable, *(part.replace(":8080/", f":{port}/") for part in command[1:])]


def test_sidecar_probe_passes_on_gateway(running):
    assert subprocess.run(probe_command(running), timeout=10).returncode == 0


def test_sidecar_probe_fails_without_listener():
    result = subprocess.run(probe_command(free_port()), capture_output=True, timeout=10)
    assert result.returncode != 0


def test_sidecar_manifest_names_what_to_create():
    text = SIDECAR.read_text()
    container = sidecar_container()
    environment = {entry["name"]: entry for entry in container["env"]}
    assert "OPENAI_API_KEY_UPSTREAM" in environment
    assert re.search(r"proxy create .*\n?.*--upstream-key-env OPENAI_API_KEY_UPSTREAM", text)
    deployment_spec = next(
        doc for doc in yaml.safe_load_all(text) if doc and doc["kind"] == "Deployment"
    )["spec"]["template"]["spec"]
    secrets, config_maps = set(), set()
    for other in deployment_spec["containers"]:
        for entry in other.get("env", []):
            reference = entry.get("valueFrom", {}).get("secretKeyRef")
            if reference:
                secrets.add(reference["name"])
    for volume in deployment_spec["volumes"]:
        if "secret" in volume:
            secrets.add(volume["secret"]["secretName"])
        if "configMap" in volume:
            config_maps.add(volume["configMap"]["name"])
    for name in secrets:
        assert re.search(rf"kubectl create secret generic {name} ", text), name
    for name in config_maps:
        assert re.search(rf"kubectl create configmap {name} ", text), name


def mebibytes(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", quantity).groups()
    return float(number) * units[unit]


def test_sidecar_memory_covers_measured_use():
    container = sidecar_container()
    workers = int(option(container["args"], "--workers"))
    measured = (COLLECTOR_MB + WORKER_MB * workers + ENVOY_MB) * 1e6 / 2**20
    resources = container["resources"]
    assert mebibytes(resources["requests"]["memory"]) >= measured
    assert mebibytes(resources["limits"]["memory"]) >= measured * 1.5
