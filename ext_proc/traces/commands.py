"""``xenovia traces ...``: list, show, sessions, stats and sql over the trace store.

The commands read through the running collector when its socket answers, else open the
store themselves. ``--json`` prints JSON with the platform's field names: one object per
line for ``list``, ``sessions`` and ``sql``, one object for ``show`` and ``stats``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import uuid
from collections.abc import Callable

from ext_proc.traces import home_path
from ext_proc.traces.queries import (
    POLICY_OUTCOMES,
    CollectorReader,
    ReaderError,
    TraceFilters,
    list_traces_sql,
    open_reader,
    parse_time,
    sessions_sql,
    show_trace_sql,
    single_statement,
    stats_sql,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NOT_FOUND = 3
_QUANTILES = ("p50", "p95", "p99")
_QUANTILES_SUFFIX = "_quantiles"
# A trace reaches the store about a second after its response, because the exporter sends
# every 0.5 s and the collector writes in batches. `show` waits up to this long for a trace
# id that it does not find yet.
SHOW_WAIT_S = 3.0
_SHOW_POLL_S = 0.25
# Table cells longer than this are cut, since custom property values can have 512
# characters. --json prints them whole.
MAX_CELL_CHARS = 60


def add_traces_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``traces`` and its subcommands; each sets ``handler(args) -> exit code``."""
    traces = subparsers.add_parser("traces", help="query stored traces")
    # SUPPRESS keeps a --home given before `traces` (xenovia --home DIR traces ...) from
    # being reset to None by this parser's default.
    traces.add_argument("--home", default=argparse.SUPPRESS,
                        help="home folder (default: $XENOVIA_HOME or ./.xenovia)")
    commands = traces.add_subparsers(dest="traces_command", required=True)

    listing = commands.add_parser("list", help="recent traces, newest first")
    listing.add_argument("--session", help="session id (UUID)")
    listing.add_argument("--proxy", help="proxy id")
    listing.add_argument("--property", action="append", default=[], metavar="KEY=VALUE",
                         help="custom property equal to VALUE; repeat to require several")  # fmt: skip
    listing.add_argument("--model", help="requested or served model")
    listing.add_argument(
        "--outcome",
        choices=POLICY_OUTCOMES,
        help="policy outcome; a dry-run denial is recorded as allow, with its would-be "
             "outcome in dry_run_outcome",
    )
    listing.add_argument("--status", type=int, help="HTTP status code")
    _add_time_range(listing)
    listing.add_argument(
        "--limit", type=_positive_int, default=20, help="maximum rows (default 20)"
    )
    _add_json(listing)
    listing.set_defaults(handler=run_list)

    show = commands.add_parser("show", help="one trace and its steps")
    show.add_argument("trace_id")
    _add_json(show)
    show.set_defaults(handler=run_show)

    sessions = commands.add_parser("sessions", help="sessions with turns, tokens and cost")
    sessions.add_argument("--proxy", help="proxy id")
    sessions.add_argument(
        "--limit", type=_positive_int, default=20, help="maximum rows (default 20)"
    )
    _add_json(sessions)
    sessions.set_defaults(handler=run_sessions)

    stats = commands.add_parser("stats", help="latency, cost and block rate summaries")
    stats.add_argument("--proxy", help="proxy id")
    _add_time_range(stats)
    _add_json(stats)
    stats.set_defaults(handler=run_stats)

    sql = commands.add_parser(
        "sql",
        help="run a read-only SQL query on the trace store",
        description="Run one read-only query (SELECT, SHOW, DESCRIBE, EXPLAIN) on the trace "
                    "store, through the collector while the gateway runs. Writes and "
                    "settings changes are rejected.",
    )
    sql.add_argument("query", help='the query, e.g. "SELECT * FROM trace_latency_by_model"')
    _add_json(sql)
    sql.set_defaults(handler=run_sql)
    return traces


def _add_time_range(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", help="start: a duration ago (30m, 1h, 2d) or an ISO 8601 time")
    parser.add_argument("--until", help="end (exclusive): a duration ago or an ISO 8601 time")


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _filters(args: argparse.Namespace) -> TraceFilters:
    properties = []
    for item in getattr(args, "property", []):
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise ValueError(f"invalid --property {item!r}: expected KEY=VALUE")
        # Property names arrive as HTTP header names, which Envoy lower-cases.
        properties.append((key.lower(), value))
    since, until = getattr(args, "since", None), getattr(args, "until", None)
    return TraceFilters(
        session=getattr(args, "session", None),
        proxy=getattr(args, "proxy", None),
        properties=properties,
        model=getattr(args, "model", None),
        outcome=getattr(args, "outcome", None),
        status=getattr(args, "status", None),
        since_us=parse_time(since) if since else None,
        until_us=parse_time(until) if until else None,
    )


def _run(args: argparse.Namespace, body: Callable) -> int:
    try:
        filters = _filters(args)
        reader = open_reader(home_path(getattr(args, "home", None)))
    except (ValueError, ReaderError) as exc:
        print(f"xenovia traces: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        return body(reader, filters)
    except ReaderError as exc:
        print(f"xenovia traces: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        reader.close()


def run_list(args: argparse.Namespace) -> int:
    def body(reader, filters):
        names, rows = reader.query(*list_traces_sql(filters, args.limit, all_columns=args.json))
        if args.json:
            _print_json_lines(names, rows)
        else:
            print(format_table(names, rows))
        return EXIT_OK

    return _run(args, body)


def run_show(args: argparse.Namespace) -> int:
    def body(reader, filters):
        trace_query, steps_query = show_trace_sql(args.trace_id)
        names, rows = reader.query(*trace_query)
        # Only a running collector can still be writing the trace.
        if not rows and isinstance(reader, CollectorReader) and _is_uuid(args.trace_id):
            names, rows = _wait_for_trace(reader, trace_query)
        if not rows:
            print(
                f"xenovia traces: trace {args.trace_id} not found. A trace reaches the store"
                " a second or two after its response, so if the call just ended, try again",
                file=sys.stderr,
            )
            return EXIT_NOT_FOUND
        trace = dict(zip(names, rows[0]))
        step_names, step_rows = reader.query(*steps_query)
        trace["steps"] = [dict(zip(step_names, row)) for row in step_rows]
        if args.json:
            print(json.dumps(trace, ensure_ascii=False))
        else:
            print(format_trace_tree(trace))
        return EXIT_OK

    return _run(args, body)


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _wait_for_trace(reader, trace_query) -> tuple[list[str], list[list]]:
    """Query again until the trace is stored or SHOW_WAIT_S has passed."""
    deadline = time.monotonic() + SHOW_WAIT_S
    names: list[str] = []
    rows: list[list] = []
    while not rows and time.monotonic() < deadline:
        time.sleep(_SHOW_POLL_S)
        names, rows = reader.query(*trace_query)
    return names, rows


def run_sessions(args: argparse.Namespace) -> int:
    def body(reader, filters):
        names, rows = reader.query(*sessions_sql(filters, args.limit))
        if args.json:
            _print_json_lines(names, rows)
        else:
            print(format_table(names, rows))
        return EXIT_OK

    return _run(args, body)


def run_stats(args: argparse.Namespace) -> int:
    def body(reader, filters):
        sections = {}
        for section, query in stats_sql(filters).items():
            names, rows = reader.query(*query)
            sections[section] = [_flatten_quantiles(dict(zip(names, row))) for row in rows]
        if args.json:
            print(json.dumps(sections, ensure_ascii=False))
            return EXIT_OK
        for section, records in sections.items():
            print(f"== {section.replace('_', ' ')}")
            if records:
                names = list(records[0])
                print(format_table(names, [[record[name] for name in names] for record in records]))
            else:
                print("(no data)")
            print()
        return EXIT_OK

    return _run(args, body)


def run_sql(args: argparse.Namespace) -> int:
    try:
        statement = single_statement(args.query)
    except ValueError as exc:
        print(f"xenovia traces: {exc}", file=sys.stderr)
        return EXIT_FAILED

    def body(reader, filters):
        names, rows = reader.query(statement, {})
        if args.json:
            _print_json_lines(names, rows)
        elif not rows:
            print("(no rows)")
        else:
            print(format_table(names, rows))
        return EXIT_OK

    return _run(args, body)


def _flatten_quantiles(record: dict) -> dict:
    flat = {}
    for name, value in record.items():
        if name.endswith(_QUANTILES_SUFFIX):
            base = name.removesuffix(_QUANTILES_SUFFIX)
            for quantile, item in zip(_QUANTILES, value):
                flat[f"{base}_{quantile}"] = item
        else:
            flat[name] = value
    return flat


def _print_json_lines(names: list[str], rows: list[list]) -> None:
    for row in rows:
        print(json.dumps(dict(zip(names, row)), ensure_ascii=False))


def _is_duration(name: str) -> bool:
    """Tell whether a column contains milliseconds: latency_ms, ttft_ms_p95, policy_ms, ..."""
    return name.endswith("_ms") or "_ms_" in name


def _cell(value, name: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and _is_duration(name):
        return f"{value:.2f}"
    if isinstance(value, float):
        return _fraction(value) if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _fraction(value: float) -> str:
    """Format a value under 1 with at least 6 decimals and 3 significant digits, so a cost
    of 2e-08 USD prints as 0.00000002, not 0."""
    if value == 0 or not math.isfinite(value):
        return str(value).removesuffix(".0")
    decimals = min(max(6, 3 - math.floor(math.log10(abs(value)))), 15)
    text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    return text if text.strip("-0.") else f"{value:.3g}"


def _cut(text: str) -> str:
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 3] + "..."


def format_table(names: list[str], rows: list[list]) -> str:
    """Return rows as text columns aligned under their names, with long cells cut."""
    cells = [[_cut(_cell(value, name)) for value, name in zip(row, names)] for row in rows]
    widths = [len(name) for name in names]
    for row in cells:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row)]
    lines = ["  ".join(name.ljust(width) for name, width in zip(names, widths)).rstrip()]
    for row in cells:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)


_TRACE_SUMMARY = (
    "timestamp", "proxy_id", "session_id", "session_turn", "model", "model_served", "status",
    "policy_outcome", "policy_rule_id", "policy_reason", "dry_run_outcome", "latency_ms",
    "ttft_ms", "tokens_in", "tokens_out", "cost_usd", "error_type", "custom_properties",
)  # fmt: skip


def format_trace_tree(trace: dict) -> str:
    """Return the trace as a header and its steps as a tree; tool results sit under their call."""
    lines = [f"trace {trace['trace_id']}"]
    lines += [f"  {name}: {_cell(trace.get(name), name)}" for name in _TRACE_SUMMARY if name in trace]
    steps = trace["steps"]
    calls = {s["call_id"] for s in steps if s.get("step_type") == "tool_call" and s.get("call_id")}
    children: dict[str, list[dict]] = {}
    top = []
    for step in steps:
        if step.get("step_type") == "tool_result" and step.get("call_id") in calls:
            children.setdefault(step["call_id"], []).append(step)
        else:
            top.append(step)
    for index, step in enumerate(top):
        last = index == len(top) - 1
        lines.append(("└─ " if last else "├─ ") + _step_label(step))
        nested = (
            children.get(step.get("call_id"), []) if step.get("step_type") == "tool_call" else []
        )
        for child_index, child in enumerate(nested):
            branch = "└─ " if child_index == len(nested) - 1 else "├─ "
            lines.append(("   " if last else "│  ") + branch + _step_label(child))
    return "\n".join(lines)


def _step_label(step: dict) -> str:
    label = f"{step.get('step_type')} {step.get('name') or ''}".rstrip()
    details = [f"{_cell(step.get('latency_ms'), 'latency_ms')} ms", step.get("status") or ""]
    if step.get("tool_name"):
        details.append(f"tool={step['tool_name']}")
    if step.get("call_id"):
        details.append(f"call_id={step['call_id']}")
    return f"{label} [{', '.join(item for item in details if item)}]"
