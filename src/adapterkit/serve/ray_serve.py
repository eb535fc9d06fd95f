"""``adapterkit serve`` on Ray Serve: N model replicas, requests routed by adapter.

    adapterkit serve --ray --replicas 2 --base ./minilm --registry ./adapters --port 8000
    serve run adapterkit.serve.ray_serve:build base=./minilm registry=./adapters replicas=2   # Ray's CLI

Two deployments:

- **``AdapterkitModel``** (N replicas): each holds the base model and an LRU of adapters under its
  memory budget, and runs the whole single-process app (``app.create_app``) in-process — the same
  request validation, cross-task batcher (one per-row mixed forward per batch), errors and metrics.
  Its adapter loader is Ray Serve's **model multiplexing** loader (``@serve.multiplexed``): once a
  replica has loaded an adapter, Ray's router sends that adapter's requests to it.
- **``AdapterkitIngress``** (one replica, behind Ray's HTTP proxy): the unchanged HTTP API. It reads
  the adapter a request names (``adapter``, or ``model`` for the OpenAI routes, or the path of
  ``/v1/adapters/{adapter}``), forwards the request through a ``DeploymentHandle`` with that
  ``multiplexed_model_id``, and returns the replica's answer as it is. A replica that dies under a
  request (SIGKILL, OOM) is retried on another one (answers are pure functions of the request, so a
  retry is safe); when no replica can take it the answer is 503 with ``Retry-After``, counted in
  ``adapterkit_ray_unavailable_total``. Ray Serve restarts dead replicas.

The ingress's ``/metrics`` holds what it sees: requests and latency by endpoint (the single-process
server's metric names), retries, 503s, and multiplexing hits/misses (``X-Adapterkit-Adapter-Hit``: the
adapter was already loaded on the replica that answered). Each answer names its replica in
``X-Adapterkit-Replica``. Per-replica metrics (batch sizes, loads, evictions) are each replica's own
``/metrics``, exported by Ray's metrics agent where one runs. Streaming (SSE) answers are sent whole
when the stream ends.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, fields
from typing import Any

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request
from starlette.responses import Response

from .app import ServeConfig, _endpoint_label
from .metrics import Counter, ServeMetrics

REPLICA_HEADER = "x-adapterkit-replica"
PID_HEADER = "x-adapterkit-replica-pid"
HIT_HEADER = "x-adapterkit-adapter-hit"
# A request whose replica died is tried on this many replicas in all before it is answered 503.
ATTEMPTS = 3
# Headers a request keeps on its way to a replica (hop-by-hop ones are dropped).
_FORWARD_HEADERS = ("content-type", "authorization", "accept", "x-request-id")
_ADAPTER_PATH = re.compile(r"^/v1/adapters/(.+)$")
_REPLICA_DIED = (RayActorError, ActorDiedError, ActorUnavailableError)


def adapter_of(method: str, path: str, body: bytes) -> str:
    """The adapter a request is for ("" when none): what multiplexing routes by."""
    m = _ADAPTER_PATH.match(path)
    if m and method == "DELETE":
        return m.group(1)
    if not body or method != "POST":
        return ""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""  # the replica answers the malformed body with the usual 422
    if not isinstance(doc, dict):
        return ""
    ref = doc.get("adapter", doc.get("model"))
    return ref if isinstance(ref, str) and 0 < len(ref) <= 300 else ""


class AdapterkitModel:
    """One model replica: the single-process app, called in-process through ASGI."""

    def __init__(self, config: dict[str, Any]):
        import httpx

        from .app import create_app

        self.config = ServeConfig(**config)
        self.app = create_app(self.config)
        self.service = self.app.state.service
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://replica", timeout=None)
        self._lifespan: Any = None
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Ray Serve (tests of the class itself)
            self.replica_id = f"pid-{os.getpid()}"

    async def _started(self) -> None:
        # httpx's ASGI transport does not run the app's lifespan: run it here once, on the replica's
        # event loop (it starts the batcher and the decode loop).
        if self._lifespan is None:
            self._lifespan = self.app.router.lifespan_context(self.app)
            await self._lifespan.__aenter__()

    @serve.multiplexed(max_num_models_per_replica=64)
    async def get_adapter(self, ref: str) -> str:
        """Ray's multiplexing loader: load ``ref`` into this replica's model (under its budget).

        Ray keeps its own LRU of the references loaded here, which is what its router reads; the
        adapter memory itself is the AdapterCache's, evicted by its byte budget."""
        await self.service.pin(ref)
        self.service.unpin(ref)
        return ref

    def _loaded(self, ref: str) -> bool:
        return any(e.ref == ref for e in self.service.cache.loaded())

    async def forward(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one HTTP request through the app; returns status, headers and body."""
        await self._started()
        ref = serve.get_multiplexed_model_id()
        hit = ""
        if ref:
            hit = "1" if self._loaded(ref) else "0"
            try:
                await self.get_adapter(ref)
            except Exception:  # noqa: S110  unknown or broken adapter: the app answers 404/409/500 below
                pass
        response = await self.client.request(
            request["method"], request["path"], params=request["query"], headers=request["headers"], content=request["body"]
        )
        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in ("content-length", "transfer-encoding")]
        headers.append((REPLICA_HEADER, self.replica_id))
        headers.append((PID_HEADER, str(os.getpid())))
        if hit:
            headers.append((HIT_HEADER, hit))
        return {"status": response.status_code, "headers": headers, "body": response.content}

    async def __del__(self) -> None:
        if self._lifespan is not None:
            await self._lifespan.__aexit__(None, None, None)


class AdapterkitIngress:
    """The HTTP entry point: forwards each request to a model replica chosen by its adapter."""

    def __init__(self, model: Any):
        self.model = model
        self.metrics = ServeMetrics()
        self.retries = Counter("adapterkit_ray_retries_total", "Requests retried on another replica after theirs died.")
        self.unavailable = Counter(
            "adapterkit_ray_unavailable_total", "Requests answered 503 because no replica could take them."
        )
        self.multiplex = Counter(
            "adapterkit_ray_multiplex_total", "Requests by whether their adapter was already loaded on the replica.", ("result",)
        )

    async def __call__(self, request: Request) -> Response:
        start = time.perf_counter()
        path = request.url.path
        response = await self._forward(request)
        endpoint = _endpoint_label(path)
        self.metrics.requests.inc(endpoint=endpoint, status=str(response.status_code))
        self.metrics.latency.observe(time.perf_counter() - start, endpoint=endpoint)
        return response

    async def _forward(self, request: Request) -> Response:
        if request.url.path == "/metrics" and request.method == "GET":
            text = self.metrics.render() + "\n".join(
                line for m in (self.retries, self.unavailable, self.multiplex) for line in m.render()
            ) + "\n"
            return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")
        body = await request.body()
        payload = {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "headers": {k: v for k, v in request.headers.items() if k.lower() in _FORWARD_HEADERS},
            "body": body,
        }
        ref = adapter_of(request.method, request.url.path, body)
        handle = self.model.options(multiplexed_model_id=ref) if ref else self.model
        for attempt in range(ATTEMPTS):
            try:
                reply = await handle.forward.remote(payload)
                break
            except (*_REPLICA_DIED, BackPressureError) as e:
                if attempt + 1 < ATTEMPTS:
                    self.retries.inc()
                    continue
                self.unavailable.inc()
                return Response(
                    json.dumps({"detail": f"no model replica could take the request ({type(e).__name__}); retry"}),
                    status_code=503,
                    media_type="application/json",
                    headers={"Retry-After": "1"},
                )
        headers = dict(reply["headers"])
        if HIT_HEADER in headers:
            self.multiplex.inc(result="hit" if headers[HIT_HEADER] == "1" else "miss")
        return Response(reply["body"], status_code=reply["status"], headers=headers)


def deployments(
    config: ServeConfig,
    *,
    replicas: int = 2,
    replica_cpus: float = 1.0,
    autoscaling: dict[str, Any] | None = None,
    max_ongoing_requests: int | None = None,
) -> Any:
    """The Ray Serve application: the ingress bound to ``replicas`` model replicas.

    ``autoscaling``: Ray Serve's ``autoscaling_config`` (``min_replicas``, ``max_replicas``,
    ``target_ongoing_requests``...) instead of a fixed count. ``max_ongoing_requests`` per replica
    defaults to twice the batch size, so a replica's batcher has a batch waiting while one runs."""
    ongoing = max_ongoing_requests or max(2 * config.max_batch_size, 8)
    model_options: dict[str, Any] = {
        "name": "AdapterkitModel",
        "ray_actor_options": {"num_cpus": replica_cpus},
        "max_ongoing_requests": ongoing,
        "health_check_period_s": 2,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 30,
    }
    if autoscaling:
        model_options["autoscaling_config"] = autoscaling
    else:
        model_options["num_replicas"] = replicas
    model = serve.deployment(AdapterkitModel, **model_options)
    ingress = serve.deployment(
        AdapterkitIngress, name="AdapterkitIngress", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(ongoing * max(replicas, 1) * 2, 64),
    )
    return ingress.bind(model.bind(asdict(config)))


def build(args: dict[str, str]) -> Any:
    """Application builder for ``serve run adapterkit.serve.ray_serve:build key=value ...``.

    Keys: every ``ServeConfig`` field (``base``, ``registry``, ``max_batch_size``...; ``adapters``
    comma-separated), plus ``replicas``, ``replica_cpus``, ``min_replicas``/``max_replicas`` (autoscale)."""
    args = dict(args)
    replicas = int(args.pop("replicas", 2))
    replica_cpus = float(args.pop("replica_cpus", 1.0))
    autoscaling = None
    if "max_replicas" in args:
        autoscaling = {
            "min_replicas": int(args.pop("min_replicas", 1)),
            "max_replicas": int(args.pop("max_replicas")),
            "target_ongoing_requests": float(args.pop("target_ongoing_requests", 16)),
        }
    types = {f.name: f.type for f in fields(ServeConfig)}
    config: dict[str, Any] = {}
    for key, value in args.items():
        if key not in types:
            raise ValueError(f"unknown setting {key!r}; known: {', '.join(sorted(types))}, replicas, replica_cpus")
        kind = str(types[key])
        if key == "adapters":
            config[key] = [a.strip() for a in value.split(",") if a.strip()]
        elif kind.startswith("int"):
            config[key] = int(value)
        elif kind.startswith("float"):
            config[key] = float(value)
        elif kind.startswith("bool"):
            config[key] = value.lower() in ("1", "true", "yes")
        else:
            config[key] = value
    config.setdefault("registry_token", os.environ.get("ADAPTERKIT_TOKEN") or None)
    return deployments(ServeConfig(**config), replicas=replicas, replica_cpus=replica_cpus, autoscaling=autoscaling)


def serve_on_ray(
    config: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 2,
    replica_cpus: float = 1.0,
    address: str | None = None,
    num_cpus: int | None = None,
) -> int:
    """``adapterkit serve --ray``: deploy on the Ray cluster at ``address`` (default: start a local
    one bound to 127.0.0.1) and serve until SIGTERM or SIGINT."""
    import signal
    import socket
    import threading

    import ray

    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=num_cpus)
    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployments(config, replicas=replicas, replica_cpus=replica_cpus), name="adapterkit", route_prefix="/")
        print(f"adapterkit serve: Ray Serve application 'adapterkit' running with {replicas} replicas", flush=True)
        print(f"adapterkit serve: listening on http://{host}:{port}", flush=True)
        stop.wait()
        print("adapterkit serve: stopping the Ray Serve application", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
