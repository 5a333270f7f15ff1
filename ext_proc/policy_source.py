"""
Reading a policy's Rego source: its dialect, its package, its errors, the input it reads.

Policies come in Rego v1 and in the older v0 form. ``parse_source`` loads either, and the
analysis functions read the parsed module's AST to find the top-level input fields and the
fixed ``input.request`` keys a policy reads, so that the gateway can send it less, and which
decision rules it defines. ``PolicyCompileError`` carries the user's file, line and column.
"""

import logging
import re

import regorus

logger = logging.getLogger(__name__)

PACKAGE = "xenovia.policy"
DECISION_RULES = ("deny", "allow", "redact_fields")

_PACKAGE_RE = re.compile(r"^[ \t]*package[ \t]+([^\s#]+)", re.MULTILINE)
_REGO_V1_IMPORT_RE = re.compile(r"^[ \t]*import[ \t]+rego\.v1\b", re.MULTILINE)
_ERROR_LOCATION_RE = re.compile(r"-->\s*(.+?):(\d+):(\d+)")
# The one-line form `one_line_error` produces: "file:line:column: message".
ONE_LINE_ERROR_RE = re.compile(r"^.+?:(\d+):(\d+): (.*)$", re.DOTALL)
_ERROR_MESSAGE_RE = re.compile(r"^error:\s*(.*?)(?:\n\s*\n|\Z)", re.MULTILINE | re.DOTALL)
# Strings and comments are dropped before looking for v1 keywords, so `contains(` (the
# built-in function) and words inside strings do not count.
_STRINGS_AND_COMMENTS_RE = re.compile(r'"(?:\\.|[^"\\\n])*"|`[^`]*`|#[^\n]*')
_V1_KEYWORD_RE = re.compile(r"\bif\b|\bcontains\b(?!\s*\()")
_SELF_REFERENCE_RE = re.compile(r"\bdata\.xenovia\.policy\b")


class PolicyCompileError(ValueError):
    """A policy that cannot be loaded. `line` and `column` are 1-based, or None when unknown."""

    def __init__(
        self, path: str, message: str, line: int | None = None, column: int | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.message = message
        self.line = line
        self.column = column

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"



def source_path(name: str) -> str:
    """Return the file name shown in error messages for a policy called ``name``."""
    return name if name.endswith(".rego") else f"{name}.rego"


def _parse_regorus_error(text: str) -> tuple[str | None, int | None, int | None, str]:
    """Split regorus's error text into (file, line, column, message)."""
    location = _ERROR_LOCATION_RE.search(text)
    message = _ERROR_MESSAGE_RE.search(text)
    message_text = message.group(1).strip() if message else text.strip()
    if location is None:
        return None, None, None, message_text
    return location.group(1), int(location.group(2)), int(location.group(3)), message_text


def one_line_error(exc: BaseException) -> str:
    """Format a regorus error as "file:line:column: message", or its message alone."""
    path, line, column, message = _parse_regorus_error(str(exc))
    if line is None:
        return message or type(exc).__name__
    return f"{path}:{line}:{column}: {message}"


def compile_error(path: str, exc: BaseException) -> PolicyCompileError:
    """Turn a regorus error into a PolicyCompileError with its line and column."""
    _, line, column, message = _parse_regorus_error(str(exc))
    return PolicyCompileError(path, message, line, column)


# --- Source handling -------------------------------------------------------------------------


def _find_package(source: str, path: str) -> re.Match[str]:
    match = _PACKAGE_RE.search(source)
    if match is None:
        raise PolicyCompileError(
            path, f"missing package declaration: the first statement must be `package {PACKAGE}`"
        )
    if match.group(1) != PACKAGE:
        line = source.count("\n", 0, match.start()) + 1
        raise PolicyCompileError(
            path,
            f"invalid package {match.group(1)!r}: a policy must declare `package {PACKAGE}`",
            line,
        )
    return match


def _with_future_keywords(source: str, package: re.Match[str]) -> str:
    # The import goes on the package line itself so the user's line numbers stay valid.
    if _REGO_V1_IMPORT_RE.search(source):
        return source
    end = package.end()
    return f"{source[:end]} import future.keywords{source[end:]}"


def renamed_package(module_text: str, package: str) -> str:
    """Return the module with its `xenovia.policy` package declaration renamed to ``package``."""
    match = _PACKAGE_RE.search(module_text)
    if match is None or match.group(1) != PACKAGE:
        raise ValueError(f"module does not declare package {PACKAGE}")
    return f"{module_text[: match.start(1)]}{package}{module_text[match.end(1) :]}"


def _uses_v1_keywords(source: str) -> bool:
    return _V1_KEYWORD_RE.search(_STRINGS_AND_COMMENTS_RE.sub(" ", source)) is not None


def reject_self_reference(source: str, path: str) -> None:
    """Raise PolicyCompileError when the policy refers to its own rules through data."""
    # Attached policies are moved to packages of their own, where `data.xenovia.policy` no
    # longer exists, so such a reference would turn undefined and could let requests through.
    code = _STRINGS_AND_COMMENTS_RE.sub(lambda match: " " * len(match.group()), source)
    match = _SELF_REFERENCE_RE.search(code)
    if match is not None:
        line = source.count("\n", 0, match.start()) + 1
        message = f"refer to rules of this policy by name, not through data.{PACKAGE}"
        raise PolicyCompileError(path, message, line)


# --- Compilation -----------------------------------------------------------------------------


def _load_module(path: str, text: str, rego_v0: bool) -> regorus.Engine:
    engine = regorus.Engine()
    engine.set_rego_v0(rego_v0)
    engine.add_policy(path, text)
    return engine


def parse_source(source: str, path: str) -> tuple[regorus.Engine, str, str]:
    """Load `source` as Rego v1, else as v0 with future keywords; return (engine, version, text)."""
    package = _find_package(source, path)
    try:
        return _load_module(path, source, rego_v0=False), "v1", source
    except RuntimeError as exc:
        v1_error = exc

    module_text = _with_future_keywords(source, package)
    try:
        return _load_module(path, module_text, rego_v0=True), "v0", module_text
    except RuntimeError as exc:
        v0_error = exc

    raise compile_error(path, v1_error if _uses_v1_keywords(source) else v0_error)


def lint_functions(path: str, module_text: str) -> None:
    """Reject calls to unknown functions, which regorus otherwise reports only when reached."""
    # The RVM compiler resolves every function it compiles, but it accepts only Rego v1 and
    # compiles only what an entry point reaches, hence one compile per decision rule.
    for rule in DECISION_RULES:
        try:
            regorus.Program.compile_from_modules(
                "{}", [(path, module_text)], [f"data.{PACKAGE}.{rule}"]
            )
        except RuntimeError as exc:
            if "Unknown function" in str(exc):
                raise compile_error(path, exc) from None
            # Anything else (an absent rule, a construct the RVM lacks) is left to the
            # interpreter, which is what evaluates requests.
            logger.debug("RVM lint of %s skipped for %s: %s", path, rule, one_line_error(exc))


def input_fields(node: object) -> frozenset[str] | None:
    """Return the top-level `input.<field>` names an AST references, or None if not only those."""
    fields: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        for key, value in item.items():
            if key == "Var" and isinstance(value, dict) and value.get("value") == "input":
                return None
            if key in ("RefDot", "RefBrack") and _is_input_var(value.get("refr")):
                field = _ref_field(key, value)
                if field is None:
                    return None
                fields.add(field)
                if key == "RefBrack":
                    stack.append(value.get("index"))
                continue
            stack.append(value)
    return frozenset(fields)


def request_keys(node: object) -> frozenset[str] | None:
    """Return the fixed keys read under `input.request`, or None if it is read any other way.

    Every `input.request` reference must be the base of a `.key` or `["key"]` reference;
    `input.request[x]` with a variable, or `input.request` on its own, gives None.
    """
    keys: set[str] = set()
    bases = 0
    uses = 0
    for item in _ast_objects(node):
        if _is_input_request(item):
            uses += 1
        for kind in ("RefDot", "RefBrack"):
            ref = item.get(kind)
            if isinstance(ref, dict) and _is_input_request(ref.get("refr")):
                key = _ref_field(kind, ref)
                if key is None:
                    return None
                keys.add(key)
                bases += 1
    return frozenset(keys) if uses == bases else None


def _ast_objects(node: object):
    """Yield every JSON object of an AST, depth first."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            yield item
            stack.extend(value for value in item.values() if isinstance(value, (dict, list)))


def _is_input_request(node: object) -> bool:
    if not isinstance(node, dict) or "RefDot" not in node:
        return False
    ref = node["RefDot"]
    return _is_input_var(ref.get("refr")) and _ref_field("RefDot", ref) == "request"


def _is_input_var(node: object) -> bool:
    return isinstance(node, dict) and node.get("Var", {}).get("value") == "input"


def _ref_field(kind: str, ref: dict) -> str | None:
    if kind == "RefDot":
        field = ref.get("field")
        return field[1] if isinstance(field, list) and len(field) == 2 else None
    index = ref.get("index")
    if isinstance(index, dict) and "String" in index:
        return index["String"].get("value")
    return None


def _head_name(rule: dict) -> tuple[str | None, str]:
    """Return the name a rule defines and its form: "default", "set" or "other"."""
    if "Default" in rule:
        node, form = rule["Default"].get("refr"), "default"
    else:
        head = rule.get("Spec", {}).get("head", {})
        form = "set" if "Set" in head else "other"
        node = next(iter(head.values()), {}).get("refr")
    while isinstance(node, dict) and "Var" not in node:
        node = node.get("RefDot", node.get("RefBrack", {})).get("refr")
    if not isinstance(node, dict):
        return None, form
    return node["Var"].get("value"), form


# AST nodes of literal values, and how an error names them.
_LITERALS = {
    "String": "a string", "RawString": "a string", "Number": "a number", "Null": "null",
    "Bool": "a boolean", "Array": "an array", "ArrayCompr": "an array", "Set": "a set",
    "SetCompr": "a set", "Object": "an object", "ObjectCompr": "an object",
}
_ACCEPTED_LITERALS = {"deny": ("Bool", "Set", "SetCompr"), "allow": ("Bool",)}
_EXPECTED = {"deny": "a boolean or a set of strings", "allow": "a boolean"}


def reject_wrong_decision_values(rules: list, path: str) -> None:
    """Raise PolicyCompileError when `deny` or `allow` is given a literal of the wrong type.

    Values that are not literals (references, calls) are checked when they are evaluated.
    """
    for rule in rules:
        name, _ = _head_name(rule)
        if name not in _ACCEPTED_LITERALS:
            continue
        head = rule.get("Spec", {}).get("head", {})
        if "Default" in rule:
            value, accepted = rule["Default"].get("value"), _ACCEPTED_LITERALS[name]
        elif "Set" in head:
            # `deny contains <reason>`: each reason must be a string.
            value, accepted = head["Set"].get("key"), ("String", "RawString")
        else:
            value = (next(iter(head.values()), {}).get("assign") or {}).get("value")
            accepted = _ACCEPTED_LITERALS[name]
        kind = next(iter(value), None) if isinstance(value, dict) else None
        if kind not in _LITERALS or kind in accepted:
            continue
        span = value[kind].get("span", {})
        if "Set" in head:
            message = f"each reason of {name} must be a string, got {_LITERALS[kind]}"
        else:
            message = f"{name} must be {_EXPECTED[name]}, got {_LITERALS[kind]}"
        raise PolicyCompileError(path, message, span.get("line"), span.get("col"))


def decision_rules(rules: list) -> tuple[tuple[str, str], ...]:
    """Return (rule, "always" | "sometimes") for each decision rule the module's AST defines."""
    forms: dict[str, set[str]] = {}
    for rule in rules:
        name, form = _head_name(rule)
        if name in DECISION_RULES:
            forms.setdefault(name, set()).add(form)
    result = []
    for name in DECISION_RULES:
        if name in forms:
            always = "default" in forms[name] or forms[name] == {"set"}
            result.append((name, "always" if always else "sometimes"))
    return tuple(result)
