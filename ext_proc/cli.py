"""The ``xenovia`` command line.

Scripts depend on these forms: ``proxy create`` prints only the proxy id and ``key create``
only the key, on stdout; everything else a command has to say goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from ext_proc import home as home_paths
from ext_proc import keys, policy
from ext_proc.registry import (
    BODY_MODES,
    DEFAULT_BODY_LIMIT,
    STAGES,
    STREAM_POLICY_MODES,
    RegistryEditor,
    RegistryError,
)
from ext_proc.upstream import UpstreamError

logger = logging.getLogger(__name__)

# The status a shell reports for a process killed by SIGPIPE (128 + 13). Python ignores
# SIGPIPE, so a closed stdout raises BrokenPipeError instead and main() returns this.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _editor(args) -> RegistryEditor:
    return RegistryEditor(home_paths.home_dir(getattr(args, "home", None)))


def _print_json_lines(rows: list[dict]) -> int:
    for row in rows:
        print(json.dumps(row, sort_keys=True))
    return 0


def cmd_up(args) -> int:
    from ext_proc.supervisor import GatewayProcesses, StartupError, envoy_endpoint_address

    if args.ext_proc_port is not None and args.ext_proc_transport != "tcp":
        print("error: --ext-proc-port needs --ext-proc-transport tcp", file=sys.stderr)
        return 2
    if args.ext_proc_port is not None and args.ext_proc_port + args.workers - 1 > 65535:
        print(f"error: --ext-proc-port {args.ext_proc_port} leaves no port for each of "
              f"{args.workers} workers (worker i uses port + i)", file=sys.stderr)
        return 2
    home = home_paths.home_dir(getattr(args, "home", None))
    gateway = GatewayProcesses(home, args.port, args.admin_port, args.workers, args.listen,
                               args.ext_proc_transport, envoy=not args.no_envoy,
                               ext_proc_port=args.ext_proc_port)
    try:
        gateway.start()
    except StartupError as exc:
        logger.error("%s", exc)
        gateway.stop()
        return 1
    if args.no_envoy:
        print("List these endpoints under lb_endpoints of the xenovia_ext_proc cluster in your "
              "Envoy config (indented as in the clusters part of envoy/envoy.yaml):",
              file=sys.stderr)
        for endpoint in gateway.ext_proc_endpoints:
            print(f"        - endpoint: {{ address: {{ {envoy_endpoint_address(endpoint)} }} }}",
                  file=sys.stderr)
        print(f"Xenovia ext_proc workers and trace collector running without Envoy (home {home}); "
              "Ctrl-C stops them", file=sys.stderr, flush=True)
    else:
        print(f"Xenovia gateway listening on http://{args.listen}:{args.port} (home {home}); "
              "Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        return gateway.wait()
    finally:
        gateway.stop()


def cmd_proxy_create(args) -> int:
    proxy_id = _editor(args).create_proxy(
        name=args.name,
        upstream_url=args.upstream_url,
        upstream_key_env=args.upstream_key_env,
        org_id=args.org,
        environment=args.environment,
        provider=args.provider,
        stream_policy_mode=args.stream_policy_mode,
        body_mode=args.body_mode,
        body_limit=args.body_limit,
    )
    print(proxy_id)
    return 0


# Values a proxy entry has when it does not list the field (see registry._parse_proxy).
PROXY_FIELD_DEFAULTS = {"stream_policy_mode": "hold", "body_mode": "full",
                        "body_limit": DEFAULT_BODY_LIMIT}


def cmd_proxy_update(args) -> int:
    editor = _editor(args)
    changes = {
        "name": args.name,
        "upstream_url": args.upstream_url,
        "upstream_key_env": args.upstream_key_env,
        "stream_policy_mode": args.stream_policy_mode,
        "body_mode": args.body_mode,
        "body_limit": args.body_limit,
    }
    changes = {field: value for field, value in changes.items() if value is not None}
    if not changes:
        print("error: nothing to update; pass an option such as --name or --stream-policy-mode "
              "(see `xenovia proxy update --help`)", file=sys.stderr)
        return 2
    before = next((proxy for proxy in editor.list_proxies() if proxy["id"] == args.proxy_id), {})
    editor.update_proxy(args.proxy_id, **changes)
    described = []
    for field, value in changes.items():
        old = before.get(field, PROXY_FIELD_DEFAULTS.get(field))
        if old == value:
            described.append(f"{field} {value!r} (unchanged)")
        else:
            described.append(f"{field} {'unset' if old is None else repr(old)} -> {value!r}")
    print(f"updated proxy {args.proxy_id}: {', '.join(described)}", file=sys.stderr)
    return 0


def cmd_proxy_delete(args) -> int:
    deletion = _editor(args).delete_proxy(args.proxy_id)
    count = len(deletion.removed_policy_files)
    print(f"deleted proxy {deletion.proxy_id} and {count} policy file{'' if count == 1 else 's'}",
          file=sys.stderr)
    if deletion.updated_key_ids:
        print(f"removed {deletion.proxy_id} from keys {', '.join(deletion.updated_key_ids)}",
              file=sys.stderr)
    for key_id in deletion.keys_without_proxy:
        print(f"key {key_id} is now scoped to no proxy and can call nothing; "
              f"revoke it with `xenovia key revoke {key_id}`", file=sys.stderr)
    return 0


def cmd_proxy_list(args) -> int:
    proxies = _editor(args).list_proxies()
    if args.json:
        return _print_json_lines(proxies)
    print(f"{'ID':<22} {'NAME':<20} {'ORG':<14} {'ENV':<8} {'POLICIES':<18} UPSTREAM")
    for proxy in proxies:
        # Registries written before detach dropped empty stages may still list one as [].
        attached = proxy.get("policies", {})
        stages = ",".join(sorted(stage for stage, policies in attached.items() if policies)) or "-"
        print(f"{proxy['id']:<22} {proxy['name'][:20]:<20} {proxy.get('org_id', '')[:14]:<14} "
              f"{proxy.get('environment', '')[:8]:<8} {stages:<18} {proxy['upstream_url']}")
    return 0


def cmd_key_create(args) -> int:
    key = keys.generate_key()
    key_id = _editor(args).create_key(args.proxy, keys.hash_key(key))
    # The id goes out first, so that a key whose output pipe was closed can still be revoked.
    print(f"created key {key_id} for {', '.join(args.proxy)}; it is shown only once",
          file=sys.stderr, flush=True)
    print(key)
    return 0


def cmd_key_revoke(args) -> int:
    if args.key_id.startswith(keys.KEY_PREFIX):
        print("error: key revoke takes a key id (key_...), not the key itself; "
              "see `xenovia key list`", file=sys.stderr)
        return 2
    _editor(args).revoke_key(args.key_id)
    print(f"revoked {args.key_id}", file=sys.stderr)
    return 0


def cmd_key_list(args) -> int:
    entries = _editor(args).list_keys()
    if args.json:
        return _print_json_lines(entries)
    print(f"{'ID':<22} {'CREATED':<21} {'REVOKED':<21} PROXIES")
    for entry in entries:
        print(f"{entry['id']:<22} {entry.get('created_at', ''):<21} "
              f"{entry.get('revoked_at', '-'):<21} {','.join(entry['proxies']) or '-'}")
    return 0


def cmd_policy_attach(args) -> int:
    path = Path(args.file)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: policy not attached, cannot read {path}: {exc}", file=sys.stderr)
        return 2
    try:
        compiled = policy.compile_policy(source, path.name)
    except policy.PolicyCompileError as exc:
        print(f"error: policy not attached, it does not compile: {exc}", file=sys.stderr)
        return 2
    # The policy's name (the file name without .rego) prefixes the rule ids in traces, and
    # attaching a policy of the same name replaces it.
    name = args.name or path.stem
    replaced = _editor(args).attach_policy(
        args.proxy, args.stage, name, source, compiled.sha256, args.dry_run
    )
    verb = "replaced" if replaced else "attached"
    mode = " in dry-run mode" if args.dry_run else ""
    print(f"{verb} policy {name} on {args.proxy} at the {args.stage} stage{mode}", file=sys.stderr)
    return 0


def cmd_policy_detach(args) -> int:
    removed = _editor(args).detach_policy(args.proxy, args.stage, args.name)
    print(f"detached {', '.join(removed)} from {args.proxy} at the {args.stage} stage", file=sys.stderr)
    return 0


def cmd_policy_list(args) -> int:
    editor = _editor(args)
    known = {proxy["id"] for proxy in editor.list_proxies()}
    if args.proxy is not None and args.proxy not in known:
        raise RegistryError(f"proxy {args.proxy!r} not found; see `xenovia proxy list`")
    rows = editor.list_policies(args.proxy)
    if args.json:
        return _print_json_lines(rows)
    print(f"{'PROXY':<22} {'STAGE':<9} {'NAME':<32} {'MODE':<8} ATTACHED")
    for row in rows:
        mode = "dry-run" if row.get("dry_run") else "enforce"
        print(f"{row['proxy_id']:<22} {row['stage']:<9} {row['name']:<32} {mode:<8} "
              f"{row.get('attached_at', '')}")
    return 0


def cmd_policy_test(args) -> int:
    document, error = policy.read_input_document(args.input)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return policy.EXIT_ERROR
    text, status = policy.run_policy_test(args.file, document, args.stage)
    if status == policy.EXIT_ERROR:
        print(f"error: {text}", file=sys.stderr)
    else:
        print(text)
    return status


def _port(lowest: int):
    """Return an argparse type for a TCP port number from ``lowest`` to 65535."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected a number") from None
        if not lowest <= value <= 65535:
            raise argparse.ArgumentTypeError(f"invalid port {value}: expected {lowest} to 65535")
        return value

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}: expected 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xenovia", description="Xenovia Runtime AI governance gateway")
    parser.add_argument("--home", default=None,
                        help="home folder with the registry and state (default: $XENOVIA_HOME or ./.xenovia)")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the gateway in the foreground")
    up.add_argument("--port", type=_port(1), default=os.environ.get("XENOVIA_PORT", "8080"),
                    help="listener port (default $XENOVIA_PORT or 8080)")
    up.add_argument("--listen", default="127.0.0.1", help="listener address (default 127.0.0.1)")
    up.add_argument("--admin-port", type=_port(0),
                    default=os.environ.get("XENOVIA_ADMIN_PORT", "0"),
                    help="Envoy admin port on 127.0.0.1 (default $XENOVIA_ADMIN_PORT, else 0: a "
                         "free port, written to envoy-admin.address in the home's run folder)")
    up.add_argument("--workers", type=_positive_int, default=os.environ.get("XENOVIA_WORKERS", "1"),
                    help="ext_proc worker processes (default 1)")
    up.add_argument("--ext-proc-transport", choices=("unix", "tcp"),
                    default=os.environ.get("XENOVIA_EXT_PROC_TRANSPORT", "unix"),
                    help="how Envoy reaches the workers: Unix sockets (default) or TCP on loopback")
    up.add_argument("--ext-proc-port", type=_port(1), default=None,
                    help="with --ext-proc-transport tcp, worker i listens on 127.0.0.1 at this "
                         "port + i (default: free ports chosen at each start)")
    up.add_argument("--no-envoy", action="store_true",
                    help="run only the ext_proc workers and the trace collector, for an Envoy you "
                         "run yourself; prints the endpoints for its ext_proc cluster")
    up.set_defaults(handler=cmd_up)

    _add_proxy_commands(commands)
    _add_key_commands(commands)
    _add_policy_commands(commands)

    from ext_proc.traces.commands import add_traces_parser

    add_traces_parser(commands)
    _accept_home_anywhere(parser)
    return parser


def _accept_home_anywhere(parser: argparse.ArgumentParser) -> None:
    """Let every subcommand take --home too, as in `xenovia proxy list --home DIR`.

    SUPPRESS keeps a subcommand from resetting a --home given before it.
    """
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for subparser in action.choices.values():
            if not any("--home" in option.option_strings for option in subparser._actions):
                subparser.add_argument("--home", default=argparse.SUPPRESS,
                                       help="home folder (default: $XENOVIA_HOME or ./.xenovia)")
            _accept_home_anywhere(subparser)


def _add_proxy_commands(commands) -> None:
    proxy = commands.add_parser("proxy", help="manage proxies").add_subparsers(dest="action", required=True)
    create = proxy.add_parser("create", help="create a proxy; prints its id")
    create.add_argument("--name", required=True, help="a label for people; ids identify proxies")
    create.add_argument("--upstream-url", required=True,
                        help="provider base URL as an OpenAI client takes it, e.g. https://api.openai.com/v1")
    create.add_argument("--upstream-key-env",
                        help="environment variable of the gateway that contains the provider credential")
    create.add_argument("--org", default="org_default", help="organisation id (default org_default)")
    create.add_argument("--environment", default="dev", help="environment label (default dev)")
    create.add_argument("--provider", default="openai", help="provider name recorded in traces")
    _add_proxy_options(create)
    create.set_defaults(handler=cmd_proxy_create)

    update = proxy.add_parser("update", help="change a proxy's settings")
    update.add_argument("proxy_id", help="proxy id")
    update.add_argument("--name", help="new label; the id, keys and stored traces keep working")
    update.add_argument("--upstream-url", help="new provider base URL")
    update.add_argument("--upstream-key-env", help="new credential variable name")
    _add_proxy_options(update)
    update.set_defaults(handler=cmd_proxy_update)

    delete = proxy.add_parser(
        "delete",
        help="delete a proxy, its attached policies and its id from every key",
        description="Delete a proxy, its attached policy files and its id from every key's "
                    "proxies. Keys stay, and a key left with no proxy can call nothing until "
                    "revoked. Calls to the deleted proxy get 403 proxy_access_denied. Traces "
                    "already stored for the proxy stay in the trace store.",
    )
    delete.add_argument("proxy_id", help="proxy id, as `xenovia proxy list` shows it")
    delete.set_defaults(handler=cmd_proxy_delete)

    listing = proxy.add_parser("list", help="list proxies")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=cmd_proxy_list)


def _add_proxy_options(parser) -> None:
    parser.add_argument("--stream-policy-mode", choices=STREAM_POLICY_MODES,
                        help="streams under a response policy: hold the answer until evaluated "
                             "(default) or evaluate each event live")
    parser.add_argument("--body-mode", choices=BODY_MODES,
                        help="what traces keep of bodies: full (truncated), metadata or none")
    parser.add_argument("--body-limit", type=int,
                        help=f"bytes of each body kept in traces (default {DEFAULT_BODY_LIMIT})")


def _add_key_commands(commands) -> None:
    key = commands.add_parser("key", help="manage API keys").add_subparsers(dest="action", required=True)
    create = key.add_parser("create", help="create a key; prints it once")
    create.add_argument("--proxy", required=True, action="append",
                        help="proxy id the key may use (repeat for several)")
    create.set_defaults(handler=cmd_key_create)
    revoke = key.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", help="key id (key_...), as `xenovia key list` shows it")
    revoke.set_defaults(handler=cmd_key_revoke)
    listing = key.add_parser("list", help="list key ids (never the keys)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=cmd_key_list)


def _add_policy_commands(commands) -> None:
    group = commands.add_parser("policy", help="manage Rego policies")
    actions = group.add_subparsers(dest="action", required=True)
    attach = actions.add_parser(
        "attach", help="compile a policy and attach it to a proxy; a policy of the same name is replaced"
    )
    attach.add_argument("--proxy", required=True, help="proxy id")
    attach.add_argument("--stage", required=True, choices=STAGES, help="when the policy is evaluated")
    attach.add_argument("--name", help="policy name (default: the file name without .rego)")
    attach.add_argument("--dry-run", action="store_true",
                        help="record what the policy would block in traces without blocking")
    attach.add_argument("file", help="Rego file in package xenovia.policy")
    attach.set_defaults(handler=cmd_policy_attach)
    detach = actions.add_parser("detach", help="remove a proxy's policies from a stage")
    detach.add_argument("--proxy", required=True, help="proxy id")
    detach.add_argument("--stage", required=True, choices=STAGES, help="stage to detach from")
    detach.add_argument("--name", help="policy to detach (default: every policy of the stage)")
    detach.set_defaults(handler=cmd_policy_detach)
    listing = actions.add_parser("list", help="list attached policies")
    listing.add_argument("--proxy", help="only this proxy")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=cmd_policy_list)
    test = actions.add_parser(
        "test",
        help="evaluate a policy against an input document",
        description="Evaluate a policy against an input document and print the outcome, rule, "
                    "reasons and fields to redact. Exit status: 0 allow or redact, 1 block, "
                    "2 error (the policy or input file cannot be read, the policy does not "
                    "compile, or the input is not a JSON object).",
    )
    test.add_argument("file", help="Rego file in package xenovia.policy")
    test.add_argument("--input", required=True, help="JSON file with the policy input document")
    test.add_argument("--stage", choices=STAGES, default="request", help="stage to evaluate as")
    test.set_defaults(handler=cmd_policy_test)


def main(argv: list[str] | None = None) -> int:
    os.environ.pop("RUST_BACKTRACE", None)
    logging.basicConfig(level=os.environ.get("XENOVIA_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        status = args.handler(args)
        # Flushing here turns a closed pipe into BrokenPipeError now, not at interpreter exit.
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of stdout exited early, as `xenovia traces list | head -1` does. Python
        # flushes stdout again at exit, so it is pointed at /dev/null to keep that quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (RegistryError, UpstreamError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
