"""The hub server: a JSON API and a small web page over one ``LocalRegistry``.

    adapterkit hub serve --root /srv/hub --host 127.0.0.1 --port 8765

Reading is anonymous; publishing, yanking and deleting need a token (``adapterkit hub token create``),
and a namespace belongs to the owner of the token that first published into it. Uploads are raw
request bodies streamed into a temp file with a size limit, validated, and only then made visible.
Every error is a 4xx with ``{"error": "<what is wrong>"}``. OpenAPI at ``/docs``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from .errors import BadRequest, HubError, InvalidArtifact, NotFound, TooLarge, Unauthorized
from .guards import (
    BodyLimit,
    FailedAuthLimiter,
    SafeJSONResponse,
    SecurityHeaders,
    client_address,
    has_surrogate,
    validation_detail,
)
from .names import LATEST, NAME_RULE, Ref, shown, validate_name, validate_version
from .query import LIMIT_DEFAULT, LIMIT_MAX, TEXT_MAX, SearchQuery
from .registry import (
    AdapterVersion,
    IndexedRegistry,
    LocalRegistry,
    parse_declared_base,
    validate_description,
    validate_metrics,
)
from .tokens import TokenStore

HERE = Path(__file__).parent
DEFAULT_MAX_UPLOAD = 256 << 20
# After an error, read (and drop) up to this much of a request body, so the client, still sending,
# gets the answer instead of a reset connection.
DRAIN_LIMIT = 64 << 20
JSON_BODY_MAX = 64 << 10
VALIDATION_SLOTS = 4
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# What may appear inside the page's copy-paste snippet; anything else is replaced by a placeholder.
SNIPPET_MODEL_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}$")  # a model id or relative folder
SNIPPET_URL_RE = re.compile(r"^https?://([A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]{0,200})?$")
MODEL_PLACEHOLDER = "<base model folder or id>"
URL_PLACEHOLDER = "http://<hub address>"
log = logging.getLogger("adapterkit.hub")


def _ref(namespace: str, name: str, version: str | None = None, *, allow_latest: bool = True) -> Ref:
    validate_name(namespace, "namespace")
    validate_name(name, "adapter name")
    if version is not None:
        version = validate_version(version, allow_latest=allow_latest)
    return Ref(namespace, name, version)


class RateLimited(HubError):
    """Too many failed authentications from one client address (HTTP 429 with Retry-After)."""

    status = 429

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise BadRequest("Authorization header must be 'Bearer <token>'")
    return token.strip()


def _json_param(what: str, text: str | None) -> Any:
    if text is None or text == "":
        return None
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise BadRequest(f"{what} is not valid JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
    if has_surrogate(doc):
        raise BadRequest(f"{what} holds a lone UTF-16 surrogate or is nested too deeply")
    return doc


def _content_length(request: Request) -> int | None:
    text = request.headers.get("content-length")
    if text is None:
        return None
    if not text.isdigit():
        raise BadRequest(f"Content-Length {text!r} is not a number")
    return int(text)


async def _drain(request: Request, limit: int = DRAIN_LIMIT) -> None:
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                return
    except (ClientDisconnect, RuntimeError):  # gone, or stream already read
        return


async def _json_body(request: Request) -> dict[str, Any]:
    length = _content_length(request)
    if length is not None and length > JSON_BODY_MAX:
        raise TooLarge(f"JSON body is {length} bytes; at most {JSON_BODY_MAX} are accepted")
    body = await request.body()
    if len(body) > JSON_BODY_MAX:
        raise TooLarge(f"JSON body is over {JSON_BODY_MAX} bytes")
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(doc).__name__}")
    if has_surrogate(doc):
        raise BadRequest("request body holds a lone UTF-16 surrogate or is nested too deeply")
    return doc


def safe_base_url(url: str | None) -> str:
    """``url`` when it is a plain http(s) URL of the strict form the snippet allows, else a placeholder."""
    return url.rstrip("/") if url and SNIPPET_URL_RE.match(url.rstrip("/")) else URL_PLACEHOLDER


def load_snippet(base_url: str, version: AdapterVersion) -> str:
    """The copy-paste code shown on an adapter's page.

    Every value in it is a Python literal made by ``repr()`` from text that first matched a strict
    character set (a model id or folder, a plain URL, a validated reference); anything else becomes
    a placeholder. So nothing a publisher writes into an artifact, and nothing a client puts in a
    request header, can turn into code that runs when the snippet is pasted.
    """
    model = version.base_model_id  # a local path the artifact recorded is never shown
    if not model or not SNIPPET_MODEL_RE.match(model) or ".." in model.split("/"):
        model = MODEL_PLACEHOLDER
    ref = "hub:" + str(Ref(validate_name(version.namespace), validate_name(version.name), validate_version(version.version, allow_latest=False)))
    return (
        "# pip install 'adapterkit[hub]'\n"
        "import os\n"
        f"os.environ['ADAPTERKIT_REGISTRY'] = {safe_base_url(base_url)!r}\n"
        "from transformers import AutoModel\n"
        "from adapterkit import AdapterModel\n\n"
        f"model = AdapterModel(AutoModel.from_pretrained({model!r}))\n"
        f"model.load_adapter({ref!r})  # downloaded and sha256-verified\n"
    )


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def search_query(
    q: str | None = Query(None, max_length=TEXT_MAX, description="words to find in names, descriptions, labels, base models"),
    base_id: str | None = Query(None, max_length=TEXT_MAX, description="base model fingerprint id"),
    model_type: str | None = Query(None, max_length=TEXT_MAX, description="e.g. bert, gpt2, llama"),
    task_type: str | None = Query(None, max_length=TEXT_MAX, description="e.g. classification"),
    kind: str | None = Query(None, max_length=TEXT_MAX, description="houlsby, pfeiffer or parallel"),
    name_or_path: str | None = Query(None, max_length=TEXT_MAX, description="base model id, with or without organisation"),
    limit: int = Query(LIMIT_DEFAULT, ge=1, le=LIMIT_MAX),
) -> SearchQuery:
    """The search endpoint's query string, as the one ``SearchQuery`` type."""
    return SearchQuery(q, base_id, model_type, task_type, kind, name_or_path, limit)


def create_app(
    root: str | os.PathLike | IndexedRegistry,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    *,
    public_url: str | None = None,
    body_limit: int = JSON_BODY_MAX,
    auth_limiter: FailedAuthLimiter | None = None,
) -> FastAPI:
    """The ASGI app serving the registry at ``root`` (created if missing, reconciled on start), or
    ``root`` itself when it is a registry (PostgreSQL + S3: ``backends.open_backends``).

    ``public_url``: the address shown in the pages' snippets (default: the address the server's
    socket is bound to; never the request's Host header). ``body_limit``: the most bytes any request
    body but an upload may have. ``auth_limiter``: failed-token rate limit (default: 10 per minute
    per client address).
    """
    if public_url is not None and safe_base_url(public_url) == URL_PLACEHOLDER:
        raise ValueError(f"public URL {public_url!r} must be a plain http(s)://host[:port][/path] URL")
    registry = root if isinstance(root, IndexedRegistry) else LocalRegistry(root)
    tokens = TokenStore(registry)
    limiter = auth_limiter or FailedAuthLimiter()
    app = FastAPI(
        title="adapterkit hub",
        version=__version__,
        description="Publish, find, version and download adapterkit adapters. Reads are anonymous; writes need a token.",
        default_response_class=SafeJSONResponse,
    )
    app.state.registry = registry
    app.state.tokens = tokens
    app.state.max_upload_bytes = max_upload_bytes
    # Validation materialises every tensor of an upload: bound how many are in memory at once.
    validating = asyncio.Semaphore(VALIDATION_SLOTS)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["human_size"] = _human_size
    templates.env.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def is_upload(method: str, path: str) -> bool:  # the publish endpoint streams under its own limit
        return method == "POST" and path.startswith("/api/adapters/") and path.endswith("/versions")

    app.add_middleware(BodyLimit, limit=body_limit, exempt=is_upload)
    app.add_middleware(SecurityHeaders)

    def owner_of(request: Request) -> str:
        """The token's owner; 429 for a client with too many recent failures, 401 for a bad token."""
        client = client_address(request)
        wait = limiter.blocked(client)
        if wait:
            raise RateLimited(f"too many failed token checks from this address; try again in {wait:.0f} s", wait)
        try:
            token = _bearer(request)
            return tokens.owner_of(token)
        except (Unauthorized, BadRequest):
            if request.headers.get("authorization"):  # a wrong guess; a missing token is no guess
                limiter.failed(client)
            raise

    # -- errors: always JSON {"error": ...} ------------------------------------------------------

    @app.exception_handler(HubError)
    async def _hub_error(request: Request, exc: HubError) -> JSONResponse:
        headers = {"Retry-After": str(max(1, int(exc.retry_after + 0.999)))} if isinstance(exc, RateLimited) else None
        return SafeJSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {shown(request.url.path)}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {shown(request.url.path)}"
        else:
            message = str(exc.detail)[:500]
        return SafeJSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The details (paths, internals) go to the server's log, never to the client.
        log.exception("internal error on %s %s", request.method, request.url.path[:200])
        return SafeJSONResponse({"error": f"internal error ({type(exc).__name__}); the server's log has the details"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return SafeJSONResponse({"error": "bad request: " + validation_detail(exc.errors())}, status_code=400)

    # -- JSON API --------------------------------------------------------------------------------

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, **registry.stats()}

    @app.get("/api/adapters")
    def search(query: Annotated[SearchQuery, Depends(search_query)]) -> dict[str, Any]:
        return {"adapters": [v.to_dict() for v in registry.find(query)]}

    @app.get("/api/adapters/{namespace}/{name}")
    def adapter(namespace: str, name: str) -> dict[str, Any]:
        ref = _ref(namespace, name)
        versions = registry.versions(str(ref))
        try:
            latest: dict[str, Any] | None = registry.info(str(ref)).to_dict()
        except NotFound:  # every version yanked
            latest = None
        return {"adapter": latest, "versions": [v.to_dict() for v in versions]}

    @app.get("/api/adapters/{namespace}/{name}/versions")
    def versions(namespace: str, name: str) -> dict[str, Any]:
        ref = _ref(namespace, name)
        return {"versions": [v.to_dict() for v in registry.versions(str(ref))]}

    @app.get("/api/adapters/{namespace}/{name}/versions/{version}")
    def version_info(namespace: str, name: str, version: str) -> dict[str, Any]:
        return registry.info(str(_ref(namespace, name, version))).to_dict()

    @app.api_route("/api/adapters/{namespace}/{name}/versions/{version}/file", methods=["GET", "HEAD"])
    def download(namespace: str, name: str, version: str, request: Request) -> Response:
        info = registry.info(str(_ref(namespace, name, version)))
        path = registry.blob_path(info)
        etag = f'"{info.sha256}"'
        # Exact versions never change: cache forever. "latest" moves: revalidate every time.
        cache = "no-cache" if version == LATEST else "public, max-age=31536000, immutable"
        headers = {"ETag": etag, "X-Content-SHA256": info.sha256, "Cache-Control": cache, "X-Adapter-Ref": info.ref}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        return FileResponse(
            path,
            media_type="application/octet-stream",
            filename=f"{info.namespace}-{info.name}-{info.version}.safetensors",
            headers=headers,
        )

    @app.post("/api/adapters/{namespace}/{name}/versions", status_code=201)
    async def publish(
        namespace: str,
        name: str,
        request: Request,
        version: str | None = None,
        description: str | None = None,
        metrics: str | None = None,
        base: str | None = None,
    ) -> JSONResponse:
        """Publish the request body (a ``.safetensors`` artifact) as a new version.

        Query: ``version`` (default: next whole number), ``description``, ``metrics`` (JSON object),
        ``base`` (the base model's fingerprint id or fingerprint JSON; the artifact must match it).
        Header ``X-Content-SHA256`` (optional): the body's sha256, to detect a transfer cut short.
        """
        limit = app.state.max_upload_bytes
        started = False
        declared: int | None = None
        try:
            declared = _content_length(request)
            ref = _ref(namespace, name, version, allow_latest=False)
            owner = owner_of(request)
            metrics_doc = validate_metrics(_json_param("metrics", metrics))
            description = validate_description(description)
            declared_base = parse_declared_base(_json_param("base", base) if base and base.lstrip().startswith("{") else base)
            expected_sha = request.headers.get("x-content-sha256")
            if expected_sha is not None and not SHA256_RE.match(expected_sha):
                raise BadRequest("X-Content-SHA256 must be 64 lowercase hex digits")
            await run_in_threadpool(registry.check_can_publish, ref, owner)
            if declared is not None and declared > limit:
                raise TooLarge(f"upload is {declared} bytes; this server accepts at most {limit} bytes")
            with registry.blobs.upload() as upload:
                started = True
                over = False
                drained = 0
                async for chunk in request.stream():
                    if over:  # keep reading, and dropping, so the client hears the answer
                        drained += len(chunk)
                        if drained > DRAIN_LIMIT:
                            break
                        continue
                    if upload.size + len(chunk) > limit:
                        over = True
                        continue
                    upload.write(chunk)
                if over:
                    raise TooLarge(f"upload is over {limit} bytes, the most this server accepts")
                if upload.size == 0:
                    raise InvalidArtifact("the upload is empty: send the .safetensors file as the request body")
                sha = upload.finish()
                if expected_sha is not None and sha != expected_sha:
                    raise InvalidArtifact(
                        f"upload is incomplete or corrupted: received {upload.size} bytes with sha256 {sha[:12]}…, "
                        f"but the client declared sha256 {expected_sha[:12]}…"
                    )
                async with validating:
                    info = await run_in_threadpool(
                        registry.publish_upload, upload, ref, description, metrics_doc, base=declared_base, owner=owner
                    )
        except ClientDisconnect:
            # The client went away mid-upload; the temp file is already gone and nothing was stored.
            return JSONResponse({"error": "upload was cut short by the client"}, status_code=400)
        except HubError:
            if not started and (declared is None or declared <= limit):
                await _drain(request)
            raise
        location = f"/api/adapters/{info.namespace}/{info.name}/versions/{info.version}"
        return JSONResponse(info.to_dict(), status_code=201, headers={"Location": location})

    @app.post("/api/adapters/{namespace}/{name}/versions/{version}/yank")
    async def yank(namespace: str, name: str, version: str, request: Request) -> dict[str, Any]:
        ref = _ref(namespace, name, version, allow_latest=False)
        owner = owner_of(request)
        doc = await _json_body(request)
        reason = doc.get("reason", "")
        if not isinstance(reason, str):
            raise BadRequest("'reason' must be a string")
        info = await run_in_threadpool(lambda: registry.yank(str(ref), validate_description(reason), owner=owner))
        return info.to_dict()

    @app.delete("/api/adapters/{namespace}/{name}/versions/{version}")
    def delete(namespace: str, name: str, version: str, request: Request) -> dict[str, Any]:
        ref = _ref(namespace, name, version, allow_latest=False)
        owner = owner_of(request)
        registry.delete(str(ref), owner=owner)
        return {"deleted": str(ref)}

    @app.api_route("/api/adapters/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def bad_adapter_path(rest: str, request: Request) -> None:
        """Paths the routes above did not match: say which part of the name is wrong."""
        await _drain(request, limit=1 << 20)
        if rest.startswith("/"):
            raise BadRequest(f"{shown(rest)} looks like an absolute path; adapters are named 'namespace/name' ({NAME_RULE})")
        parts = rest.split("/")
        validate_name(parts[0], "namespace")
        if len(parts) > 1:
            validate_name(parts[1], "adapter name")
        if len(parts) > 3 and parts[2] == "versions":
            validate_version(parts[3])
        raise NotFound(f"no such endpoint: {request.method} /api/adapters/{shown(rest)}")

    # -- web pages -------------------------------------------------------------------------------

    def page_results(q: str, model_type: str, task_type: str, kind: str, base_id: str) -> list[AdapterVersion]:
        try:
            query = SearchQuery(q or None, base_id or None, model_type or None, task_type or None, kind or None)
        except BadRequest:  # a page never fails on a silly query: it finds nothing
            return []
        return registry.find(query)

    def page_base_url(request: Request) -> str:
        if public_url is not None:
            return public_url.rstrip("/")
        server = request.scope.get("server")  # the bound socket's address, not the Host header
        if not server or server[1] is None:
            return URL_PLACEHOLDER
        host = f"[{server[0]}]" if ":" in str(server[0]) else str(server[0])
        return safe_base_url(f"http://{host}:{server[1]}")

    @app.get("/", include_in_schema=False)
    def index(
        request: Request,
        q: str = "",
        model_type: str = "",
        task_type: str = "",
        kind: str = "",
        base_id: str = "",
    ) -> Response:
        found = page_results(q, model_type, task_type, kind, base_id)
        context = {
            "q": q[:TEXT_MAX], "model_type": model_type, "task_type": task_type, "kind": kind, "base_id": base_id[:TEXT_MAX],
            "adapters": found, "facets": registry.facets(), "stats": registry.stats(), "version": __version__,
        }
        return templates.TemplateResponse(request, "index.html", context)

    @app.get("/adapters/{namespace}/{name}", include_in_schema=False)
    def adapter_page(request: Request, namespace: str, name: str) -> Response:
        ref = _ref(namespace, name)
        versions = registry.versions(str(ref))
        try:
            latest = registry.info(str(ref))
        except NotFound:
            latest = versions[-1]
        base_url = page_base_url(request)
        context = {
            "ref": ref, "latest": latest, "versions": list(reversed(versions)),
            "snippet": load_snippet(base_url, latest), "base_url": base_url, "version": __version__,
        }
        return templates.TemplateResponse(request, "adapter.html", context)

    return app


def serve(
    root: str | os.PathLike | IndexedRegistry,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    fd: int | None = None,
    log_level: str = "info",
    public_url: str | None = None,
) -> None:
    """Run the server until interrupted. ``fd``: serve on an already bound, listening socket (lets a
    supervisor or a test pick a free port without a race)."""
    import uvicorn

    app = create_app(root, max_upload_bytes, public_url=public_url)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug")
    server = uvicorn.Server(config)
    if fd is not None:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        server.run(sockets=[sock])
    else:
        server.run()
