"""The HTTP API: one base model, many task adapters, requests for any of them batched together.

Endpoints (OpenAPI at ``/docs``):

=======================  ==========================================================================
``POST /v1/classify``    ``{"adapter", "text", "text_pair"?}`` -> label and per-label scores
``POST /v1/tag``         ``{"adapter", "text"}`` -> a label and scores per token (token classification)
``POST /v1/generate``    ``{"adapter"?, "prompt", "max_new_tokens", "do_sample", "seed"?, ...}`` (decoders)
``GET /v1/adapters``     loaded adapters (``?available=true``: also what the registry offers)
``POST /v1/adapters``    ``{"adapter"}``: load now (requests also load on demand)
``DELETE /v1/adapters/{adapter}``  unload
``GET /health``          200 while serving, 503 while draining
``GET /metrics``         Prometheus text format
=======================  ==========================================================================

Errors, each as ``{"detail": ...}``: unknown adapter 404; adapter built for another base model 409
(with ``expected`` and ``found`` fingerprints); malformed request, an adapter of the wrong task for
the endpoint, or an unusable artifact in the registry 422; input over the model's limit 413 when the
server runs with ``on_long="reject"`` (with ``"truncate"`` it is cut to the limit and the answer says
``"truncated": true``); a body over ``max_body_bytes`` 413; queue full, or no room to load one more
adapter while all loaded ones are in use, 503 with ``Retry-After``; registry unreachable 502; a
missing or wrong admin token 401, too many wrong ones 429. No answer echoes the request's input or
holds the server's paths. ``docs/security.md`` lists every limit.

Loading and unloading (``POST``/``DELETE /v1/adapters``, ``GET /v1/adapters?available=true``) need
``Authorization: Bearer <admin token>`` when ``ServeConfig.admin_token`` is set, which it must be
unless the server binds to loopback only.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from ..artifact import ArtifactError, BaseModelMismatch
from ..composition import Block, Parallel, from_json, head_name
from ..hub.guards import (
    BodyLimit,
    FailedAuthLimiter,
    SafeJSONResponse,
    SecurityHeaders,
    client_address,
    validation_detail,
)
from ..model import AdapterModel
from ..sites import parse_sites
from .batcher import Batcher, QueueFull
from .cache import (
    AdapterBusy,
    AdapterCache,
    AdapterSource,
    BadReference,
    CacheFull,
    LoadedAdapter,
    SourceUnavailable,
    UnknownAdapter,
    open_source,
)
from .metrics import ServeMetrics
from .openai_api import mount_openai_api
from .runner import LM_TASKS, SEQUENCE_TASKS, TOKEN_TASKS, InputTooLong, ModelRunner, Row, load_base


@dataclass
class ServeConfig:
    """Everything ``adapterkit serve`` can set. Sizes in bytes, times in milliseconds."""

    base: str = ""
    registry: str = ""
    adapters: list[str] = field(default_factory=list)  # loaded at startup
    model_kind: str = "auto"  # auto | encoder | causal-lm
    sites: str | None = None  # --sites: None (the table row), "guess", a JSON SiteSpec or a file holding one
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 512
    cross_task: bool = True
    memory_budget: int = 1 << 30
    max_length: int | None = None  # default: the model's own limit
    on_long: str = "truncate"  # truncate | reject (413)
    max_batch_tokens: int = 16384
    split_overhead: int = 48  # a forward pass's fixed cost in tokens: batches split by length when cheaper
    max_new_tokens: int = 256
    registry_token: str | None = None
    # -- limits (docs/security.md) --
    host: str = "127.0.0.1"  # where the server binds: anything but loopback needs an admin token
    admin_token: str | None = None  # Bearer token for loading / unloading adapters
    max_body_bytes: int = 1 << 20
    max_pinned: int = 16  # distinct adapters in use at once
    negative_ttl_s: float = 30.0  # failed loads answered from memory this long
    latest_ttl_s: float = 30.0  # references without an exact version re-resolved this often


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach."""
    return host in LOOPBACK or host.startswith("127.")


# -- request and response bodies -------------------------------------------------------------------

_ADAPTER = Field(
    min_length=1,
    max_length=300,
    description="adapter reference: a file stem, or namespace/name[@version] for a hub registry",
)
# An adapter, or a composition of adapters by reference: {"stack": [...]}, {"average": [...],
# "weights": [...]} (composition.from_json checks it; its size is bounded there).
AdapterRef = Annotated[str, Field(min_length=1, max_length=300)]
AdapterOrComposition = Annotated[
    AdapterRef | dict[str, Any],
    Field(description='adapter reference (a file stem, or namespace/name[@version] for a hub registry), or a '
                      'composition of them: {"stack": [a, b]}, {"average": [a, b], "weights": [0.5, 0.5]}'),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 422, not silently ignored
    # A lone UTF-16 surrogate in the JSON ("\ud800") is refused by pydantic's own string check (422);
    # the validation handler below answers without echoing it.


class ClassifyRequest(_Strict):
    adapter: AdapterOrComposition
    text: str = Field(max_length=100_000)
    text_pair: str | None = Field(default=None, max_length=100_000, description="second text, for pair tasks")


class ClassifyResponse(BaseModel):
    adapter: str | dict[str, Any]
    label: str
    scores: dict[str, float]
    truncated: bool
    batch_size: int = Field(description="rows in the forward pass that answered this request")


class TagRequest(_Strict):
    adapter: AdapterOrComposition
    text: str = Field(max_length=100_000)


class TagResponse(BaseModel):
    adapter: str | dict[str, Any]
    tokens: list[dict[str, Any]]
    truncated: bool
    batch_size: int


class GenerateRequest(_Strict):
    adapter: AdapterOrComposition | None = Field(default=None, description="omit for the base model alone")
    prompt: str = Field(max_length=100_000)
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="default: 32, or the server's limit if lower"
    )
    do_sample: bool = False
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    temperature: float | None = Field(default=None, gt=0)
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0, le=1)


class GenerateResponse(BaseModel):
    adapter: str | dict[str, Any] | None
    text: str
    token_ids: list[int]
    seed: int | None
    truncated: bool
    batch_size: int


class LoadRequest(_Strict):
    adapter: str = _ADAPTER


def adapter_key(adapter: str | dict[str, Any] | None) -> str | None:
    """The batcher's key for a request's adapter (a composition: its canonical JSON)."""
    return json.dumps(adapter, sort_keys=True) if isinstance(adapter, dict) else adapter


# -- errors ----------------------------------------------------------------------------------------


class HTTPProblem(Exception):
    """An error answer: status, message and extra JSON fields."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status, self.detail, self.headers, self.extra = status, detail, headers, extra


def problem_for(e: BaseException) -> HTTPProblem | None:
    """The HTTP answer for an exception raised while serving a request; None for a bug."""
    if isinstance(e, HTTPProblem):
        return e
    if isinstance(e, BaseModelMismatch):  # before ValueError: it is one
        return HTTPProblem(409, str(e), expected=e.expected, found=e.found)
    if isinstance(e, ArtifactError):  # its message names the reference, never the server's path
        return HTTPProblem(422, str(e))
    if isinstance(e, CacheFull):
        return HTTPProblem(503, str(e), headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, UnknownAdapter):
        return HTTPProblem(404, str(e))
    if isinstance(e, InputTooLong):
        return HTTPProblem(413, str(e))
    if isinstance(e, QueueFull):
        return HTTPProblem(503, str(e), headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, AdapterBusy):
        return HTTPProblem(409, str(e))
    if isinstance(e, SourceUnavailable):
        return HTTPProblem(502, str(e))
    if isinstance(e, BadReference):
        return HTTPProblem(422, str(e))
    return None


# -- the service -----------------------------------------------------------------------------------


class Service:
    """The model, its adapter cache, the batcher and the metrics, for one app."""

    def __init__(self, config: ServeConfig, model: AdapterModel, tokenizer: Any, source: AdapterSource):
        self.config = config
        self.model = model
        self.metrics = ServeMetrics()
        # One thread runs every forward pass and every change to the model: the model is never
        # changed under a running batch, and torch's own threads parallelise each forward.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterkit-model")
        self.cache = AdapterCache(
            model,
            source,
            config.memory_budget,
            self.metrics,
            max_pinned=config.max_pinned,
            negative_ttl_s=config.negative_ttl_s,
            latest_ttl_s=config.latest_ttl_s,
        )
        self.runner = ModelRunner(
            model,
            tokenizer,
            max_length=config.max_length,
            on_long=config.on_long,
            max_batch_tokens=config.max_batch_tokens,
            split_overhead=config.split_overhead,
        )
        self.batcher = Batcher(
            self.runner.run_batch,
            self.executor,
            max_batch_size=config.max_batch_size,
            max_wait_ms=config.max_wait_ms,
            max_queue=config.max_queue,
            cross_task=config.cross_task,
            metrics=self.metrics,
        )
        self.draining = False
        self._sample_ids = itertools.count()

    async def in_model_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def pin(self, ref: str) -> LoadedAdapter:
        """The adapter, loaded if needed, pinned until ``unpin``."""
        entry = self.cache.acquire(ref)
        if entry is None:
            entry = await self.in_model_thread(self.cache.load_and_acquire, ref)
        return entry

    def unpin(self, ref: str) -> None:
        if self.cache.release(ref):  # over budget now that it is free to go
            self.executor.submit(self.cache.trim)

    async def run(
        self,
        ref: str | dict[str, Any] | None,
        tasks: tuple[str, ...],
        endpoint: str,
        make_job: Callable[[LoadedAdapter | None], Awaitable[Any]],
    ) -> Any:
        if isinstance(ref, dict):
            return await self._run_composed(ref, tasks, endpoint, make_job)
        entry = await self.pin(ref) if ref is not None else None
        try:
            if entry is not None and entry.task_type not in tasks:
                raise HTTPProblem(
                    422,
                    f"adapter {ref!r} is a {entry.task_type!r} task; {endpoint} serves {', '.join(tasks)} tasks",
                )
            return await make_job(entry)
        finally:
            if ref is not None:
                self.unpin(ref)

    async def _run_composed(
        self,
        value: dict[str, Any],
        tasks: tuple[str, ...],
        endpoint: str,
        make_job: Callable[[LoadedAdapter | None], Awaitable[Any]],
    ) -> Any:
        """A request for a composition: every member pinned; the job's adapter answers with the last
        member's task (its head and labels) and routes the composition of the members' model names."""
        try:
            block = from_json(value)
        except ValueError as e:
            raise HTTPProblem(422, f"adapter: {e}") from None
        if isinstance(block, Parallel) or not isinstance(block, Block):
            raise HTTPProblem(422, 'adapter: a composition here is {"stack": [...]} or {"average": [...]}')
        refs = list(dict.fromkeys(block.leaves()))
        if any(not 1 <= len(r) <= 300 for r in refs):
            raise HTTPProblem(422, "adapter: each member is a reference of 1 to 300 characters")
        pinned: list[str] = []
        try:
            entries = {}
            for r in refs:
                entries[r] = await self.pin(r)
                pinned.append(r)
            try:
                composed = block.renamed({r: e.name for r, e in entries.items()})
                self.model._make_route([composed])  # nesting, sizes: a clear 422 before queueing
            except (ValueError, TypeError, KeyError) as e:
                raise HTTPProblem(422, f"adapter: {e}") from None
            head = entries[head_name(block)]
            if head.task_type not in tasks:
                raise HTTPProblem(
                    422,
                    f"the composition's last member {head.ref!r} is a {head.task_type!r} task; "
                    f"{endpoint} serves {', '.join(tasks)} tasks",
                )
            return await make_job(LoadedAdapter(head.ref, composed, head.task_type, head.labels, 0))
        finally:
            for r in pinned:
                self.unpin(r)

    def preload(self) -> None:
        """Load ``config.adapters`` now, before serving (nothing else touches the model yet)."""
        for ref in self.config.adapters:
            self.cache.load_and_acquire(ref)
            self.cache.release(ref)
        self.cache.trim()

    async def startup(self) -> None:
        self.batcher.start()

    async def shutdown(self) -> None:
        await self.batcher.stop()
        self.executor.shutdown(wait=True)


def _endpoint_label(path: str) -> str:
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{adapter}"
    known = (
        "/v1/classify",
        "/v1/tag",
        "/v1/generate",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/adapters",
        "/health",
        "/metrics",
        "/docs",
        "/openapi.json",
    )
    return path if path in known else "other"


class RequestMetrics:
    """ASGI middleware counting requests by endpoint and status and timing them. Plain ASGI rather
    than ``@app.middleware("http")``, whose per-request overhead is a visible share of a classify."""

    def __init__(self, app: Any, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_and_watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            endpoint = _endpoint_label(scope["path"])
            self.metrics.requests.inc(endpoint=endpoint, status=str(status[0]))
            self.metrics.latency.observe(time.perf_counter() - start, endpoint=endpoint)


def create_app(
    config: ServeConfig,
    *,
    model: AdapterModel | None = None,
    tokenizer: Any = None,
    source: AdapterSource | None = None,
) -> FastAPI:
    """Build the app; loads the base model from ``config.base`` unless ``model`` and ``tokenizer`` are given."""
    if not is_loopback(config.host) and not config.admin_token:
        raise ValueError(
            f"serving on {config.host} needs an admin token for loading and unloading adapters "
            "(--admin-token or $ADAPTERKIT_ADMIN_TOKEN); without one, bind to 127.0.0.1"
        )
    if model is None or tokenizer is None:
        model, tokenizer = load_base(config.base, config.model_kind, sites=parse_sites(config.sites))
    if source is None:
        source = open_source(config.registry, token=config.registry_token)
    service = Service(config, model, tokenizer, source)
    service.preload()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.startup()
        try:
            yield
        finally:
            await service.shutdown()

    app = FastAPI(
        title="adapterkit serve",
        description="Many bottleneck-adapter tasks on one base model; requests for any tasks share forward passes.",
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
    )
    app.state.service = service
    metrics = service.metrics

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, e: HTTPProblem) -> JSONResponse:
        return SafeJSONResponse({"detail": e.detail, **e.extra}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes the input: megabytes back for a megabyte sent, and a 500 for
        # input that cannot be encoded (a lone surrogate). Say where and what, never the input.
        return SafeJSONResponse({"detail": validation_detail(e.errors())}, status_code=422)

    limiter = FailedAuthLimiter()

    def require_admin(request: Request) -> None:
        """Loading and unloading need the admin token, when the server has one."""
        if not config.admin_token:
            return
        client = client_address(request)
        wait = limiter.blocked(client)
        if wait:
            raise HTTPProblem(429, "too many wrong admin tokens from this address", headers={"Retry-After": str(int(wait) + 1)})
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), config.admin_token.encode()):
            return
        if header:
            limiter.failed(client)
        raise HTTPProblem(401, "this endpoint needs 'Authorization: Bearer <admin token>'", headers={"WWW-Authenticate": "Bearer"})

    for exc in (
        BaseModelMismatch,
        ArtifactError,
        UnknownAdapter,
        BadReference,
        InputTooLong,
        QueueFull,
        AdapterBusy,
        SourceUnavailable,
        CacheFull,
    ):

        async def _mapped(request: Request, e: Exception) -> JSONResponse:
            p = problem_for(e)
            assert p is not None
            return await _problem(request, p)

        app.add_exception_handler(exc, _mapped)

    app.add_middleware(BodyLimit, limit=config.max_body_bytes, error_key="detail")
    app.add_middleware(SecurityHeaders)
    app.add_middleware(RequestMetrics, metrics=metrics)
    # OpenAI-compatible generation by continuous batching (openai_api.py): /v1/completions,
    # /v1/chat/completions, /v1/models; its decode loop starts and drains with the app.
    app.state.decode = mount_openai_api(app, service)

    # -- tasks -----------------------------------------------------------------------------------

    @app.post("/v1/classify", response_model=ClassifyResponse, summary="Classify a text or a text pair")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        encoded = service.runner.encode(body.text, body.text_pair)

        async def job(entry: LoadedAdapter | None) -> Any:
            return await service.batcher.submit(
                "classify", adapter_key(body.adapter), len(encoded.ids), Row(entry, encoded)
            )

        result = await service.run(body.adapter, SEQUENCE_TASKS, "/v1/classify", job)
        return {"adapter": body.adapter, **result}

    @app.post("/v1/tag", response_model=TagResponse, summary="Label every token of a text")
    async def tag(body: TagRequest) -> dict[str, Any]:
        encoded = service.runner.encode(body.text, offsets=True)

        async def job(entry: LoadedAdapter | None) -> Any:
            return await service.batcher.submit("tag", adapter_key(body.adapter), len(encoded.ids), Row(entry, encoded))

        result = await service.run(body.adapter, TOKEN_TASKS, "/v1/tag", job)
        return {"adapter": body.adapter, **result}

    @app.post(
        "/v1/generate", response_model=GenerateResponse, summary="Continue a prompt (decoder base models)"
    )
    async def generate(body: GenerateRequest) -> dict[str, Any]:
        if not service.runner.can_generate:
            raise HTTPProblem(422, "this server's base model is not a decoder: it cannot generate")
        if body.max_new_tokens is None:
            body.max_new_tokens = min(32, config.max_new_tokens)
        if body.max_new_tokens > config.max_new_tokens:
            raise HTTPProblem(
                422,
                f"max_new_tokens is {body.max_new_tokens}; this server allows at most {config.max_new_tokens}",
            )
        encoded = service.runner.encode(body.prompt, reserve=body.max_new_tokens)
        options = body.model_dump(
            include={"max_new_tokens", "do_sample", "seed", "temperature", "top_k", "top_p"}
        )
        # Greedy rows with the same length batch together; a sampled row runs alone, so that its seed
        # alone decides its tokens.
        lane = (
            ("generate", body.max_new_tokens, next(service._sample_ids))
            if body.do_sample
            else ("generate", body.max_new_tokens)
        )

        async def job(entry: LoadedAdapter | None) -> Any:
            row = Row(entry, encoded, options)
            return await service.batcher.submit(
                lane, adapter_key(body.adapter), len(encoded.ids), row, solo=body.do_sample
            )

        result = await service.run(body.adapter, LM_TASKS, "/v1/generate", job)
        return {"adapter": body.adapter, **result}

    # -- adapters --------------------------------------------------------------------------------

    @app.get("/v1/adapters", summary="Loaded adapters, least recently used first")
    async def list_adapters(
        request: Request,
        available: bool = Query(False, description="also list what the registry offers (admin token)"),
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "loaded": [e.info() for e in service.cache.loaded()],
            "used_bytes": service.cache.total_bytes(),
            "budget_bytes": service.cache.budget_bytes,
        }
        if available:
            require_admin(request)
            out["available"] = await asyncio.to_thread(service.cache.source.available)
        return out

    @app.post("/v1/adapters", summary="Load an adapter now (admin token)", dependencies=[Depends(require_admin)])
    async def load_adapter(body: LoadRequest) -> dict[str, Any]:
        service.cache.forget_failure(body.adapter)  # an operator's explicit load tries again now
        entry = await service.pin(body.adapter)
        service.unpin(body.adapter)
        return {"loaded": True, **entry.info()}

    @app.delete("/v1/adapters/{adapter:path}", summary="Unload an adapter (admin token)", dependencies=[Depends(require_admin)])
    async def unload_adapter(adapter: str) -> dict[str, Any]:
        try:
            await service.in_model_thread(service.cache.unload, adapter)
        except KeyError:
            raise HTTPProblem(404, f"adapter {adapter[:300]!r} is not loaded") from None
        return {"adapter": adapter, "unloaded": True}

    # -- operations ------------------------------------------------------------------------------

    @app.get("/health", summary="200 while serving, 503 while draining")
    async def health() -> JSONResponse:
        body = {
            "status": "draining" if service.draining else "ok",
            "base": model.fingerprint()["id"],
            "model_type": model.config.model_type,
            "can_generate": service.runner.can_generate,
            "max_length": service.runner.max_length,
            "on_long": service.runner.on_long,
            "cross_task": service.batcher.cross_task,
            "adapters_loaded": len(service.cache.loaded()),
            "queue_depth": service.batcher.depth,
        }
        return JSONResponse(body, status_code=503 if service.draining else 200)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
