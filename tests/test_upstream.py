"""The server-side request forgery checks on provider URLs."""

import pytest

from ext_proc.upstream import UpstreamError, parse_upstream_url


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/v1",
        "http://2852039166/v1",
        "http://0xa9fea9fe/v1",
        "http://0251.0376.0251.0376/v1",
        "http://169.254.43518/v1",
        "http://[64:ff9b::a9fe:a9fe]/v1",
        "http://[2002:a9fe:a9fe::]/v1",
        "http://[::a9fe:a9fe]/v1",
        "http://[::ffff:169.254.169.254]/v1",
        "http://[fe80::1]/v1",
        "http://metadata.google.internal/v1",
        "http://100.100.100.200/v1",
        "http://0/v1",
    ],
)
def test_forbidden_upstreams_rejected(url):
    with pytest.raises(UpstreamError):
        parse_upstream_url(url)


@pytest.mark.parametrize(
    "url",
    ["https://api.openai.com/v1", "http://127.0.0.1:8000/v1", "http://10.0.0.5:8000/v1",
     "http://[::1]:8000/v1", "http://vllm.internal:8000/openai/v1"],
)
def test_provider_upstreams_accepted(url):
    upstream = parse_upstream_url(url)

    assert upstream.port > 0
