"""``jaxdlm serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one :class:`~jaxdlm.serving.Engine`.

One host thread (:class:`Worker`) owns the engine: it takes requests from a thread-safe queue, inserts them into
free slots, steps the engine while any slot runs, and hands each request's new tokens back to the event loop
(``loop.call_soon_threadsafe`` into the request's ``asyncio.Queue``).  The HTTP side validates the body (pydantic,
then the one :meth:`Engine.check`), tokenizes, submits, and turns the events into a response or an SSE stream
(one chunk per engine step that commits tokens, then ``data: [DONE]``).  A client that goes away cancels its
request: the worker frees its slot before the next step.  SIGTERM (uvicorn's graceful shutdown) stops accepting
connections, lets the running requests finish, then stops the worker; the process exits 0.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /metrics`` (Prometheus text).  Errors are OpenAI-style ``{"error": {"message", "type", "param", "code"}}``:
400 for bad input (naming the field in ``param``), 503 with ``Retry-After`` when the queue is full.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import re
import threading
import time
import uuid
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from jaxdlm.generation.options import DecodeOptions

RETRY_AFTER_S = 1


# ---------------------------------------------------------------------------------------------------
# request bodies (unknown or wrongly typed fields are 400s naming the field)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stream: bool = False
    stream_options: dict | None = None
    n: Literal[1] = 1
    user: str | None = None
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False
    # the diffusion settings, per request
    threshold: float | None = None
    policy: str | None = None
    margin: float | None = None
    entropy_bound: float | None = None


class CompletionBody(_Body):
    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=5)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class RequestError(ValueError):
    """A 400: ``message`` with the field it names (``param``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """The waiting queue is full (a 503 with ``Retry-After``)."""


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    """An OpenAI-style error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def options_of(body: _Body) -> DecodeOptions:
    """The request's :class:`DecodeOptions` (unset fields: the library's defaults)."""
    kw = dict(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed or 0)
    for name in ("threshold", "policy", "margin", "entropy_bound"):
        if getattr(body, name) is not None:
            kw[name] = getattr(body, name)
    if body.stop_token_ids is not None:
        kw["eos_token_id"] = tuple(body.stop_token_ids)
    return DecodeOptions(**kw)


def param_of(message: str) -> str | None:
    """The field a :class:`DecodeOptions` / engine message names (``"threshold=2 must ..."`` -> ``threshold``)."""
    m = re.match(r"^(\w+)[=:]", message)
    if m is None:
        return None
    name = m.group(1)
    return {"eos_token_id": "stop_token_ids", "prompt": "prompt"}.get(name, name)


# ---------------------------------------------------------------------------------------------------
# the engine's thread


@dataclasses.dataclass(eq=False)
class Job:
    """One request on its way through the worker: its events go to ``events`` on ``loop``."""

    prompt: np.ndarray
    options: DecodeOptions
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False
    slot: int | None = None
    produced: int = 0  # output tokens so far
    logprobs: bool = False  # the response carries each token's log-probability

    def send(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Metrics:
    """The server's Prometheus metrics, in their own registry."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("jaxdlm_requests", "requests by endpoint and outcome", ["endpoint", "status"],
                                registry=r)
        self.queue_depth = Gauge("jaxdlm_queue_depth", "requests waiting for a slot", registry=r)
        self.active = Gauge("jaxdlm_active_slots", "slots running a request", registry=r)
        self.tokens = Counter("jaxdlm_generated_tokens", "output tokens (rate() gives tokens/s)", registry=r)
        self.prompt_tokens = Counter("jaxdlm_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.nfe = Counter("jaxdlm_nfe", "forward passes of finished requests (per request accounting)", registry=r)
        self.steps = Counter("jaxdlm_engine_steps", "engine steps (batched cycles)", registry=r)
        self.tpf = Histogram("jaxdlm_tokens_per_forward", "tokens per forward of finished requests", registry=r,
                             buckets=(0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32))
        self.ttft = Histogram("jaxdlm_time_to_first_token_seconds", "submit to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("jaxdlm_inter_token_latency_seconds", "time between a request's token chunks / tokens",
                             registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))


class Worker(threading.Thread):
    """The host thread that owns the engine (nothing else touches it)."""

    def __init__(self, engine, metrics: Metrics, max_queue: int = 256, cycles: int = 1):
        super().__init__(name="jaxdlm-engine", daemon=True)
        self.engine, self.metrics, self.max_queue, self.cycles = engine, metrics, max_queue, cycles
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: list[Job] = []
        self.running: dict[int, Job] = {}
        self.last_time: dict[int, float] = {}
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self.pending = 0  # submitted and not yet in a slot (guarded by _lock)
        self.error: BaseException | None = None

    def submit(self, job: Job) -> None:
        """Queues ``job`` (thread-safe); :class:`QueueFull` when ``max_queue`` requests already wait or the engine
        has stopped on an error."""
        if self.error is not None:
            raise QueueFull(f"the engine stopped on an error ({type(self.error).__name__}: {self.error})")
        with self._lock:
            if self.pending >= self.max_queue:
                raise QueueFull(f"{self.pending} requests are waiting for a slot; retry later")
            self.pending += 1
        self.metrics.queue_depth.set(self.pending)
        self.inbox.put(job)

    def cancel(self, job: Job) -> None:
        """Marks ``job`` cancelled (thread-safe); the worker frees its slot before its next step."""
        job.cancelled = True
        self.inbox.put(None)  # wake the worker

    def stop(self) -> None:
        self._halt.set()
        self.inbox.put(None)

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self._take(block=not self.running and not self.waiting)
                self._drop_cancelled()
                self._fill_slots()
                if self.running:
                    self._step()
        except BaseException as e:  # noqa: BLE001 - fail every request rather than wedge
            self.error = e
            for job in list(self.running.values()) + self.waiting:
                job.send(("error", f"{type(e).__name__}: {e}"))

    def _take(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            while True:
                if item is not None:
                    self.waiting.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _unqueue(self, n: int) -> None:
        with self._lock:
            self.pending -= n
        self.metrics.queue_depth.set(self.pending)

    def _drop_cancelled(self) -> None:
        gone = [j for j in self.waiting if j.cancelled]
        if gone:
            self.waiting = [j for j in self.waiting if not j.cancelled]
            self._unqueue(len(gone))
        for slot, job in list(self.running.items()):
            if job.cancelled:
                self.engine.cancel(slot)
                del self.running[slot]
        self.metrics.active.set(len(self.running))

    def _fill_slots(self) -> None:
        """Waiting jobs take the free slots, all in one batched insert."""
        jobs = []
        while self.waiting and len(jobs) < len(self.engine.free):
            job = self.waiting.pop(0)
            self._unqueue(1)
            try:
                self.engine.check_request(job.prompt, job.options, job.max_tokens)
            except ValueError as e:  # checked before submit; a late failure still answers
                job.send(("error", str(e)))
                continue
            jobs.append(job)
        if jobs:
            slots = self.engine.insert_many([(j.prompt, j.options, j.max_tokens) for j in jobs])
            for job, slot in zip(jobs, slots):
                job.slot = slot
                self.metrics.prompt_tokens.inc(len(job.prompt))
                self.running[slot] = job
        self.metrics.active.set(len(self.running))

    def _step(self) -> None:
        # several cycles per dispatch only while nobody waits (a finished slot still ends the dispatch at once)
        out = self.engine.step(1 if self.waiting else self.cycles)
        now = time.perf_counter()
        self.metrics.steps.inc()
        for slot, job in list(self.running.items()):
            n = int(out.counts[slot])
            if n:
                if slot not in self.last_time:
                    self.metrics.ttft.observe(now - job.submitted)
                else:
                    gap = (now - self.last_time[slot]) / n
                    for _ in range(n):
                        self.metrics.itl.observe(gap)
                self.last_time[slot] = now
                self.metrics.tokens.inc(n)
                job.produced += n
                lps = out.logp[slot, :n].tolist() if out.logp is not None else [None] * n
                job.send(("tokens", out.tokens[slot, :n].tolist(), int(out.nfe[slot]), lps))
            if out.done[slot]:
                nfe = int(out.nfe[slot])
                self.metrics.nfe.inc(nfe)
                self.metrics.tpf.observe(job.produced / max(nfe, 1))
                job.send(("done", "stop" if out.ended[slot] else "length", nfe))
                del self.running[slot]
                self.last_time.pop(slot, None)
        self.metrics.active.set(len(self.running))


# ---------------------------------------------------------------------------------------------------
# the app


class Server:
    """The HTTP side: tokenization, validation, the worker, the FastAPI app (:meth:`app`)."""

    def __init__(self, engine, tokenizer, *, model_name: str = "jaxdlm", max_queue: int = 256,
                 chat_template: str | None = None, cycles: int = 1):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        self.metrics = Metrics()
        self.worker = Worker(engine, self.metrics, max_queue, cycles)
        self.ready = False

    # --------------------------------------------------------------------------------------- requests

    def prompt_ids(self, body: _Body) -> np.ndarray:
        if isinstance(body, ChatBody):
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError("this model's tokenizer has no chat template: use /v1/completions (or start "
                                   "the server with --chat-template FILE)", "messages")
            text = self.tokenizer.apply_chat_template([m.model_dump() for m in body.messages],
                                                      add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        elif isinstance(body.prompt, str):
            ids = self.tokenizer(body.prompt)["input_ids"]
        else:
            ids = body.prompt
        ids = np.asarray(ids, np.int32).reshape(-1)
        vocab = self.engine.model.config.vocab_size
        if ids.size == 0:
            raise RequestError("the prompt is empty: it needs at least one token", "prompt")
        if ids.min() < 0 or ids.max() >= vocab:
            raise RequestError(f"prompt token ids must lie in [0, {vocab})", "prompt")
        return ids

    def job(self, body: _Body, loop) -> Job:
        """The checked request (``RequestError`` naming the field)."""
        if body.model is not None and body.model != self.model_name:
            raise RequestError(f"model={body.model!r} is not served here; this server serves {self.model_name!r}",
                               "model")
        ids = self.prompt_ids(body)
        try:
            opts = self.engine.check(ids.size, options_of(body), body.max_tokens)
        except ValueError as e:
            raise RequestError(str(e), param_of(str(e))) from None
        return Job(ids, opts, body.max_tokens, loop, asyncio.Queue(), logprobs=self._wants_logprobs(body))

    def _wants_logprobs(self, body: _Body) -> bool:
        """Whether the response carries log-probabilities (only the chosen tokens': no top alternatives)."""
        if isinstance(body, ChatBody):
            want, top, field = body.logprobs, body.top_logprobs or 0, "top_logprobs"
        else:
            want, top, field = body.logprobs is not None, body.logprobs or 0, "logprobs"
        if top:
            raise RequestError(f"{field}={top}: only the chosen token's log-probability is served (pass {field}=0)",
                               field)
        if want and not getattr(self.engine, "logprobs", False):
            raise RequestError("logprobs: this server was started with --no-logprobs", "logprobs")
        return want

    def _logprobs(self, kind: str, ids: list[int], lps: list[float], offset: int) -> dict:
        """The OpenAI ``logprobs`` object of ``ids`` (completions: text offsets from ``offset``)."""
        pieces = [self.tokenizer.decode([i]) for i in ids]
        if kind == "chat":
            return {"content": [{"token": p, "logprob": lp, "bytes": list(p.encode("utf-8", "surrogatepass")),
                                 "top_logprobs": []} for p, lp in zip(pieces, lps)]}
        offsets = list(np.cumsum([offset] + [len(p) for p in pieces[:-1]])) if pieces else []
        return {"tokens": pieces, "token_logprobs": lps, "top_logprobs": None, "text_offset": [int(o) for o in offsets]}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --------------------------------------------------------------------------------------- responses

    def _chunk(self, kind: str, rid: str, created: int, text: str | None, finish: str | None, ids=None) -> dict:
        if kind == "chat":
            delta = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        if ids is not None:
            choice["token_ids"] = ids
        return {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [choice]}

    def _usage(self, job: Job, n_out: int, nfe: int) -> dict:
        return {"prompt_tokens": int(job.prompt.size), "completion_tokens": n_out,
                "total_tokens": int(job.prompt.size) + n_out, "nfe": nfe}

    async def _events(self, job: Job, request=None):
        """The job's events until ``done``.  ``request``: poll it for a disconnect while nothing arrives (a
        non-streamed response; a stream's disconnect cancels the generator itself)."""
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    raise asyncio.CancelledError from None
                continue
            if event[0] == "error":
                raise RuntimeError(event[1])
            yield event
            if event[0] == "done":
                return

    async def complete(self, kind: str, body: _Body, request):
        job = self.job(body, asyncio.get_running_loop())
        self.worker.submit(job)
        rid, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        endpoint = request.url.path
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._stream(kind, endpoint, job, body, rid, created, include_usage),
                                     media_type="text/event-stream")
        ids, lps, finish, nfe = [], [], "length", 0
        try:
            async for event in self._events(job, request):
                if event[0] == "tokens":
                    ids += event[1]
                    lps += event[3]
                else:
                    finish, nfe = event[1], event[2]
        except BaseException:
            self.worker.cancel(job)
            self.metrics.requests.labels(endpoint, "cancelled").inc()
            raise
        text = self.decode(ids)
        out = self._chunk(kind, rid, created, text, finish, ids if body.return_token_ids else None)
        choice = out["choices"][0]
        if job.logprobs:
            choice["logprobs"] = self._logprobs(kind, ids, lps, 0)
        if kind == "chat":
            choice.pop("delta")
            choice["message"] = {"role": "assistant", "content": text}
            out["object"] = "chat.completion"
        out["usage"] = self._usage(job, len(ids), nfe)
        self.metrics.requests.labels(endpoint, "200").inc()
        return JSONResponse(out)

    async def _stream(self, kind, endpoint, job: Job, body: _Body, rid, created, include_usage):
        ids, sent, finished = [], "", False
        pending, pending_lp = [], []  # tokens not sent yet (an unfinished UTF-8 character waits for its bytes)
        sse = lambda obj: f"data: {json.dumps(obj)}\n\n"  # noqa: E731

        def chunk(delta, finish):
            c = self._chunk(kind, rid, created, delta, finish, pending if body.return_token_ids else None)
            if job.logprobs:
                c["choices"][0]["logprobs"] = self._logprobs(kind, pending, pending_lp, len(sent))
            return sse(c)

        try:
            if kind == "chat":
                first = self._chunk(kind, rid, created, None, None)
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield sse(first)
            async for event in self._events(job):
                if event[0] == "tokens":
                    ids += event[1]
                    pending, pending_lp = pending + event[1], pending_lp + event[3]
                    text = self.decode(ids)
                    if text.endswith("\ufffd"):
                        continue
                    yield chunk(text[len(sent):], None)
                    sent, pending, pending_lp = text, [], []
                else:
                    text = self.decode(ids)
                    yield chunk(text[len(sent):], event[1])
                    if include_usage:
                        usage = self._chunk(kind, rid, created, None, None)
                        usage["choices"], usage["usage"] = [], self._usage(job, len(ids), event[2])
                        yield sse(usage)
                    finished = True
            yield "data: [DONE]\n\n"
            self.metrics.requests.labels(endpoint, "200").inc()
        finally:
            if not finished:
                self.worker.cancel(job)
                self.metrics.requests.labels(endpoint, "cancelled").inc()

    # --------------------------------------------------------------------------------------- the app

    def app(self):
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def lifespan(app):
            if not self.worker.is_alive():
                self.worker.start()
            self.ready = True
            yield
            self.ready = False
            self.worker.stop()
            self.worker.join(timeout=10)

        app = FastAPI(title="jaxdlm", lifespan=lifespan)

        @app.exception_handler(RequestValidationError)
        async def bad_body(request: Request, exc: RequestValidationError):
            err = exc.errors()[0]
            loc = [str(x) for x in err.get("loc", ()) if x != "body" and not isinstance(x, int)]
            param = loc[0] if loc else None
            if err.get("type") == "extra_forbidden":
                msg = f"unknown field {'.'.join(loc)!r}"
            elif err.get("type") == "json_invalid":
                msg, param = f"the body is not valid JSON: {err.get('msg')}", None
            else:
                msg = f"{'.'.join(loc) or 'body'}: {err.get('msg')}"
            self.metrics.requests.labels(request.url.path, "400").inc()
            return JSONResponse(error_body(msg, param), status_code=400)

        @app.exception_handler(RequestError)
        async def bad_request(request: Request, exc: RequestError):
            self.metrics.requests.labels(request.url.path, "400").inc()
            return JSONResponse(error_body(str(exc), exc.param), status_code=400)

        @app.exception_handler(QueueFull)
        async def full(request: Request, exc: QueueFull):
            self.metrics.requests.labels(request.url.path, "503").inc()
            return JSONResponse(error_body(str(exc), None, "server_busy"), status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})

        @app.get("/health")
        async def health():
            if not self.ready or not self.worker.is_alive():
                return JSONResponse({"status": "not ready"}, status_code=503)
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                               "owned_by": "jaxdlm"}]}

        @app.post("/v1/completions")
        async def completions(body: CompletionBody, request: Request):
            return await self.complete("text", body, request)

        @app.post("/v1/chat/completions")
        async def chat(body: ChatBody, request: Request):
            return await self.complete("chat", body, request)

        @app.get("/metrics")
        async def metrics():
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        return app


def warm_up(engine, cycles: int = 1) -> None:
    """Compiles the engine's programs (the shortest prompt bucket's insert, and the steps) before it serves."""
    for c in sorted({1, cycles}):
        engine.generate_many([[engine.model.config.bos_token_id or 1]], DecodeOptions(), max_tokens=1, cycles=c)


def serve(engine, tokenizer, *, host: str = "127.0.0.1", port: int = 8000, model_name: str = "jaxdlm",
          max_queue: int = 256, chat_template: str | None = None, log_level: str = "info", cycles: int = 1) -> int:
    """Compiles, then serves until SIGTERM / SIGINT (running requests finish first); returns 0 after a SIGTERM."""
    import signal

    import uvicorn

    warm_up(engine, cycles)
    server = Server(engine, tokenizer, model_name=model_name, max_queue=max_queue, chat_template=chat_template,
                    cycles=cycles)
    # uvicorn handles SIGTERM (graceful shutdown), then re-raises it under the handler it found: a no-op one, so
    # a drained server exits 0
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(server.app(), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
