"""``adapterkit serve``: start the multi-task server.

adapterkit serve --base ./minilm --registry ./adapters --adapters sentiment,topic --port 8000
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
from typing import Any

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes from ``"512MiB"``, ``"2GB"``, ``"1e6"``-free plain integers, ``"300k"``..."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 2GB, 1000000)")
    unit = (m.group(2) or "").lower().rstrip("b")
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"unknown size unit in {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand."""
    p = subparsers.add_parser(
        "serve",
        help="serve many adapters on one base model over HTTP",
        description="Serve classification, tagging and generation for many adapters on one base model, "
        "batching requests for different adapters into one forward pass. OpenAPI docs at /docs.",
    )
    p.add_argument(
        "--base", required=True, help="base model folder (transformers format, with its tokenizer)"
    )
    p.add_argument(
        "--registry",
        required=True,
        help="where adapters come from: a folder of <name>.safetensors artifacts, a hub LocalRegistry folder, "
        "or a hub server URL",
    )
    p.add_argument(
        "--adapters", default="", help="comma-separated references to load at startup (others load on demand)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at startup)")
    p.add_argument("--model-kind", choices=("auto", "encoder", "causal-lm", "seq2seq-lm"), default="auto")
    p.add_argument("--sites", help="where adapters attach when the site table has no row for the base: 'guess', "
                   "a JSON SiteSpec, or the path of a JSON file holding one")
    p.add_argument("--max-batch-size", type=int, default=32, help="most requests in one forward pass")
    p.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="longest a request waits for others to batch with"
    )
    p.add_argument(
        "--max-queue", type=int, default=512, help="most queued requests; more get 503 with Retry-After"
    )
    p.add_argument(
        "--no-cross-task",
        dest="cross_task",
        action="store_false",
        help="batch only requests for the same adapter (baseline)",
    )
    p.add_argument(
        "--memory-budget",
        type=parse_size,
        default=1 << 30,
        help="bytes of adapters kept loaded (weights plus their mixed-batch stack copy), LRU (default 1GiB)",
    )
    p.add_argument(
        "--max-length", type=int, default=None, help="input token limit (default: the model's own)"
    )
    p.add_argument(
        "--on-long",
        choices=("truncate", "reject"),
        default="truncate",
        help="inputs over the limit: truncate them (answers say truncated=true) or reject with 413",
    )
    p.add_argument(
        "--max-batch-tokens", type=int, default=16384, help="split a batch whose padded size exceeds this"
    )
    p.add_argument(
        "--split-overhead",
        type=int,
        default=48,
        help="a forward pass's fixed cost in tokens: a length-sorted batch is cut into passes over similar "
        "lengths where the padding saved outweighs it (large: never cut; default 48, measured on CPU)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=256, help="largest max_new_tokens a generate request may ask"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--graceful-timeout", type=float, default=30.0, help="seconds to finish in-flight requests on SIGTERM"
    )
    p.add_argument("--log-level", default="info")
    sec = p.add_argument_group("limits and access (docs/security.md)")
    sec.add_argument(
        "--admin-token",
        default=None,
        help="Bearer token for loading/unloading adapters (default: $ADAPTERKIT_ADMIN_TOKEN); "
        "required unless --host is loopback",
    )
    sec.add_argument("--max-body-bytes", type=parse_size, default=1 << 20, help="largest request body (default 1MiB)")
    sec.add_argument("--max-pinned", type=int, default=16, help="most distinct adapters in use at once (default 16)")
    sec.add_argument(
        "--negative-ttl", type=float, default=30.0, help="seconds a failed load is answered from memory (default 30)"
    )
    sec.add_argument(
        "--latest-ttl", type=float, default=30.0, help="seconds before @latest / unversioned references are re-resolved (default 30)"
    )
    ray = p.add_argument_group("Ray Serve (pip install 'adapterkit[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve: replicas, requests routed by adapter")
    ray.add_argument("--replicas", type=int, default=2, help="model replicas with --ray (default 2)")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    ray.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one on 127.0.0.1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    import torch
    import uvicorn

    from .app import ServeConfig, create_app
    from .server import DrainingServer

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ServeConfig(
        base=args.base,
        registry=args.registry,
        adapters=[a.strip() for a in args.adapters.split(",") if a.strip()],
        model_kind=args.model_kind,
        sites=args.sites,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        cross_task=args.cross_task,
        memory_budget=args.memory_budget,
        max_length=args.max_length,
        on_long=args.on_long,
        max_batch_tokens=args.max_batch_tokens,
        split_overhead=args.split_overhead,
        max_new_tokens=args.max_new_tokens,
        registry_token=os.environ.get("ADAPTERKIT_TOKEN") or None,
        host=args.host,
        admin_token=args.admin_token or os.environ.get("ADAPTERKIT_ADMIN_TOKEN") or None,
        max_body_bytes=args.max_body_bytes,
        max_pinned=args.max_pinned,
        negative_ttl_s=args.negative_ttl,
        latest_ttl_s=args.latest_ttl,
    )
    if args.ray:
        from .ray_serve import serve_on_ray

        return serve_on_ray(
            config, host=args.host, port=args.port, replicas=args.replicas, replica_cpus=args.replica_cpus,
            address=args.ray_address,
        )
    try:
        app = create_app(config)
    except (OSError, ValueError, LookupError, RuntimeError) as e:  # bad paths, artifacts, references
        print(f"adapterkit serve: error: {e}", file=sys.stderr)
        return 2
    # Bind the socket here so that --port 0 works and the real port can be printed before serving.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    uv_config = uvicorn.Config(
        app, log_level=args.log_level, timeout_graceful_shutdown=args.graceful_timeout, access_log=False
    )
    server = DrainingServer(uv_config, app)
    print(f"adapterkit serve: listening on http://{args.host}:{port}", flush=True)
    server.run(sockets=[sock])
    return 0 if server.started else 1
