"""``adapterkit hub …``: serve, push, pull, search, info, yank, delete, token create/revoke/list,
migrate, reconcile.

The registry is ``--registry URL|PATH``, else ``$ADAPTERKIT_REGISTRY``, else the default local one;
the token is ``--token``, else ``$ADAPTERKIT_TOKEN``. Errors are one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..artifact import ArtifactError
from .errors import HubError
from .query import LIMIT_DEFAULT, SearchQuery
from .registry import AdapterVersion, IndexedRegistry, LocalRegistry, Registry, pull
from .resolve import open_registry


def printable(text: Any) -> str:
    """``text`` safe for a terminal: control and format characters (escape sequences, carriage
    returns, bidirectional overrides, zero-width characters) become ``?``. Everything a hub sends is
    publisher-controlled; none of it may move the cursor, recolour or rewrite what was printed."""
    return "".join(ch if ch == "\n" or unicodedata.category(ch) not in _HIDDEN else "?" for ch in str(text))


# Unicode categories that draw nothing visible: controls, format characters, surrogates, unassigned,
# line and paragraph separators.
_HIDDEN = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _line(text: Any) -> str:
    return printable(text).replace("\n", " ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else _line(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _metrics(m: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def _registry(args: argparse.Namespace) -> Registry:
    reg = open_registry(args.registry, token=getattr(args, "token", None))
    if hasattr(reg, "progress"):
        reg.progress = True  # bars on a terminal only (tqdm decides)
    return reg


def _close(reg: Registry) -> None:
    close = getattr(reg, "close", None)
    if close is not None:
        close()


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the errors a user can cause into one line on stderr and exit code 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (HubError, ArtifactError, ValueError, OSError) as e:
            print(f"error: {_line(e)}", file=sys.stderr)
            return 1

    return run


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _backends(args: argparse.Namespace, reconcile: bool = True) -> IndexedRegistry:
    """The registry a server-side command works on: ``--index`` + ``--blobs``, else ``--root``."""
    from .backends import open_backends

    return open_backends(args.index, args.blobs, root=args.root, reconcile=reconcile)


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve  # needs fastapi and uvicorn

    serve(
        _backends(args),
        args.host,
        args.port,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        fd=args.fd,
        log_level=args.log_level,
        public_url=args.public_url,
    )
    return 0


def _convert_folder(folder: str, base: str | None, ref: str, out: Path) -> str:
    """A PEFT or adapters-library folder to the artifact ``out``, through ``adapterkit convert``'s own
    code (exact or refused; the artifact records the source format under ``source``). Returns the format."""
    from ..interop.cli import convert_to_artifact
    from .names import parse_ref

    if not base:
        raise ValueError(f"{folder} is a folder: give --base, the base model (a Hugging Face folder or id) "
                         "to convert it on")
    default_name = parse_ref(ref, allow_latest=False).name  # checked before the base model is loaded
    try:
        fmt, _, _ = convert_to_artifact(folder, base, out, default_name=default_name)
    except KeyError as e:  # a config missing a key the converter needs
        raise ValueError(f"{folder}: cannot convert it: missing {e}") from None
    return fmt


def cmd_push(args: argparse.Namespace) -> int:
    metrics = json.loads(args.metrics) if args.metrics else None
    base: Any = args.base
    with tempfile.TemporaryDirectory(prefix="adapterkit-push-") as tmp:
        file, converted = args.file, None
        if Path(file).is_dir():  # a PEFT / adapters folder: --base is the model to convert it on
            file = Path(tmp) / "converted.safetensors"
            converted = _convert_folder(args.file, base, args.ref, file)
            base = None  # the artifact was just made on that very model
        elif base and Path(base).is_file():  # a fingerprint saved as JSON
            base = json.loads(Path(base).read_text())
        reg = _registry(args)
        try:
            info = reg.publish(file, args.ref, version=args.version, description=args.description, metrics=metrics, base=base)
        finally:
            _close(reg)
    if converted and not args.json:
        print(f"converted {_line(args.file)} ({converted}) to an adapterkit artifact")
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))  # JSON escapes control characters itself
    else:
        print(f"published {info.ref}  ({_size(info.size)}, sha256 {info.sha256[:12]}…, base {_line(info.base_id)})")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    reg = _registry(args)
    try:
        pulled = pull(reg, args.ref)  # a fusion's members too
    finally:
        _close(reg)
    for info in [pulled.version] + [v for v, _ in pulled.members]:
        if info.yanked:
            print(f"warning: {info.ref} is yanked{': ' + _line(info.yank_reason) if info.yank_reason else ''}", file=sys.stderr)
    for m in pulled.unresolved:
        print(f"warning: fusion member {_line(m.get('name'))} (sha256 {_line(m.get('sha256'))[:12]}…) is not in this "
              "registry; load it from where you have it before the fusion", file=sys.stderr)
    paths = [pulled.path] + [p for _, p in pulled.members]
    if args.output:
        out = Path(args.output)
        folder = out if out.is_dir() else out.parent
        copies = [out if not out.is_dir() else folder / _file_name(pulled.version)]
        copies += [folder / _file_name(v) for v, _ in pulled.members]  # members beside the fusion
        for src, dest in zip(paths, copies):
            shutil.copyfile(src, dest)
        paths = copies
    for path in paths:  # the pulled version first, then its members
        print(path)
    return 0


def _file_name(info: AdapterVersion) -> str:
    return f"{info.namespace}-{info.name}-{info.version}.safetensors"


def cmd_search(args: argparse.Namespace) -> int:
    query = SearchQuery(args.text, args.base_id, args.model_type, args.task_type, args.kind, args.model, args.limit)
    reg = _registry(args)
    try:
        found = reg.find(query)
    finally:
        _close(reg)
    if args.json:
        print(json.dumps([v.to_dict() for v in found], indent=2))
        return 0
    if not found:
        print("no adapters found")
        return 0
    rows = [
        (v.ref, v.name_or_path or v.model_type, v.task_type, f"{v.kind}/{v.bottleneck_size or '?'}", _size(v.size), _metrics(v.metrics))
        for v in found
    ]
    print(_table(("ADAPTER", "BASE MODEL", "TASK", "KIND/R", "SIZE", "METRICS"), rows))
    return 0


def _describe(v: AdapterVersion) -> str:
    lines = [
        ("adapter", v.ref + (f"  (yanked: {v.yank_reason or 'no reason given'})" if v.yanked else "")),
        ("description", v.description),
        ("base model", f"{v.name_or_path or '?'} ({v.model_type}, fingerprint {v.base_id})"),
        ("task", v.task_type + (f": {', '.join(v.labels)}" if v.labels else "")),
        ("kind", f"{v.kind}, bottleneck {v.bottleneck_size}" if v.bottleneck_size is not None else v.kind),
        ("members", ", ".join(f"{m.get('name')} ({m.get('ref') or 'not in this registry'})" for m in v.members)),
        ("metrics", _metrics(v.metrics)),
        ("size", _size(v.size)),
        ("sha256", v.sha256),
        ("published", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(v.created)) + (f" by {v.publisher}" if v.publisher else "")),
    ]
    return "\n".join(f"{k + ':':13}{printable(val)}" for k, val in lines if val)


def cmd_info(args: argparse.Namespace) -> int:
    reg = _registry(args)
    try:
        info = reg.info(args.ref)
        versions = reg.versions(info.adapter)
    finally:
        _close(reg)
    if args.json:
        print(json.dumps({"adapter": info.to_dict(), "versions": [v.to_dict() for v in versions]}, indent=2))
        return 0
    print(_describe(info))
    print()
    rows = [
        (v.version + (" (yanked)" if v.yanked else ""), time.strftime("%Y-%m-%d", time.gmtime(v.created)), _size(v.size), v.sha256[:12], _metrics(v.metrics))
        for v in versions
    ]
    print(_table(("VERSION", "DATE", "SIZE", "SHA256", "METRICS"), rows))
    return 0


def cmd_yank(args: argparse.Namespace) -> int:
    reg = _registry(args)
    try:
        info = reg.yank(args.ref, args.reason)
    finally:
        _close(reg)
    print(f"yanked {info.ref}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    reg = _registry(args)
    try:
        reg.delete(args.ref)
    finally:
        _close(reg)
    print(f"deleted {args.ref} (its version number stays taken)")
    return 0


def cmd_namespace_list(args: argparse.Namespace) -> int:
    reg = _backends(args)
    try:
        rows = [(ns, owner or "(no owner: read-only through the server)") for ns, owner in reg.namespaces().items()]
    finally:
        reg.close()
    print(_table(("NAMESPACE", "OWNER"), rows) if rows else "no namespaces")
    return 0


def cmd_namespace_set_owner(args: argparse.Namespace) -> int:
    reg = _backends(args)
    try:
        reg.set_owner(args.namespace, args.owner)
    finally:
        reg.close()
    print(f"namespace {args.namespace} now belongs to {args.owner}")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from .tokens import TokenStore

    info, token = TokenStore(_backends(args)).create(args.owner)
    print(f"created token {info.id} for {info.owner}; it is shown only once:", file=sys.stderr)
    print(token)
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from .tokens import TokenStore

    info = TokenStore(_backends(args)).revoke(args.token)
    print(f"revoked token {info.id} of {info.owner}")
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from .tokens import TokenStore

    rows = [
        (t.id, t.owner, time.strftime("%Y-%m-%d %H:%M", time.gmtime(t.created)), "revoked" if t.revoked else "active")
        for t in TokenStore(_backends(args)).list()
    ]
    print(_table(("ID", "OWNER", "CREATED", "STATE"), rows) if rows else "no tokens")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from .backends import open_backends
    from .migrate import migrate

    source = LocalRegistry(args.source)
    dest = open_backends(args.to, args.blobs)
    try:
        report = migrate(source, dest, log=(lambda m: print(m, file=sys.stderr)) if args.verbose else None)
    finally:
        dest.close()
    print(
        f"copied {report.versions_copied} versions ({report.blobs_copied} blobs, {_size(report.bytes_copied)}), "
        f"{report.namespaces_copied} namespaces, {report.tokens_copied} tokens; "
        f"{report.versions_present} versions were already there; every blob verified by sha256"
    )
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if report.problems else 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    reg = _backends(args, reconcile=False)
    try:
        fixed = reg.reconcile()
        problems = reg.check(deep=args.deep)
    finally:
        reg.close()
    print(
        f"removed {fixed['stale_temps']} dead temp files and {fixed['orphan_blobs']} orphan blobs; "
        f"{fixed['missing_blobs']} blobs are missing (their versions are hidden)"
    )
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


def _add_registry(p: argparse.ArgumentParser, token: bool = False) -> None:
    p.add_argument("--registry", help="hub URL (http://…) or registry folder (default: $ADAPTERKIT_REGISTRY, else ~/.cache/adapterkit)")
    if token:
        p.add_argument("--token", help="publishing token (default: $ADAPTERKIT_TOKEN)")


def _add_backends(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", help="registry folder (default: $ADAPTERKIT_HOME or ~/.cache/adapterkit)")
    p.add_argument("--index", help="shared index instead of --root: postgresql://user:password@host:port/database")
    p.add_argument(
        "--blobs", help="shared blob store with --index: s3://bucket/prefix (endpoint and keys from AWS_* variables)"
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the hub's subcommands to ``sub``."""
    p = sub.add_parser("serve", help="run the hub server (JSON API + web page)")
    _add_backends(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--max-upload-mb", type=float, default=256.0, help="largest accepted artifact (default 256)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--public-url", help="the hub's address as users reach it, shown in the pages' snippets (default: the bound address)")
    p.add_argument("--fd", type=int, help=argparse.SUPPRESS)  # serve on an inherited listening socket
    p.set_defaults(func=_guarded(cmd_serve))

    p = sub.add_parser("push", help="publish an artifact (or a PEFT / adapters-library folder) as namespace/name[@version]")
    p.add_argument("file", help="an adapterkit artifact (.safetensors), or a folder PEFT or the adapters library saved "
                   "(converted on the way in, as 'adapterkit convert' does; needs --base)")
    p.add_argument("ref", help="namespace/name or namespace/name@version")
    p.add_argument("--version", help="version to publish (default: next whole number)")
    p.add_argument("--description")
    p.add_argument("--metrics", help='JSON object, e.g. \'{"accuracy": 0.91}\'')
    p.add_argument("--base", help="for an artifact: the base model's fingerprint id, or a JSON file with its fingerprint; "
                   "must match. For a folder: the base model it was trained on (a Hugging Face folder or id)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_registry(p, token=True)
    p.set_defaults(func=_guarded(cmd_push))

    p = sub.add_parser("pull", help="download (and verify) an adapter (a fusion: its members too); prints the local paths")
    p.add_argument("ref", help="namespace/name[@version|@latest]")
    p.add_argument("-o", "--output", help="copy the file here (a file name or a folder)")
    _add_registry(p)
    p.set_defaults(func=_guarded(cmd_pull))

    p = sub.add_parser("search", help="find adapters")
    p.add_argument("text", nargs="?", help="words to look for in names, descriptions, labels, base models")
    p.add_argument("--base-id", help="base model fingerprint id")
    p.add_argument("--model", help="base model id or path, e.g. bert-base-uncased")
    p.add_argument("--model-type", help="e.g. bert, gpt2, llama")
    p.add_argument("--task-type", help="e.g. classification, token_classification, lm")
    p.add_argument("--kind", help="houlsby, pfeiffer or parallel")
    p.add_argument("--limit", type=int, default=LIMIT_DEFAULT)
    p.add_argument("--json", action="store_true")
    _add_registry(p)
    p.set_defaults(func=_guarded(cmd_search))

    p = sub.add_parser("info", help="show an adapter version and the list of versions")
    p.add_argument("ref")
    p.add_argument("--json", action="store_true")
    _add_registry(p)
    p.set_defaults(func=_guarded(cmd_info))

    p = sub.add_parser("yank", help="hide a version from 'latest' and search (still downloadable by number)")
    p.add_argument("ref", help="namespace/name@version")
    p.add_argument("--reason", default="")
    _add_registry(p, token=True)
    p.set_defaults(func=_guarded(cmd_yank))

    p = sub.add_parser("delete", help="delete a version's file (its number is never reused)")
    p.add_argument("ref", help="namespace/name@version")
    _add_registry(p, token=True)
    p.set_defaults(func=_guarded(cmd_delete))

    p = sub.add_parser("namespace", help="list namespaces and their owners; give one to an owner (administrators)")
    nsub = p.add_subparsers(dest="namespace_command", required=True)
    t = nsub.add_parser("list", help="namespaces and owners (ownerless ones cannot be changed through the server)")
    _add_backends(t)
    t.set_defaults(func=_guarded(cmd_namespace_list))
    t = nsub.add_parser("set-owner", help="give NAMESPACE to OWNER (the name tokens are created for)")
    t.add_argument("namespace")
    t.add_argument("owner")
    _add_backends(t)
    t.set_defaults(func=_guarded(cmd_namespace_set_owner))

    p = sub.add_parser("token", help="manage publishing tokens of a server's registry")
    tsub = p.add_subparsers(dest="token_command", required=True)
    t = tsub.add_parser("create", help="create a token for OWNER; prints it once")
    t.add_argument("owner")
    _add_backends(t)
    t.set_defaults(func=_guarded(cmd_token_create))
    t = tsub.add_parser("revoke", help="revoke a token (by the token or its id)")
    t.add_argument("token")
    _add_backends(t)
    t.set_defaults(func=_guarded(cmd_token_revoke))
    t = tsub.add_parser("list", help="list tokens (ids and owners, never the secrets)")
    _add_backends(t)
    t.set_defaults(func=_guarded(cmd_token_list))

    p = sub.add_parser("migrate", help="copy a local registry into PostgreSQL + S3, verified by sha256")
    p.add_argument("--from", dest="source", required=True, help="the local registry folder to copy")
    p.add_argument("--to", required=True, help="the destination index: postgresql://… (or a SQLite path)")
    p.add_argument("--blobs", required=True, help="the destination blob store: s3://bucket/prefix (or a folder)")
    p.add_argument("--verbose", action="store_true", help="name each version as it is copied")
    p.set_defaults(func=_guarded(cmd_migrate))

    p = sub.add_parser("reconcile", help="remove orphan blobs and dead uploads left by crashes; report problems")
    _add_backends(p)
    p.add_argument("--deep", action="store_true", help="also re-hash every blob")
    p.set_defaults(func=_guarded(cmd_reconcile))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``hub`` to the ``adapterkit`` command line."""
    hub = subparsers.add_parser("hub", help="publish, find and download adapters; run a hub server")
    add_commands(hub.add_subparsers(dest="hub_command", required=True))


def main(argv: list[str] | None = None) -> int:
    """``python -m adapterkit.hub``: the hub commands without the rest of the command line."""
    parser = argparse.ArgumentParser(prog="adapterkit hub", description="The adapterkit hub.")
    add_commands(parser.add_subparsers(dest="hub_command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
