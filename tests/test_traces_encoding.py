"""The ProtobufList write path against Python references: scrub hints, body cuts and cost.

The collector encodes batches in Python and lets ClickHouse compute body cuts and costs,
so these tests compare what the embedded store holds with what the Python code of
``rows``, ``scrub`` and ``cost`` computes for the same input.
"""

from __future__ import annotations

import random

import pytest
from test_traces_support import simple_trace

from ext_proc.pb import trace_pb2
from ext_proc.traces.cost import Price, PriceTable
from ext_proc.traces.rows import RowBuilder
from ext_proc.traces.scrub import Scrubber
from ext_proc.traces.store import TraceStore

pytestmark = pytest.mark.timeout(300)

# Each fragment alone, or glued to its neighbours, may or may not be something to scrub.
FRAGMENTS = [
    "xe_", "sk-", "sk_", "gsk_", "AKIA", "AIza", "ghp_", "github_pat_", "xoxb-", "Bearer",
    "bearer", "BEARER", " ", "\u00a0", "\u2003", "\t", "@", ".", "-", "_", "example", "com",
    "a.b", "123", "45", "6789", "\u0661\u0662\u0663", "\u0664\u0665", "\u0666\u0667\u0668\u0669",
    "2024-07-18", "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOP", "0123456789", "é", "😀",
    "\x00", "\n", "Q", "x.", ".1", "-",
    # JSON escapes as stored messages hold them, and the pieces of a split \uXXXX escape.
    "\\n", "\\t", "\\r", "\\\\", '\\"', "\\/", "\\u0001", "\\u0040", "\\u002d", "\\u002D",
    "\\u0020", "\\u0661", "\\ud83d\\ude00", "\\u00", "40", "2d", "\\\\u0040",
    # Look-alikes of "@", "." and "-", and fullwidth digits and letters.
    "\uff20", "\u3002", "\uff0e", "\u2010", "\u2013", "\u2014", "\u2212", "\uff0d",
    "\uff11\uff12\uff13", "\uff14\uff15", "\uff16\uff17\uff18\uff19", "\uff42\uff4f\uff42",
]  # fmt: skip


@pytest.fixture
def store(tmp_path):
    opened = TraceStore.open(tmp_path)
    yield opened
    opened.close()


def random_texts(count: int) -> list[str]:
    rng = random.Random(20260704)
    return ["".join(rng.choices(FRAGMENTS, k=rng.randint(1, 12))) for _ in range(count)]


@pytest.mark.parametrize(
    "text",
    [
        "mail bob@example.com now",
        "mail jane@mx.a.example.com now",
        "mail jane@corp.1and1.com now",
        "ab@c.d.ef",
        "key sk-abcdefghijklmnopqrstuv",
        "Bearer\u00a0abcdefghijk",
        "ssn \u0661\u0662\u0663-\u0664\u0665-\u0666\u0667\u0668\u0669",
        "123-45-6789",
        "AKIAABCDEFGHIJKLMNOP",
        "xe_abcdefgh12",
        "my key is\\nsk-proj-abcdefghijklmnopqrstuvwxyz012345",
        "\\nBearer abcdefghijk",
        "\\nxe_abcdefgh12",
        "\\tsk-abcdefghijklmnopqrstuv",
        "\\u0001123-45-6789",
        "bob\\u0040example.com",
        "123\\u002d45\\u002d6789",
        "sk\\u002dabcdefghijklmnopqrstuv",
        "Bearer\\u0020abcdefghijk",
        "mail bob\uff20example.com now",
        "mail bob@example.xn--p1ai now",
        "mail bob@example\u3002com now",
        "ssn 123\u201045\u20106789",
        "mail bob\u2010@example.com now",
        "mail bob\u3002@example.com now",
        "mail bob@\u2010example.com now",
        "ssn \uff11\uff12\uff13\u2013\uff14\uff15\u2013\uff16\uff17\uff18\uff19",
    ],
)
def test_byte_hint_finds_each_kind(text):
    scrubber = Scrubber()
    assert scrubber.scrub(text) != text
    assert scrubber.might_change_bytes(text.encode())


def test_byte_hint_covers_scrub_on_random_text():
    scrubber = Scrubber()
    changed = 0
    for text in random_texts(20_000):
        if scrubber.scrub(text) != text:
            changed += 1
            assert scrubber.might_change_bytes(text.encode()), text
    assert changed > 100  # the fragments do produce secrets and PII


def test_random_text_scrubbed_in_store(store):
    texts = random_texts(400)
    traces = []
    for index, text in enumerate(texts):
        trace = simple_trace(index, messages=text, custom_properties={text: text})
        trace.steps[0].tool_args = text
        trace.steps[0].attributes[text] = text
        traces.append(trace)
    originals = [trace.SerializeToString() for trace in traces]
    builder = RowBuilder(PriceTable.builtin(), Scrubber(), 0)
    store.insert(builder.build(traces), "random-text")

    assert [trace.SerializeToString() for trace in traces] == originals
    scrub = Scrubber().scrub
    rows = store.query("SELECT trace_id, messages, custom_properties FROM traces", {})[1]
    stored = {row[0]: row for row in rows}
    steps = store.query("SELECT trace_id, tool_args, attributes FROM trace_steps", {})[1]
    stored_steps = {row[0]: row for row in steps}
    for trace, text in zip(traces, texts, strict=True):
        assert stored[trace.trace_id][1] == scrub(text)
        assert stored[trace.trace_id][2] == {scrub(text): scrub(text)}
        assert stored_steps[trace.trace_id][1] == scrub(text)
        assert stored_steps[trace.trace_id][2] == {scrub(text): scrub(text)}


def test_body_cut_matches_python_on_multibyte_text(store):
    body = "aé😀中" * 10
    traces = [simple_trace(limit, messages=body, body_limit=limit) for limit in range(1, 40)]
    builder = RowBuilder(PriceTable.builtin(), Scrubber(), 0)
    store.insert(builder.build(traces), "cuts")

    rows = dict(store.query("SELECT trace_id, messages FROM traces", {})[1])
    for trace in traces:
        expected = body.encode()[: trace.body_limit].decode(errors="ignore")
        assert rows[trace.trace_id] == expected, trace.body_limit


def test_default_body_limit_applies(store):
    builder = RowBuilder(PriceTable.builtin(), Scrubber(), 7)
    trace = simple_trace(messages="é" * 10)
    store.insert(builder.build([trace]), "default-limit")
    assert store.query("SELECT messages FROM traces", {})[1][0][0] == "é" * 3


def test_stored_cost_equals_python_cost(store):
    prices = PriceTable.builtin()
    prices.prices["odd 'quoted' \\ model"] = Price(0.1 + 0.2, 1 / 3, None)
    cases = [
        ("gpt-4o-mini", "", 420, 35, None),
        ("gpt-4o", "gpt-4o-2024-08-06", 1000, 17, 300),
        ("claude-3-5-sonnet", "", 7, None, 9),
        ("o1", "", None, 5, None),
        ("gpt-4o-mini", "", None, None, None),
        ("no-such-model", "", 10, 10, None),
        ("", "", 10, 10, None),
        ("odd 'quoted' \\ model", "", 3, 7, None),
        ("OpenAI/GPT-4.1 ", "", 123_456, 654_321, 123_456),
    ]
    traces = []
    for model, served, tokens_in, tokens_out, cached in cases:
        trace = simple_trace(model=model, model_served=served)
        for name, value in (("tokens_in", tokens_in), ("tokens_out", tokens_out)):
            trace.ClearField(name)
            if value is not None:
                setattr(trace, name, value)
        if cached is not None:
            trace.cached_tokens = cached
        traces.append(trace)
    store.insert(RowBuilder(prices, Scrubber(), 0).build(traces), "costs")

    rows = store.query("SELECT trace_id, cost_usd, price_version FROM traces", {})[1]
    stored = {row[0]: row[1:] for row in rows}
    for trace, (model, served, tokens_in, tokens_out, cached) in zip(traces, cases, strict=True):
        expected = prices.cost_usd(served or model, tokens_in, tokens_out, cached)
        cost, version = stored[trace.trace_id]
        assert cost == expected, model
        assert version == (prices.version if expected is not None else ""), model


def test_unknown_body_mode_stores_nothing(store):
    trace = simple_trace(messages="body", tools="tools", body_mode="everything")
    builder = RowBuilder(PriceTable.builtin(), Scrubber(), 0)
    store.insert(builder.build([trace]), "unknown-mode")
    row = store.query("SELECT body_mode, messages, tools FROM traces", {})[1][0]
    assert row == ("none", "", "")


def test_batch_without_steps(store):
    trace = simple_trace()
    del trace.steps[:]
    builder = RowBuilder(PriceTable.builtin(), Scrubber(), 0)
    batch = builder.build([trace, trace_pb2.Trace(trace_id="bare")])
    assert batch.step_count == 0
    store.insert(batch, "no-steps")
    assert store.query("SELECT count() FROM traces", {})[1][0][0] == 2
    assert store.query("SELECT count() FROM trace_steps", {})[1][0][0] == 0
