"""OpenAI-compatible generation endpoints, served by continuous batching (``decode.py``).

=============================  ======================================================================
``POST /v1/completions``       ``{"model", "prompt", "max_tokens", "temperature", "top_p", "top_k"?,
                               "seed", "stop", "stream"}`` -> a ``text_completion``
``POST /v1/chat/completions``  ``{"model", "messages", ...}``: the messages rendered with the
                               tokenizer's chat template -> a ``chat.completion``
``GET /v1/models``             the base model and the loaded adapters, as OpenAI ``model`` objects
=============================  ======================================================================

``model`` names the adapter (the same references as ``/v1/generate``'s ``adapter``), or the base
model alone: ``"base"`` or the base folder's name. With ``"stream": true`` the answer is a stream of
server-sent events, one chunk per step that adds text, then ``data: [DONE]``. As in OpenAI's API,
``temperature`` defaults to 1 (sampling) and 0 is greedy; ``top_k`` and ``ignore_eos`` are extensions
(as in vLLM). Every request joins the running decode batch between two steps and leaves when done.
Options the server does not implement (``n`` > 1, ``logprobs``, ``echo``, penalties, tools...) are
refused with 422, never silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .decode import (
    DecodeEngine,
    DecodeLoop,
    DecodeRequest,
    GenerationStream,
    SamplingOptions,
    TokenEvent,
    unsupported_reason,
)
from .runner import LM_TASKS, InputTooLong

BASE_NAMES = ("base",)
GENERATION_TASKS = LM_TASKS


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt or unsupported option is a 422

    model: str = Field(min_length=1, max_length=300, description="an adapter reference, or 'base'")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2, description="0: greedy")
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1, description="extension: sample from the k likeliest tokens")
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(default=None, description="up to 16 strings; the text ends before the first")
    stream: bool = False
    stream_options: dict[str, bool] | None = Field(default=None, description="{'include_usage': true}")
    ignore_eos: bool = Field(default=False, description="extension: run to max_tokens")
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    user: str | None = Field(default=None, max_length=300)
    presence_penalty: float = Field(default=0.0, ge=0, le=0, description="not supported: 0 only")
    frequency_penalty: float = Field(default=0.0, ge=0, le=0, description="not supported: 0 only")

    @model_validator(mode="after")
    def _check_stop(self) -> _Options:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16 or any(not s or len(s) > 200 for s in stops):
            raise ValueError("stop: at most 16 strings, each 1 to 200 characters")
        if self.stream_options is not None and set(self.stream_options) - {"include_usage"}:
            raise ValueError("stream_options: only include_usage is supported")
        return self

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Options):
    prompt: str | list[str] | list[int] = Field(description="a text, a list of one text, or token ids")
    echo: bool = Field(default=False, description="not supported: false only")
    logprobs: None = Field(default=None, description="not supported")

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise ValueError("one prompt per request (a list of one text, or token ids)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is empty")
        if isinstance(self.prompt, str) and len(self.prompt) > 1_000_000:
            raise ValueError("prompt is over 1,000,000 characters")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1_000_000)
    name: str | None = Field(default=None, max_length=64)


class ChatRequest(_Options):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="same as max_tokens")
    logprobs: bool = Field(default=False, description="not supported: false only")

    @model_validator(mode="after")
    def _no_logprobs(self) -> ChatRequest:
        if self.logprobs:
            raise ValueError("logprobs is not supported")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree")
            self.max_tokens = self.max_completion_tokens
        return self


# -- the endpoints ---------------------------------------------------------------------------------


def mount_openai_api(app: FastAPI, service: Any, *, policy: str = "continuous") -> DecodeLoop | None:
    """Add the OpenAI-compatible endpoints to ``app``, served by a DecodeLoop in the service's model
    thread (started and drained with the app's lifespan). Returns the loop; None on a base that
    continuous decoding cannot serve (an encoder-decoder), whose generation endpoints here then answer
    422 with the reason (``/v1/generate`` serves it).

    ``service`` is the app's ``Service``: its model, runner (tokenizer, limits), adapter cache (pinning)
    and executor (the one model thread).
    """
    from .app import HTTPProblem  # the app's error type; imported here: app.py imports this module

    config = service.config
    runner = service.runner
    tokenizer = runner.tokenizer
    refusal = unsupported_reason(service.model) if runner.can_generate else None
    decode: DecodeLoop | None = None
    if refusal is None:
        engine = DecodeEngine(
            service.model,
            tokenizer,
            max_batch_size=config.max_batch_size,
            max_prefill_tokens=config.max_batch_tokens,
            max_length=runner.max_length,
            pad_token_id=runner.pad_id,
        )
        decode = DecodeLoop(engine, service.executor, max_queue=config.max_queue, policy=policy)
    base_names = set(BASE_NAMES)
    if config.base:
        base_names.add(Path(config.base).name)

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with inner(a) as state:
            if decode is None:
                yield state
                return
            decode.start()
            try:
                yield state
            finally:
                await decode.stop()  # before the model thread stops: running streams finish

    app.router.lifespan_context = lifespan

    def check_decoding() -> None:
        if not runner.can_generate:
            raise HTTPProblem(422, "this server's base model is not a decoder: it cannot generate")
        if refusal is not None:
            raise HTTPProblem(422, refusal)

    def options(body: _Options, default_max: int) -> SamplingOptions:
        max_tokens = body.max_tokens if body.max_tokens is not None else min(default_max, config.max_new_tokens)
        if max_tokens > config.max_new_tokens:
            raise HTTPProblem(422, f"max_tokens is {max_tokens}; this server allows at most {config.max_new_tokens}")
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p if body.top_p < 1 else None,
            seed=body.seed,
            stop=body.stops(),
            ignore_eos=body.ignore_eos,
        )

    def fit(ids: list[int], max_tokens: int) -> list[int]:
        """The prompt within the model's limit, leaving room for ``max_tokens`` (runner's policy:
        truncate keeps the prompt's end; reject answers 413)."""
        limit = runner.max_length - max_tokens
        if limit < 1:
            raise InputTooLong(f"no room for the prompt: the model's limit is {runner.max_length} tokens and max_tokens is {max_tokens}")
        if not ids:
            raise HTTPProblem(422, "the prompt is empty (it has no tokens)")
        if len(ids) <= limit:
            return ids
        if runner.on_long == "reject":
            raise InputTooLong(f"prompt is {len(ids)} tokens long; with max_tokens {max_tokens} this server's limit is {limit}")
        return ids[-limit:]

    async def start(body: _Options, ids: list[int], sampling: SamplingOptions) -> tuple[GenerationStream, int]:
        """Pin the adapter, queue the request; the loop unpins once the row has left the batch."""
        check_decoding()
        assert decode is not None
        ref = None if body.model in base_names else body.model
        entry = await service.pin(ref) if ref is not None else None
        try:
            if entry is not None and entry.task_type not in GENERATION_TASKS:
                raise HTTPProblem(422, f"adapter {ref!r} is a {entry.task_type!r} task; generation serves {', '.join(GENERATION_TASKS)} tasks")
            request = DecodeRequest(ids, None if entry is None else entry.name, sampling)
            release: Callable[[], None] | None = (lambda: service.unpin(ref)) if ref is not None else None
            stream = decode.submit(request, release)
        except BaseException:
            if ref is not None:
                service.unpin(ref)
            raise
        return stream, len(ids)

    @app.get("/v1/models", summary="The base model and the loaded adapters (OpenAI format)")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        data = [{"id": "base", "object": "model", "created": created, "owned_by": "adapterkit"}]
        for entry in service.cache.loaded():
            info = entry.info()
            data.append({"id": info.get("adapter", entry.name), "object": "model", "created": created, "owned_by": "adapterkit"})
        return {"object": "list", "data": data}

    @app.post("/v1/completions", summary="OpenAI-compatible text completion (continuous batching)")
    async def completions(body: CompletionRequest) -> Any:
        check_decoding()
        sampling = options(body, 16)  # OpenAI's default max_tokens for completions
        if isinstance(body.prompt, list) and isinstance(body.prompt[0], int):
            vocab = len(tokenizer)
            if any(not 0 <= t < vocab for t in body.prompt):
                raise HTTPProblem(422, f"prompt token ids must be in [0, {vocab})")
            ids = list(body.prompt)
        else:
            text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
            ids = list(tokenizer(text)["input_ids"])
        stream, prompt_tokens = await start(body, fit(ids, sampling.max_tokens), sampling)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return _sse(stream, chunk, prompt_tokens, include_usage=bool((body.stream_options or {}).get("include_usage")))
        text, finish, used = await _collect(stream)
        out = chunk(text, finish)
        out["usage"] = _usage(prompt_tokens, used)
        return out

    @app.post("/v1/chat/completions", summary="OpenAI-compatible chat completion (continuous batching)")
    async def chat(body: ChatRequest) -> Any:
        check_decoding()
        if getattr(tokenizer, "chat_template", None) is None:
            raise HTTPProblem(422, "the base model's tokenizer has no chat template: use /v1/completions")
        sampling = options(body, config.max_new_tokens)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template may reject a conversation (roles, order)
            raise HTTPProblem(422, f"the chat template rejected these messages: {e}") from None
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template has them
        stream, prompt_tokens = await start(body, fit(ids, sampling.max_tokens), sampling)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        first = [True]

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            delta: dict[str, Any] = {"content": text} if text or finish is None else {}
            if first[0]:
                delta = {"role": "assistant", **delta}
                first[0] = False
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return _sse(stream, chunk, prompt_tokens, include_usage=bool((body.stream_options or {}).get("include_usage")))
        text, finish, used = await _collect(stream)
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": _usage(prompt_tokens, used),
        }

    return decode


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _openai_finish(event: TokenEvent) -> str:
    """OpenAI's finish reasons: stop (EOS or a stop string) or length. A failed row raises."""
    if event.finish_reason == "error":
        raise RuntimeError(f"generation failed: {event.error}") from event.error
    return "length" if event.finish_reason == "length" else "stop"


async def _collect(stream: GenerationStream) -> tuple[str, str, int]:
    """The whole text, the finish reason and the token count; cancels the row if the client leaves."""
    parts: list[str] = []
    try:
        async for event in stream:
            parts.append(event.text)
            if event.finish_reason is not None:
                return "".join(parts), _openai_finish(event), event.completion_tokens
    finally:
        stream.cancel()  # a no-op once finished; a client gone mid-way frees its row
    raise RuntimeError("the generation stream ended without finishing")


def _sse(
    stream: GenerationStream,
    chunk: Callable[[str, str | None], dict[str, Any]],
    prompt_tokens: int,
    *,
    include_usage: bool,
) -> StreamingResponse:
    """Server-sent events: a chunk per step that adds text, a last chunk with the finish reason,
    optionally a usage chunk, then ``[DONE]``. A client that disconnects cancels its row."""

    async def events() -> AsyncIterator[bytes]:
        try:
            async for event in stream:
                if event.finish_reason is None:
                    if event.text:
                        yield _data(chunk(event.text, None))
                    continue
                try:
                    finish = _openai_finish(event)
                except RuntimeError as e:
                    yield _data({"error": {"message": str(e), "type": "server_error"}})
                    return
                yield _data(chunk(event.text, finish))
                if include_usage:
                    last = chunk("", finish)
                    last["choices"] = []
                    last["usage"] = _usage(prompt_tokens, event.completion_tokens)
                    yield _data(last)
                yield b"data: [DONE]\n\n"
        finally:
            stream.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _data(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
