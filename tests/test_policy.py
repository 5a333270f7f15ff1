import json
import pathlib
import threading

import pytest
from gateway_harness import run_cli

from ext_proc.policy import (
    EXIT_ERROR,
    CompiledPolicy,
    PolicyCompileError,
    PolicyEngine,
    compile_policy,
    read_input_document,
    run_policy_test,
)

POLICIES = pathlib.Path(__file__).resolve().parent.parent / "policies"

SEED_V1 = (POLICIES / "block_dangerous_tools.rego").read_text()
SEED_V0 = (POLICIES / "block_dangerous_tools_v0.rego").read_text()


def _evaluate(policies, document, stage="request"):
    engine = PolicyEngine(policies, stage)
    return engine.evaluate(json.dumps(document))


def _compile_error(source, name="broken"):
    with pytest.raises(PolicyCompileError) as caught:
        compile_policy(source, name)
    return caught.value


# --- compile_policy --------------------------------------------------------------------------


def test_seed_v1_compiles_as_v1():
    policy = compile_policy(SEED_V1, "block_tools")
    assert policy.rego_version == "v1"
    assert policy.module_text == SEED_V1
    assert policy.source == SEED_V1
    assert policy.required_fields == frozenset({"tool_names"})
    assert len(policy.sha256) == 64


def test_older_form_compiles_as_v0_with_stable_lines():
    policy = compile_policy(SEED_V0, "block_tools_v0")
    assert policy.rego_version == "v0"
    assert "import future.keywords" in policy.module_text
    assert policy.module_text.count("\n") == SEED_V0.count("\n")
    assert policy.source == SEED_V0


@pytest.mark.parametrize("source", [SEED_V1, SEED_V0], ids=["v1", "v0"])
def test_both_forms_deny_delete_database(source):
    policy = compile_policy(source, "block_tools")
    denied = _evaluate([(policy, False)], {"tool_names": ["search_kb", "delete_database"]})
    allowed = _evaluate([(policy, False)], {"tool_names": ["search_kb", "get_order"]})
    assert denied.outcome == "deny"
    assert denied.rule_id == "block_tools.deny"
    assert denied.error is None
    assert allowed.outcome == "allow"
    assert allowed.rule_id == ""


def test_older_form_returns_reason():
    policy = compile_policy(SEED_V0, "block_tools_v0")
    decision = _evaluate([(policy, False)], {"tool_names": ["delete_database"]})
    assert decision.reasons == ("delete_database is not permitted",)


def test_boolean_deny_has_no_reasons():
    policy = compile_policy(SEED_V1, "block_tools")
    decision = _evaluate([(policy, False)], {"tool_names": ["delete_database"]})
    assert decision.reasons == ()


def test_missing_closing_brace_names_line():
    lines = SEED_V1.rstrip("\n").split("\n")
    assert lines[-1] == "}"
    source = "\n".join(lines[:-1]) + "\n"
    error = _compile_error(source, "block_tools")
    assert error.line == len(lines)
    assert "expecting `}`" in error.message
    assert str(error).startswith(f"block_tools.rego:{len(lines)}: ")


def test_bad_expression_names_line():
    source = "package xenovia.policy\n\ndefault allow = true\n\nallow if input.x === 1\n"
    error = _compile_error(source)
    assert error.line == 5
    assert error.column is not None
    assert "expecting expression" in error.message


def test_v0_syntax_error_names_line():
    source = SEED_V0.replace("    reason :=", "    reason :=  :=")
    error = _compile_error(source)
    assert error.line == 6


def test_wrong_package_rejected():
    error = _compile_error(SEED_V1.replace("xenovia.policy", "xenovia.other"))
    assert error.line == 1
    assert "xenovia.policy" in str(error)


def test_missing_package_rejected():
    error = _compile_error("deny if { true }\n")
    assert "missing package" in str(error)


def test_self_reference_rejected():
    source = (
        "package xenovia.policy\n\n"
        'blocked if input.model == "x"\n\n'
        "deny if data.xenovia.policy.blocked\n"
    )
    error = _compile_error(source)
    assert error.line == 5
    assert "by name" in error.message


def test_unknown_function_rejected():
    source = 'package xenovia.policy\n\ndeny if {\n    regex.matchx("a", input.model)\n}\n'
    error = _compile_error(source)
    assert error.line == 4
    assert "regex.matchx" in error.message


def test_unsafe_variable_rejected():
    error = _compile_error("package xenovia.policy\n\ndeny if { y > 1 }\n")
    assert error.line == 3
    assert "unsafe" in error.message


def test_string_deny_rejected():
    error = _compile_error('package xenovia.policy\n\ndeny := "no"\n')
    assert "deny must be a boolean or a set of strings" in str(error)


@pytest.mark.parametrize(
    "rule, message",
    [
        ('deny := "nope" if input.model == "x"', "deny must be a boolean or a set of strings, got a string"),
        ("deny contains 3 if input.x", "each reason of deny must be a string, got a number"),
        ("allow := [1] if input.x", "allow must be a boolean, got an array"),
        ('default allow := "yes"', "allow must be a boolean, got a string"),
    ],
)
def test_wrong_literal_decision_rejected(rule, message):
    # These rules are undefined on the minimal input, so only the AST shows the wrong type.
    error = _compile_error(f"package xenovia.policy\n\n{rule}\n")

    assert message in str(error)
    assert error.line == 3


def test_decision_references_left_to_runtime():
    compiled = compile_policy("package xenovia.policy\n\ndeny := input.flag if input.flag\n", "ref")

    assert compiled.name == "ref"


def test_unknown_redaction_kind_rejected():
    error = _compile_error('package xenovia.policy\n\nredact_fields := {"phone"}\n')
    assert "phone" in str(error)


def test_compile_prints_nothing_to_stderr(capfd):
    compile_policy(SEED_V0, "block_tools_v0")
    _compile_error("package xenovia.policy\ndeny[x] {\n  x := 1 +\n}\n")
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('deny if { input.model == "x" }', frozenset({"model"})),
        ('deny if { input["model"] == "x"; input.request.max_tokens > 5 }', {"model", "request"}),
        ('deny if { some m in input.messages; m.role == "tool" }', frozenset({"messages"})),
        ("default allow := true", frozenset()),
        ("deny if { some k; input[k] == 1 }", None),
        ("deny if { walk(input, [_, v]); v == 1 }", None),
        ('deny if { x := input; x.model == "a" }', None),
        ("deny if { f(input) }\nf(x) if { x.model }", None),
    ],
)
def test_required_fields(body, expected):
    policy = compile_policy(f"package xenovia.policy\n\n{body}\n", "fields")
    assert policy.required_fields == (None if expected is None else frozenset(expected))


def test_required_fields_ignore_strings_and_comments():
    source = (
        "package xenovia.policy\n\n# input[x] would need everything\n"
        'deny contains "input is bad" if { input.model == "input" }\n'
    )
    assert compile_policy(source, "fields").required_fields == frozenset({"model"})


# --- PolicyEngine ----------------------------------------------------------------------------


def test_two_defaults_coexist():
    allow_all = compile_policy("package xenovia.policy\n\ndefault allow = true\n", "allow_all")
    allow_gpt = compile_policy(
        'package xenovia.policy\n\ndefault allow = false\n\nallow if input.model == "gpt-4o"\n',
        "allow_gpt",
    )
    engine = PolicyEngine([(allow_all, False), (allow_gpt, False)], "request")
    denied = engine.evaluate(json.dumps({"model": "other"}))
    allowed = engine.evaluate(json.dumps({"model": "gpt-4o"}))
    assert denied.outcome == "deny"
    assert denied.rule_id == "allow_gpt.allow"
    assert allowed.outcome == "allow"


def test_seed_policies_in_both_forms_coexist():
    v1 = compile_policy(SEED_V1, "v1")
    v0 = compile_policy(SEED_V0, "v0")
    decision = _evaluate([(v1, False), (v0, False)], {"tool_names": ["delete_database"]})
    assert decision.outcome == "deny"
    assert decision.rule_id == "v1.deny"
    assert decision.reasons == ("delete_database is not permitted",)


def test_allow_false_denies():
    policy = compile_policy("package xenovia.policy\n\nallow := false\n", "closed")
    decision = _evaluate([(policy, False)], {})
    assert decision.outcome == "deny"
    assert decision.rule_id == "closed.allow"
    assert decision.reasons == ()


def test_undefined_allow_and_deny_allow():
    policy = compile_policy("package xenovia.policy\n\nallow if input.never\n", "quiet")
    assert _evaluate([(policy, False)], {}).outcome == "allow"


def test_deny_set_reasons_from_all_denying_policies():
    tools = compile_policy(
        "package xenovia.policy\n\n"
        'deny contains sprintf("tool %s blocked", [t]) if {\n'
        "    some t in input.tool_names\n"
        '    t in {"a", "b"}\n'
        "}\n",
        "tools",
    )
    model = compile_policy(
        'package xenovia.policy\n\ndeny contains "model blocked" if input.model == "m"\n', "model"
    )
    decision = _evaluate([(tools, False), (model, False)], {"tool_names": ["b", "a"], "model": "m"})
    assert decision.outcome == "deny"
    assert decision.rule_id == "tools.deny"
    assert decision.reasons == ("tool a blocked", "tool b blocked", "model blocked")


def test_empty_deny_set_allows():
    policy = compile_policy(SEED_V0, "v0")
    decision = _evaluate([(policy, False)], {"tool_names": []})
    assert decision.outcome == "allow"
    assert decision.reasons == ()


def test_redact_fields_union():
    email = compile_policy('package xenovia.policy\n\nredact_fields := {"email"}\n', "email")
    ssn = compile_policy(
        'package xenovia.policy\n\nredact_fields contains "ssn" if input.stage == "request"\n',
        "ssn",
    )
    decision = _evaluate([(email, False), (ssn, False)], {"stage": "request"})
    assert decision.outcome == "allow"
    assert decision.redact_fields == frozenset({"email", "ssn"})


def test_unknown_redaction_kind_at_evaluation_fails_closed():
    policy = compile_policy(
        "package xenovia.policy\n\nredact_fields contains input.kind if input.kind\n", "kinds"
    )
    decision = _evaluate([(policy, False)], {"kind": "phone"})
    assert decision.outcome == "deny"
    assert decision.rule_id == "kinds.error"
    assert "phone" in decision.error


def test_dry_run_deny_allows_and_records():
    enforcing = compile_policy("package xenovia.policy\n\ndefault allow = true\n", "open")
    dry_run = compile_policy(SEED_V0, "shadow")
    decision = _evaluate([(enforcing, False), (dry_run, True)], {"tool_names": ["delete_database"]})
    assert decision.outcome == "allow"
    assert decision.dry_run_denied is True
    assert decision.dry_run_rule_id == "shadow.deny"
    assert decision.dry_run_reasons == ("delete_database is not permitted",)
    assert decision.rule_id == ""


def test_dry_run_redactions_not_applied():
    dry_run = compile_policy(
        'package xenovia.policy\n\nredact_fields := {"email"}\n', "shadow_redact"
    )
    decision = _evaluate([(dry_run, True)], {})
    assert decision.redact_fields == frozenset()


def test_enforced_deny_clears_dry_run_flag():
    enforcing = compile_policy(SEED_V1, "block")
    dry_run = compile_policy(SEED_V0, "shadow")
    decision = _evaluate([(enforcing, False), (dry_run, True)], {"tool_names": ["delete_database"]})
    assert decision.outcome == "deny"
    assert decision.dry_run_denied is False
    assert decision.dry_run_rule_id == "shadow.deny"


def test_builtin_error_fails_closed():
    counting = compile_policy(
        "package xenovia.policy\n\ndeny if count(input.messages) > 20\n", "counting"
    )
    decision = _evaluate([(counting, False)], {"messages": 5})
    assert decision.outcome == "deny"
    assert decision.rule_id == "counting.error"
    assert "counting.rego:3:" in decision.error
    assert "count" in decision.error


def test_error_in_one_policy_keeps_others():
    counting = compile_policy(
        "package xenovia.policy\n\ndeny if count(input.messages) > 20\n", "counting"
    )
    seed = compile_policy(SEED_V0, "seed")
    decision = _evaluate(
        [(counting, True), (seed, False)], {"messages": 5, "tool_names": ["delete_database"]}
    )
    assert decision.outcome == "deny"
    assert decision.rule_id == "seed.deny"
    assert decision.dry_run_rule_id == "counting.error"
    assert decision.error is not None


def test_dry_run_error_allows():
    counting = compile_policy(
        "package xenovia.policy\n\ndeny if count(input.messages) > 20\n", "counting"
    )
    decision = _evaluate([(counting, True)], {"messages": 5})
    assert decision.outcome == "allow"
    assert decision.dry_run_denied is True
    assert decision.dry_run_rule_id == "counting.error"


def test_wrong_deny_type_at_evaluation_fails_closed():
    policy = compile_policy("package xenovia.policy\n\ndeny := input.flag if input.flag\n", "typed")
    decision = _evaluate([(policy, False)], {"flag": "yes"})
    assert decision.outcome == "deny"
    assert decision.rule_id == "typed.error"
    assert "deny must be" in decision.error


def test_invalid_input_fails_closed():
    engine = PolicyEngine([(compile_policy(SEED_V1, "seed"), False)], "request")
    for text in ("not json", "[]", "null", '{"a": '):
        decision = engine.evaluate(text)
        assert decision.outcome == "deny", text
        assert decision.rule_id == "input.error", text
        assert decision.error, text


def test_no_policies_allow():
    assert PolicyEngine([], "request").evaluate("{}").outcome == "allow"


def test_eval_time_recorded():
    decision = _evaluate([(compile_policy(SEED_V1, "seed"), False)], {"tool_names": []})
    assert decision.eval_us > 0


def test_cross_thread_evaluate_raises():
    engine = PolicyEngine([(compile_policy(SEED_V1, "seed"), False)], "request")
    raised = []

    def use_engine():
        try:
            engine.evaluate("{}")
        except RuntimeError as exc:
            raised.append(exc)

    worker = threading.Thread(target=use_engine)
    worker.start()
    worker.join()
    assert len(raised) == 1
    assert engine.evaluate("{}").outcome == "allow"


def test_engine_required_fields_union():
    seed = compile_policy(SEED_V1, "seed")
    model = compile_policy('package xenovia.policy\n\ndeny if input.model == "x"\n', "model")
    anything = compile_policy(
        "package xenovia.policy\n\ndeny if { some k; input[k] == 1 }\n", "any"
    )
    assert PolicyEngine([(seed, False), (model, False)], "request").required_fields == frozenset(
        {"tool_names", "model"}
    )
    assert PolicyEngine([(seed, False), (anything, True)], "request").required_fields is None


def test_same_policy_attached_twice():
    seed = compile_policy(SEED_V0, "seed")
    decision = _evaluate([(seed, False), (seed, True)], {"tool_names": ["delete_database"]})
    assert decision.outcome == "deny"
    assert decision.dry_run_rule_id == "seed.deny"


LONE_DENY = """package xenovia.policy

deny contains "too many messages" if count(input.messages) > 2

deny contains sprintf("tool %s", [tool]) if {
    some tool in input.tool_names
    tool == "shell_exec"
}
"""


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize(
    "document",
    [
        {"messages": [1, 2, 3], "tool_names": ["shell_exec"]},
        {"messages": [], "tool_names": []},
        {"messages": 5, "tool_names": []},  # count() of a number: a runtime error
    ],
)
def test_lone_deny_policy_decides_as_with_others(dry_run, document):
    # A lone deny-only policy is evaluated through its deny rule alone. Its decision must be
    # the one the generated decision module gives when another policy is attached beside it.
    lone = compile_policy(LONE_DENY, "lone")
    assert lone.decision_rules == (("deny", "always"),)
    bystander = compile_policy("package xenovia.policy\n\nallow := true\n", "bystander")
    alone = _evaluate([(lone, dry_run)], document)
    beside = _evaluate([(lone, dry_run), (bystander, False)], document)
    for field in ("outcome", "rule_id", "reasons", "dry_run_denied", "dry_run_rule_id", "error"):
        assert getattr(alone, field) == getattr(beside, field), field
    if document["messages"] == 5:
        assert alone.error and (alone.dry_run_rule_id if dry_run else alone.rule_id) == "lone.error"


def test_hand_built_compiled_policy_is_evaluated_generically():
    compiled = compile_policy(SEED_V1, "seed")
    plain = CompiledPolicy(
        name="plain",
        source=compiled.source,
        sha256=compiled.sha256,
        rego_version="v1",
        module_text=compiled.module_text,
        required_fields=compiled.required_fields,
    )
    assert _evaluate([(plain, False)], {"tool_names": ["delete_database"]}).outcome == "deny"
    assert _evaluate([(plain, False)], {"tool_names": []}).outcome == "allow"


def test_unknown_stage_rejected():
    with pytest.raises(ValueError):
        PolicyEngine([], "upload")


# --- Example policies ------------------------------------------------------------------------


def _sample(name):
    return json.loads((POLICIES / "samples" / name).read_text())


def test_example_policies_compile():
    for path in POLICIES.glob("*.rego"):
        compile_policy(path.read_text(), path.stem)


def test_bench_request_allows_sample_and_denies_variants():
    policy = compile_policy((POLICIES / "bench_request.rego").read_text(), "bench_request")
    engine = PolicyEngine([(policy, False)], "request")
    document = _sample("request_chat.json")
    assert engine.evaluate(json.dumps(document)).outcome == "allow"

    variants = {
        "model": {**document, "model": "gpt-3.5-turbo"},
        "tool": {**document, "tool_names": ["shell_exec"]},
        "tokens": {**document, "request": {**document["request"], "max_tokens": 100000}},
        "team": {**document, "properties": {}},
        "phrase": {
            **document,
            "messages": [{"role": "user", "content": "Please IGNORE previous instructions"}],
        },
    }
    for label, variant in variants.items():
        decision = engine.evaluate(json.dumps(variant))
        assert decision.outcome == "deny", label
        assert len(decision.reasons) == 1, label


def test_bench_response_denies_sample_tool_call():
    policy = compile_policy((POLICIES / "bench_response.rego").read_text(), "bench_response")
    decision = _evaluate([(policy, False)], _sample("response_tool_calls.json"), "response")
    assert decision.outcome == "deny"
    assert decision.reasons == ('the model called the blocked tool "drop_table"',)


def test_response_drop_table_policy():
    source = (POLICIES / "response_block_drop_table.rego").read_text()
    policy = compile_policy(source, "drop_table")
    document = _sample("response_tool_calls.json")
    denied = _evaluate([(policy, False)], document, "response")
    calls = [call for call in document["output"]["tool_calls"] if call["name"] != "drop_table"]
    allowed = _evaluate(
        [(policy, False)], {**document, "output": {**document["output"], "tool_calls": calls}}
    )
    assert denied.outcome == "deny"
    assert allowed.outcome == "allow"


# --- run_policy_test -------------------------------------------------------------------------


def test_run_policy_test_block():
    text, code = run_policy_test(
        str(POLICIES / "block_dangerous_tools_v0.rego"),
        {"tool_names": ["delete_database"]},
        "request",
    )
    assert code == 1
    assert "outcome: block" in text
    assert "rule: block_dangerous_tools_v0.deny" in text
    assert "reason: delete_database is not permitted" in text


def test_run_policy_test_allow():
    text, code = run_policy_test(
        str(POLICIES / "block_dangerous_tools.rego"), {"tool_names": ["search_kb"]}, "request"
    )
    assert code == 0
    assert text == "outcome: allow"


def test_run_policy_test_redact_by_stage():
    path = str(POLICIES / "redact_pii.rego")
    request_text, request_code = run_policy_test(path, {}, "request")
    response_text, response_code = run_policy_test(path, {}, "response")
    assert request_code == 0
    assert "outcome: redact\n" in request_text
    assert "redact_fields: email, ssn" in request_text
    assert response_code == 0
    assert "outcome: redact_response" in response_text


def test_run_policy_test_block_response():
    text, code = run_policy_test(
        str(POLICIES / "response_block_drop_table.rego"),
        _sample("response_tool_calls.json"),
        "response",
    )
    assert code == 1
    assert "outcome: block_response" in text


def test_run_policy_test_compile_error(tmp_path):
    path = tmp_path / "broken.rego"
    path.write_text("package xenovia.policy\n\ndeny if {\n")
    text, code = run_policy_test(str(path), {}, "request")
    assert code == 2
    assert "broken.rego:4:" in text


def test_run_policy_test_missing_file(tmp_path):
    text, code = run_policy_test(str(tmp_path / "absent.rego"), {}, "request")
    assert code == 2
    assert "absent.rego" in text


@pytest.mark.parametrize(
    ("rule", "keys"),
    [
        ("deny if input.request.max_tokens > 1", frozenset({"max_tokens"})),
        ('deny if input.request["max_tokens"] > 1', frozenset({"max_tokens"})),
        ("deny if { input.request.a.b == 1; input.request.c }", frozenset({"a", "c"})),
        ('deny if input.model == "x"', frozenset()),
        ("deny if { x := input.request; x.a }", None),
        ("deny if { some k; input.request[k] == 1 }", None),
    ],
)
def test_request_keys_analysis(rule, keys):
    compiled = compile_policy(f"package xenovia.policy\n\n{rule}\n", "keys")

    assert compiled.request_keys == keys


@pytest.mark.parametrize(
    ("document", "kind"), [([1, 2], "an array"), ("text", "a string"), (None, "null")]
)
def test_run_policy_test_rejects_non_object(document, kind):
    text, code = run_policy_test(str(POLICIES / "block_dangerous_tools.rego"), document, "request")

    assert code == EXIT_ERROR
    assert text == f"input document must be a JSON object, got {kind}"


def test_run_policy_test_nan_input_is_error():
    text, code = run_policy_test(
        str(POLICIES / "block_dangerous_tools.rego"), {"limit": float("nan")}, "request"
    )

    assert code == EXIT_ERROR
    assert text.startswith("invalid input document: ")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1,2]", "error: input document must be a JSON object, got an array"),
        ("{bad", "is not valid JSON: Expecting property name"),
        ('{"limit": NaN}', "is not valid JSON: NaN is not valid JSON"),
        (None, "error: cannot read input document"),
    ],
)
def test_policy_test_cli_input_errors(tmp_path, content, message):
    input_path = tmp_path / "input.json"
    if content is not None:
        input_path.write_text(content)

    result = run_cli(
        tmp_path, "policy", "test", str(POLICIES / "block_dangerous_tools.rego"),
        "--input", str(input_path), check=False,
    )

    assert result.returncode == EXIT_ERROR
    assert result.stdout == ""
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_policy_test_cli_exit_codes_match_outcome(tmp_path):
    policy_path = str(POLICIES / "block_dangerous_tools.rego")
    blocked = tmp_path / "blocked.json"
    blocked.write_text(json.dumps({"tool_names": ["delete_database"]}))
    allowed = tmp_path / "allowed.json"
    allowed.write_text(json.dumps({"tool_names": ["search_kb"]}))

    block = run_cli(tmp_path, "policy", "test", policy_path, "--input", str(blocked), check=False)
    allow = run_cli(tmp_path, "policy", "test", policy_path, "--input", str(allowed), check=False)

    assert block.returncode == 1
    assert block.stdout.startswith("outcome: block\n")
    assert allow.returncode == 0
    assert allow.stdout == "outcome: allow\n"


def test_policy_test_deep_input_is_error(tmp_path):
    input_path = tmp_path / "deep.json"
    input_path.write_text('{"a": ' + "[" * 2000 + "]" * 2000 + "}")

    document, error = read_input_document(str(input_path))

    assert document is None
    assert error == f"input document {input_path} is nested too deeply to read"


def test_policy_test_cli_deep_input_exits_2(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('{"a":' + "[" * 3000 + "]" * 3000 + "}")

    result = run_cli(
        tmp_path, "policy", "test", str(POLICIES / "block_dangerous_tools.rego"),
        "--input", str(deep), check=False,
    )

    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr


def test_run_policy_test_deep_document_is_error():
    nested: list = []
    for _ in range(3000):
        nested = [nested]

    text, code = run_policy_test(str(POLICIES / "block_dangerous_tools.rego"), {"a": nested}, "request")

    assert code == EXIT_ERROR
    assert text == "invalid input document: nested too deeply"
