import pytest

from ext_proc.redaction import REDACTION_KINDS, redact_json_strings, redact_text

BOTH = frozenset({"email", "ssn"})


def test_known_kinds():
    assert REDACTION_KINDS == frozenset({"email", "ssn"})


def test_email_redacted():
    text, counts = redact_text("write to ops@acme-example.com or a.b+tag@mail.example.co.uk.", BOTH)
    assert text == "write to [REDACTED_EMAIL] or [REDACTED_EMAIL]."
    assert counts == {"email": 2}


def test_ssn_redacted():
    text, counts = redact_text("SSN 123-45-6789, again: 123-45-6789", BOTH)
    assert text == "SSN [REDACTED_SSN], again: [REDACTED_SSN]"
    assert counts == {"ssn": 2}


@pytest.mark.parametrize(
    "text",
    [
        "000-12-3456",
        "666-12-3456",
        "912-34-5678",
        "123-00-4567",
        "123-45-0000",
        "1123-45-6789",
        "123-45-67890",
        "call 555-123-4567",
        "part 123-45-6789-01",
    ],
)
def test_ssn_false_positives_kept(text):
    assert redact_text(text, BOTH) == (text, {})


def test_only_requested_kinds():
    source = "mail me@example.com, ssn 123-45-6789"
    assert redact_text(source, frozenset({"ssn"}))[0] == "mail me@example.com, ssn [REDACTED_SSN]"
    assert redact_text(source, frozenset({"email"}))[0] == "mail [REDACTED_EMAIL], ssn 123-45-6789"
    assert redact_text(source, frozenset()) == (source, {})


def test_not_an_email_kept():
    for text in ("@handle", "a@b", "user@localhost", "price: 5 @ $3"):
        assert redact_text(text, BOTH) == (text, {}), text


def test_long_word_run_is_linear():
    text = "a" * 200_000 + " @ " + "b" * 200_000
    assert redact_text(text, BOTH) == (text, {})


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="phone"):
        redact_text("x", frozenset({"phone"}))


def test_nested_json_redacted():
    value = {
        "messages": [
            {"role": "user", "content": "I am jane@example.org, SSN 078-05-1120"},
            {"role": "assistant", "content": "Noted."},
        ],
        "tool_calls": [{"arguments": {"to": "bob@example.com", "count": 3, "ok": True}}],
        "ok@example.com": None,
    }
    redacted, counts = redact_json_strings(value, BOTH)
    assert redacted == {
        "messages": [
            {"role": "user", "content": "I am [REDACTED_EMAIL], SSN [REDACTED_SSN]"},
            {"role": "assistant", "content": "Noted."},
        ],
        "tool_calls": [{"arguments": {"to": "[REDACTED_EMAIL]", "count": 3, "ok": True}}],
        "ok@example.com": None,
    }
    assert counts == {"email": 2, "ssn": 1}
    assert value["messages"][0]["content"].startswith("I am jane@")


def test_json_scalars_and_strings():
    assert redact_json_strings("x@example.com", BOTH) == ("[REDACTED_EMAIL]", {"email": 1})
    assert redact_json_strings(42, BOTH) == (42, {})
    assert redact_json_strings(None, BOTH) == (None, {})
    assert redact_json_strings(["a", 1.5], frozenset()) == (["a", 1.5], {})
