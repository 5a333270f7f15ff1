"""
Rego policies for the gateway, evaluated in-process with regorus.

A policy is a Rego module in package `xenovia.policy`. The gateway reads three rules from it:

* `deny`: `true`, or a set of reason strings. A true value or a non-empty set denies.
* `allow`: a boolean. `false` denies. Undefined counts as "not false".
* `redact_fields`: a set of PII kinds (`"email"`, `"ssn"`) to remove from the payload.

`compile_policy` checks a policy's source once, when it is uploaded or loaded (reading the
source itself is `ext_proc.policy_source`'s part). `PolicyEngine` attaches compiled policies
for one proxy and one stage and evaluates them all with one call into regorus per request.

Evaluation fails closed: any error while evaluating, and any rule value of the wrong type,
denies the request.
"""

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence

import regorus

from ext_proc import policy_source
from ext_proc.policy_source import DECISION_RULES, PACKAGE, PolicyCompileError
from ext_proc.redaction import REDACTION_KINDS

__all__ = [
    "STAGES",
    "CompiledPolicy",
    "Decision",
    "PolicyCompileError",
    "PolicyEngine",
    "compile_policy",
    "run_policy_test",
]

logger = logging.getLogger(__name__)

STAGES = ("request", "response")

# Error codes used as the rule part of Decision.rule_id when no policy rule decided.
RULE_ID_INPUT_ERROR = "input.error"
RULE_ID_ENGINE_ERROR = "engine.error"

# With regorus 0.13, each segment of a package path costs about 5 us per evaluation of the
# bench request policy (measured), so attached policies and the decision module get
# one-segment package names.
_DECISION_PACKAGE = "xenovia_decision"
_DECISION_RULE = f"data.{_DECISION_PACKAGE}.decisions"

# Exceptions that must stop the process rather than turn into a deny. Everything else raised
# by regorus is caught, including pyo3's PanicException, which derives from BaseException.
_FATAL = (KeyboardInterrupt, SystemExit)


@dataclasses.dataclass(frozen=True)
class CompiledPolicy:
    """A policy that passed `compile_policy`, ready to attach to a `PolicyEngine`."""

    name: str
    source: str
    sha256: str
    rego_version: str
    module_text: str
    required_fields: frozenset[str] | None
    # Keys of `input.request` the policy reads, when it reads only fixed keys of it; None
    # when it may read the whole body (or any key).
    request_keys: frozenset[str] | None = None
    # Which decision rules the module defines: (rule, "always" | "sometimes") pairs, where
    # "always" means the rule can never be undefined (a partial set, or one with a default).
    # None means unknown, and the engine then treats all three rules as "sometimes".
    decision_rules: tuple[tuple[str, str], ...] | None = None

    @property
    def path(self) -> str:
        """File name shown in error messages."""
        return policy_source.source_path(self.name)


@dataclasses.dataclass(frozen=True)
class Decision:
    """
    The combined decision of every policy attached to an engine.

    `rule_id` is "<policy name>.deny", "<policy name>.allow" or "<policy name>.error" for the
    first enforcing policy that denied, and empty when allowed. `reasons` gathers the `deny`
    strings of every enforcing policy that denied. The `dry_run_*` fields carry the same for
    dry-run policies, which never change `outcome`. `dry_run_denied` is true when the request
    is allowed but a dry-run policy would have denied it. `error` is the first evaluation
    error, from an enforcing policy if any failed. `redact_fields` is the union of the
    enforcing policies' `redact_fields`.
    """

    outcome: str
    reasons: tuple[str, ...] = ()
    rule_id: str = ""
    redact_fields: frozenset[str] = frozenset()
    dry_run_denied: bool = False
    dry_run_rule_id: str = ""
    dry_run_reasons: tuple[str, ...] = ()
    error: str | None = None
    eval_us: float = 0.0

    @property
    def denied(self) -> bool:
        return self.outcome == "deny"



def _validate(policy: CompiledPolicy) -> None:
    """Evaluate the policy once on a minimal input so errors that need no data surface now."""
    engine = PolicyEngine([(policy, False)], "request")
    decision = engine.evaluate(json.dumps({"stage": "request"}))
    if decision.error is None:
        return
    located = policy_source.ONE_LINE_ERROR_RE.match(decision.error)
    if located is None:
        raise PolicyCompileError(policy.path, decision.error)
    line, column, message = located.groups()
    raise PolicyCompileError(policy.path, message, int(line), int(column))


def compile_policy(source: str, name: str) -> CompiledPolicy:
    """
    Parse and check a policy, accepting Rego v1 and the older v0 form.

    The v0 form may use `in`, `if`, `contains` and `every` without importing them. Raises
    PolicyCompileError with the line of the user's text when the policy is invalid, is not in
    package `xenovia.policy`, calls an unknown function (v1 only), or fails on a minimal input.
    """
    path = policy_source.source_path(name)
    engine, rego_version, module_text = policy_source.parse_source(source, path)
    policy_source.reject_self_reference(source, path)
    returned_package = engine.get_packages()
    if returned_package != [f"data.{PACKAGE}"]:
        raise PolicyCompileError(path, f"expected package {PACKAGE}, got {returned_package!r}")
    if rego_version == "v1":
        policy_source.lint_functions(path, module_text)

    ast = json.loads(engine.get_ast_as_json())[0]["ast"]
    policy_source.reject_wrong_decision_values(ast.get("rules", []), path)
    policy = CompiledPolicy(
        name=name,
        source=source,
        sha256=hashlib.sha256(source.encode()).hexdigest(),
        rego_version=rego_version,
        module_text=module_text,
        required_fields=policy_source.input_fields(ast),
        request_keys=policy_source.request_keys(ast),
        decision_rules=policy_source.decision_rules(ast.get("rules", [])),
    )
    _validate(policy)
    return policy


# --- Evaluation ------------------------------------------------------------------------------


_ALLOWED = Decision(outcome="allow")
_EMPTY_SET: set = set()


class _PolicyValueError(ValueError):
    """A decision rule evaluated to a value of the wrong type."""


@dataclasses.dataclass(frozen=True)
class _Attached:
    name: str
    path: str
    dry_run: bool


@dataclasses.dataclass(frozen=True)
class _Verdict:
    rule_id: str = ""
    reasons: tuple[str, ...] = ()
    redact_fields: frozenset[str] = frozenset()
    error: str | None = None


def _attached_package(index: int) -> str:
    return f"xenovia_attached_p{index}"


def _decision_module(policies: Sequence[CompiledPolicy]) -> str:
    """Generate the module whose `decisions` rule lists [deny, allow, redact_fields] per policy."""
    lines = [f"package {_DECISION_PACKAGE}", ""]
    rows = []
    for index, policy in enumerate(policies):
        if policy.decision_rules is None:
            forms = {rule: "sometimes" for rule in DECISION_RULES}
        else:
            forms = dict(policy.decision_rules)
        values = []
        for rule in DECISION_RULES:
            ref = f"data.{_attached_package(index)}.{rule}"
            if rule not in forms:
                values.append("null")
            elif forms[rule] == "always":
                values.append(ref)
            else:
                # An undefined element would make the whole list undefined, so a rule that
                # may be undefined goes through a local rule with a null default.
                local = f"p{index}_{rule}"
                lines += [f"default {local} := null", f"{local} := {ref}"]
                values.append(local)
        rows.append(f"[{', '.join(values)}]")
        lines += [f"p{index} := {rows[-1]}", ""]
    # `decisions` repeats each row in place of referring to p<index>, because every rule
    # level costs a few microseconds per evaluation. The p<index> rules serve the slow path.
    lines.append(f"decisions := [{', '.join(rows)}]")
    return "\n".join(lines) + "\n"


def _deny_reasons(deny: object) -> tuple[bool, tuple[str, ...]]:
    if deny is None or deny is False:
        return False, ()
    if deny is True:
        return True, ()
    if isinstance(deny, set) and all(isinstance(reason, str) for reason in deny):
        return bool(deny), tuple(sorted(deny))
    raise _PolicyValueError(f"deny must be a boolean or a set of strings, got {deny!r:.200}")


def _redact_kinds(redact: object) -> frozenset[str]:
    if redact is None:
        return frozenset()
    if not isinstance(redact, set | list) or not all(isinstance(kind, str) for kind in redact):
        raise _PolicyValueError(f"redact_fields must be a set of strings, got {redact!r:.200}")
    kinds = frozenset(redact)
    unknown = kinds - REDACTION_KINDS
    if unknown:
        # Ignoring an unknown kind would let the data it names through, so it denies instead.
        raise _PolicyValueError(
            f"unknown redact_fields kinds {sorted(unknown)!r}, known: {sorted(REDACTION_KINDS)!r}"
        )
    return kinds


def _plainly_allows(values: list) -> bool:
    """Return True for [deny, allow, redact_fields] that allow with nothing to check further."""
    deny, allow, redact = values
    return (
        (deny is None or deny is False or deny == _EMPTY_SET)
        and (allow is None or allow is True)
        and redact is None
    )


def _verdict(policy: _Attached, values: object) -> _Verdict:
    try:
        deny, allow, redact = values
        denied, reasons = _deny_reasons(deny)
        if allow is not None and not isinstance(allow, bool):
            raise _PolicyValueError(f"allow must be a boolean, got {allow!r:.200}")
        kinds = _redact_kinds(redact)
    except (_PolicyValueError, TypeError, ValueError) as exc:
        return _Verdict(rule_id=f"{policy.name}.error", error=str(exc))
    if denied:
        return _Verdict(f"{policy.name}.deny", reasons, kinds)
    if allow is False:
        return _Verdict(f"{policy.name}.allow", (), kinds)
    return _Verdict(redact_fields=kinds)


def _unique(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _combine(policies: Sequence[_Attached], verdicts: Sequence[_Verdict]) -> Decision:
    enforced = [v for p, v in zip(policies, verdicts, strict=True) if not p.dry_run]
    dry_run = [v for p, v in zip(policies, verdicts, strict=True) if p.dry_run]
    denials = [v for v in enforced if v.rule_id]
    dry_run_denials = [v for v in dry_run if v.rule_id]
    errors = [v.error for v in denials + dry_run_denials if v.error]

    return Decision(
        outcome="deny" if denials else "allow",
        reasons=_unique([reason for v in denials for reason in v.reasons]),
        rule_id=denials[0].rule_id if denials else "",
        redact_fields=frozenset().union(*(v.redact_fields for v in enforced)),
        dry_run_denied=bool(dry_run_denials) and not denials,
        dry_run_rule_id=dry_run_denials[0].rule_id if dry_run_denials else "",
        dry_run_reasons=_unique([reason for v in dry_run_denials for reason in v.reasons]),
        error=errors[0] if errors else None,
    )


class PolicyEngine:
    """
    The policies attached to one proxy for one stage, evaluated together.

    `policies` is a sequence of (CompiledPolicy, dry_run). Each policy is loaded under its own
    package, `xenovia_attached_p<index>`, so rules such as `default allow` never collide, and a
    generated module gathers every policy's `deny`, `allow` and `redact_fields` so that
    `evaluate` makes a single evaluation call.

    Thread affinity: regorus engines may be used only on the thread that created them, and
    they hold the GIL while evaluating. Build one engine per thread (or one per process on
    an asyncio loop) on the thread that will use it. `evaluate` raises RuntimeError when
    called from any other thread.
    """

    def __init__(self, policies: Sequence[tuple[CompiledPolicy, bool]], stage: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage = stage
        self._thread_id = threading.get_ident()
        self._policies = _attach_names(policies)
        self._required_fields = _union_or_none(policy.required_fields for policy, _ in policies)
        self._request_keys = _union_or_none(policy.request_keys for policy, _ in policies)
        self._gathers_prints = any("print(" in policy.module_text for policy, _ in policies)
        self._engine = self._build(policies)
        # A lone policy with nothing but an always-defined `deny` is evaluated by that rule,
        # without the generated module's list around it (about 4 us less per evaluation).
        self._deny_rule = None
        if len(policies) == 1 and policies[0][0].decision_rules == (("deny", "always"),):
            self._deny_rule = f"data.{_attached_package(0)}.deny"

    def _build(self, policies: Sequence[tuple[CompiledPolicy, bool]]) -> regorus.Engine:
        engine = regorus.Engine()
        engine.set_gather_prints(True)
        for index, ((policy, _), attached) in enumerate(zip(policies, self._policies)):
            # The v0/v1 switch applies when a module is parsed, so it is set per module.
            engine.set_rego_v0(policy.rego_version == "v0")
            module = policy_source.renamed_package(policy.module_text, _attached_package(index))
            try:
                engine.add_policy(attached.path, module)
            except RuntimeError as exc:
                raise policy_source.compile_error(attached.path, exc) from None
        engine.set_rego_v0(False)
        engine.add_policy("xenovia_decision.rego", _decision_module([p for p, _ in policies]))
        return engine

    @property
    def request_keys(self) -> frozenset[str] | None:
        """Fixed `input.request` keys every attached policy limits itself to, or None."""
        return self._request_keys

    @property
    def required_fields(self) -> frozenset[str] | None:
        """Top-level input fields the attached policies read, or None when one may read any."""
        return self._required_fields

    @property
    def policy_names(self) -> tuple[str, ...]:
        return tuple(policy.name for policy in self._policies)

    def evaluate(self, input_json: str) -> Decision:
        """Evaluate every attached policy against `input_json`, a JSON object as text."""
        if threading.get_ident() != self._thread_id:
            raise RuntimeError("PolicyEngine used from a thread other than the one that built it")
        start = time.perf_counter()
        decision = self._evaluate(input_json)
        elapsed_us = (time.perf_counter() - start) * 1e6
        if decision is _ALLOWED:
            return Decision(outcome="allow", eval_us=elapsed_us)
        return dataclasses.replace(decision, eval_us=elapsed_us)

    def _evaluate(self, input_json: str) -> Decision:
        if not self._policies:
            return _ALLOWED
        if not input_json.lstrip().startswith("{"):
            return _input_error("input must be a JSON object")
        try:
            self._engine.set_input_json(input_json)
        except _FATAL:
            raise
        except BaseException as exc:  # noqa: BLE001 - fails closed, see _FATAL
            return _input_error(policy_source.one_line_error(exc))

        try:
            if self._deny_rule is None:
                results = self._engine.eval_rule(_DECISION_RULE)
            else:
                results = [[self._engine.eval_rule(self._deny_rule), None, None]]
        except _FATAL:
            raise
        except BaseException as exc:  # noqa: BLE001 - fails closed, see _FATAL
            return self._evaluate_each(exc)
        finally:
            if self._gathers_prints:
                self._drop_prints()
        if not isinstance(results, list) or len(results) != len(self._policies):
            return _engine_error(f"unexpected decision value {results!r:.200}")
        if all(map(_plainly_allows, results)):
            return _ALLOWED
        return _combine(self._policies, [_verdict(p, r) for p, r in zip(self._policies, results)])

    def _evaluate_each(self, first_error: BaseException) -> Decision:
        """Evaluate the policies one by one to find which failed. Runs only after an error."""
        verdicts = []
        for index, policy in enumerate(self._policies):
            try:
                values = self._engine.eval_rule(f"data.{_DECISION_PACKAGE}.p{index}")
            except _FATAL:
                raise
            except BaseException as exc:  # noqa: BLE001 - fails closed, see _FATAL
                error = policy_source.one_line_error(exc)
                verdicts.append(_Verdict(f"{policy.name}.error", error=error))
            else:
                verdicts.append(_verdict(policy, values))
        if not any(verdict.error for verdict in verdicts):
            return _engine_error(policy_source.one_line_error(first_error))
        return _combine(self._policies, verdicts)

    def _drop_prints(self) -> None:
        for line in self._engine.take_prints():
            logger.debug("policy print: %s", line)


def _attach_names(policies: Sequence[tuple[CompiledPolicy, bool]]) -> tuple[_Attached, ...]:
    attached = []
    seen: set[str] = set()
    for index, (policy, dry_run) in enumerate(policies):
        path = policy.path
        # regorus names the failing file in its errors, so each attached file name must be unique.
        if path in seen:
            path = f"{path}#{index}"
        seen.add(path)
        attached.append(_Attached(policy.name, path, dry_run))
    return tuple(attached)


def _union_or_none(sets) -> frozenset[str] | None:
    """Return the union of the sets, or None as soon as one of them is None (meaning any)."""
    union: set[str] = set()
    for items in sets:
        if items is None:
            return None
        union |= items
    return frozenset(union)


def _input_error(message: str) -> Decision:
    return Decision(outcome="deny", rule_id=RULE_ID_INPUT_ERROR, error=message)


def _engine_error(message: str) -> Decision:
    return Decision(outcome="deny", rule_id=RULE_ID_ENGINE_ERROR, error=message)


# --- `xenovia policy test` -------------------------------------------------------------------

_OUTCOME_NAMES = {
    "request": {"allow": "allow", "deny": "block", "redact": "redact"},
    "response": {"allow": "allow", "deny": "block_response", "redact": "redact_response"},
}


def gateway_outcome(decision: Decision, stage: str) -> str:
    """Name a decision as the gateway does: allow, block, redact, or the `_response` forms."""
    if decision.denied:
        key = "deny"
    elif decision.redact_fields:
        key = "redact"
    else:
        key = "allow"
    return _OUTCOME_NAMES[stage][key]


def _format_decision(decision: Decision, stage: str) -> str:
    lines = [f"outcome: {gateway_outcome(decision, stage)}"]
    if decision.rule_id:
        lines.append(f"rule: {decision.rule_id}")
    lines.extend(f"reason: {reason}" for reason in decision.reasons)
    if decision.redact_fields:
        lines.append(f"redact_fields: {', '.join(sorted(decision.redact_fields))}")
    if decision.error:
        lines.append(f"error: {decision.error}")
    return "\n".join(lines)


EXIT_ALLOW = 0
EXIT_BLOCK = 1
EXIT_ERROR = 2


def read_input_document(path: str) -> tuple[object, str | None]:
    """
    Read the JSON input document of `xenovia policy test` from the file at `path`.

    Returns the document and None, or None and a one-line error message when the file cannot
    be read, is not valid JSON (NaN and Infinity are rejected) or is nested too deeply for
    Python's JSON parser.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle, parse_constant=_reject_json_constant), None
    except OSError as exc:
        return None, f"cannot read input document {path}: {exc}"
    except ValueError as exc:
        return None, f"input document {path} is not valid JSON: {exc}"
    except RecursionError:
        return None, f"input document {path} is nested too deeply to read"


def _reject_json_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def run_policy_test(path: str, input_doc: object, stage: str) -> tuple[str, int]:
    """
    Evaluate the policy file at `path` on one input document, as `xenovia policy test` does.

    Returns printable text and an exit code: EXIT_ALLOW (0) for allow or redact, EXIT_BLOCK (1)
    for block, and EXIT_ERROR (2) with an error message when the file cannot be read or does
    not compile, or the input document is not a JSON object the engine accepts.
    `input_doc["stage"]` defaults to `stage`.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if not isinstance(input_doc, dict):
        return f"input document must be a JSON object, got {_json_type_name(input_doc)}", EXIT_ERROR
    try:
        with open(path, encoding="utf-8") as policy_file:
            source = policy_file.read()
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read {path}: {exc}", EXIT_ERROR
    try:
        policy = compile_policy(source, os.path.basename(path).removesuffix(".rego"))
    except PolicyCompileError as exc:
        return f"policy does not compile: {exc}", EXIT_ERROR

    document = {"stage": stage, **input_doc}
    try:
        input_json = json.dumps(document)
    except RecursionError:
        return "invalid input document: nested too deeply", EXIT_ERROR
    decision = PolicyEngine([(policy, False)], stage).evaluate(input_json)
    if decision.rule_id == RULE_ID_INPUT_ERROR:
        # The gateway blocks such a call (fails closed), but here the input file is at fault.
        return f"invalid input document: {decision.error}", EXIT_ERROR
    return _format_decision(decision, stage), EXIT_BLOCK if decision.denied else EXIT_ALLOW


def _json_type_name(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
