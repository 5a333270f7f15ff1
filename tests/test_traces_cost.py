"""Price table and secret scrubbing units of the trace write path."""

from __future__ import annotations

import json

import pytest

from ext_proc.traces.cost import PRICE_TABLE_VERSION, PriceTable
from ext_proc.traces.scrub import Scrubber


@pytest.fixture
def prices():
    return PriceTable.builtin()


def test_dated_model_priced_as_base(prices):
    assert prices.lookup("gpt-4o-mini-2024-07-18") == prices.lookup("gpt-4o-mini")
    assert prices.lookup("claude-3-5-sonnet-20241022") == prices.lookup("claude-3-5-sonnet")
    assert prices.lookup("gpt-4-0613") == prices.lookup("gpt-4")
    assert prices.lookup("openai/gpt-4o") == prices.lookup("gpt-4o")
    assert prices.lookup("GPT-4o") == prices.lookup("gpt-4o")


def test_unknown_model_or_missing_usage_costs_none(prices):
    assert prices.cost_usd("acme-llm", 10, 10, None) is None
    assert prices.cost_usd("gpt-4o", None, None, None) is None
    assert prices.cost_usd("", 10, 10, None) is None


def test_cached_tokens_billed_at_cached_price(prices):
    cost = prices.cost_usd("gpt-4o-mini", 1_000_000, 1_000_000, 400_000)
    assert cost == pytest.approx(0.6 * 0.15 + 0.4 * 0.075 + 0.60)
    # A model without a cached price bills cached tokens as input.
    assert prices.cost_usd("gpt-4", 1000, 0, 500) == pytest.approx(1000 * 30.0 / 1e6)


def test_embedding_without_output_tokens(prices):
    assert prices.cost_usd("text-embedding-3-small", 1_000_000, None, None) == pytest.approx(0.02)


def test_override_file_adds_and_replaces(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"version": "acme-1", "models": {
        "acme-llm": {"input": 1.0, "output": 2.0},
        "gpt-4o": {"input": 5.0, "output": 5.0, "cached_input": 1.0},
    }}))  # fmt: skip
    prices = PriceTable.load(path)
    assert prices.version == f"{PRICE_TABLE_VERSION}+acme-1"
    assert prices.cost_usd("acme-llm", 1_000_000, 1_000_000, None) == pytest.approx(3.0)
    assert prices.cost_usd("gpt-4o-2024-08-06", 1_000_000, 0, 0) == pytest.approx(5.0)


def test_invalid_override_file_keeps_builtin(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text('{"models": {"x": {"input": "cheap"}}}')
    prices = PriceTable.load(path)
    assert prices.version == PRICE_TABLE_VERSION
    assert prices.lookup("x") is None


@pytest.mark.parametrize(
    "secret",
    [
        "xe_0123456789abcdef0123",
        "sk-proj-abcdefghijklmnop1234",
        "sk-ant-api03-abcdefghijklmnopqrst",
        "AKIAABCDEFGHIJKLMNOP",
        "AIza" + "a" * 35,
        "gsk_" + "b" * 30,
        "ghp_" + "c" * 36,
        "xoxb-1234567890-abcdef",
    ],
)
def test_scrub_removes_secret_formats(secret):
    scrubber = Scrubber(frozenset())
    text = f"key={secret} end"
    assert scrubber.finds_anything(text)
    assert scrubber.scrub(text) == "key=[REDACTED_SECRET] end"


def test_scrub_keeps_bearer_scheme_and_ordinary_words():
    scrubber = Scrubber()
    assert scrubber.scrub("Authorization: Bearer abc.def-ghi_123") == (
        "Authorization: Bearer [REDACTED_SECRET]"
    )
    plain = "use sk-learn and xe_id, call 555-1234 on 2024-07-18"
    assert scrubber.scrub(plain) == plain
    assert not scrubber.finds_anything("a plain sentence from 2024-07-18")


def test_scrub_pii_kinds_configurable():
    text = "mail a.b@example.org ssn 123-45-6789"
    assert Scrubber(frozenset({"email"})).scrub(text) == "mail [REDACTED_EMAIL] ssn 123-45-6789"
    assert Scrubber().scrub(text) == "mail [REDACTED_EMAIL] ssn [REDACTED_SSN]"
    with pytest.raises(ValueError):
        Scrubber(frozenset({"phone"}))
