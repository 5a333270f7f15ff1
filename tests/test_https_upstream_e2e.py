"""A provider behind TLS: Envoy verifies its certificate against XENOVIA_UPSTREAM_CA_FILE."""

import ssl
import subprocess

import pytest
from conftest import PROVIDER_KEY
from gateway_harness import RunningGateway, run_cli
from openai import OpenAI

from ext_proc.mock_provider import run_in_thread


def self_signed_certificate(folder) -> tuple[str, str]:
    certificate, key = folder / "provider.crt", folder / "provider.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(certificate)],
        check=True, capture_output=True,
    )
    return str(certificate), str(key)


@pytest.fixture(scope="module")
def tls_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    certificate, key = self_signed_certificate(folder)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, key)
    with run_in_thread(tls=context) as provider:
        home = folder / "home"
        running = RunningGateway(home, {"XENOVIA_TEST_PROVIDER_KEY": PROVIDER_KEY,
                                        "XENOVIA_UPSTREAM_CA_FILE": certificate}).start()
        try:
            yield running, provider
        finally:
            running.stop()


def test_https_upstream_reached(tls_setup):
    running, provider = tls_setup
    url = f"https://localhost:{provider.port}/v1"
    proxy_id = run_cli(running.home, "proxy", "create", "--name", "tls", "--upstream-url", url,
                       "--upstream-key-env", "XENOVIA_TEST_PROVIDER_KEY").stdout.strip()
    key = run_cli(running.home, "key", "create", "--proxy", proxy_id).stdout.strip()
    running.wait_for_reload()
    client = OpenAI(api_key=key, base_url=running.base_url(proxy_id), max_retries=0)

    completion = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])

    assert completion.choices[0].message.content == "Hello from the Xenovia mock provider."
    assert provider.requests[-1]["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert provider.requests[-1]["headers"]["host"] == f"localhost:{provider.port}"


def test_untrusted_certificate_refused(tls_setup, tmp_path):
    running, provider = tls_setup
    # 127.0.0.1 is not in the certificate's names, so verification fails.
    url = f"https://127.0.0.1:{provider.port}/v1"
    proxy_id = run_cli(running.home, "proxy", "create", "--name", "tls-bad", "--upstream-url", url).stdout.strip()
    key = run_cli(running.home, "key", "create", "--proxy", proxy_id).stdout.strip()
    running.wait_for_reload()
    before = provider.request_count

    import httpx2

    response = httpx2.post(f"{running.base_url(proxy_id)}/chat/completions",
                           headers={"authorization": f"Bearer {key}"},
                           content='{"model":"m","messages":[]}', timeout=30)

    assert response.status_code == 503
    assert response.json()["error"]["code"]
    assert provider.request_count == before
