"""The OpenAI-compatible HTTP server (aiohttp) in front of a `Backend`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{model}],
POST /tokenize, POST /detokenize, GET /version (vLLM's), GET /health, GET /metrics.
Every error, ours or aiohttp's, is an OpenAI error body. A request with ``n > 1`` runs as
``n`` backend requests of one sample each (the same prompt: its KV is shared through the
workers' prefix cache); their deltas go out interleaved, each choice with its index.
This module must stay light: no torch, no transformers, nothing from `stages/`.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import logging
import time
import uuid

from aiohttp import web

from router.backend import ApiDelta, ApiError, ApiRequest, Backend
from router.images import ImageResolver
from router.json_body import parse_body
from router.limits import ApiLimits
from router.metrics import ApiMetrics, RequestTracker
from router.openai_protocol import (ParsedRequest, parse_chat, parse_completion, parse_detokenize, parse_tokenize,
                                    sample_requests)
from router.openai_responses import SSE_DONE, ResponseBuilder, dumps, sse_event

log = logging.getLogger(__name__)

API_METRICS = web.AppKey("epd_api_metrics", ApiMetrics)
try:
    _VERSION = importlib.metadata.version("epd")
except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
    _VERSION = "0+unknown"
# aiohttp does not cancel handlers on disconnect by default, so a request waiting on the
# backend notices a vanished client by polling its transport at this period.
_DISCONNECT_POLL_S = 0.1
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}  # tells nginx-style proxies not to buffer


def _error_response(err: ApiError) -> web.Response:
    return web.Response(status=err.status, body=dumps(err.to_dict()),
                        content_type="application/json", headers=getattr(err, "headers", None))


def _server_error(message: str = "internal server error") -> ApiError:
    return ApiError(500, message, type="server_error")


def _failed(parsed: ParsedRequest, trackers: list[RequestTracker], exc: Exception) -> web.Response:
    """The error response for a request that failed before its output ended (tracked)."""
    if not isinstance(exc, ApiError):
        log.error("request %s failed", parsed.api.request_id, exc_info=exc)
        exc = _server_error()
    _fail_all(trackers, exc.status)
    return _error_response(exc)


def _fail_all(trackers: list[RequestTracker], status: int) -> None:
    """One error for the request; its other samples count as aborted."""
    trackers[0].fail(status)
    for t in trackers[1:]:
        t.finish("abort")


class _Flight:
    """A request's iterator over the backend, and the promise to abort it exactly once
    if the HTTP layer walks away before it finished (see `Backend`)."""

    def __init__(self, backend: Backend, req: ApiRequest):
        self._backend = backend
        self._req = req
        self._it = None
        self.finished = False  # a final delta was seen, or the backend ended or raised
        self._closed = False

    async def next(self) -> ApiDelta | None:
        """The next delta; None after the final one."""
        if self.finished:
            return None
        try:
            if self._it is None:
                self._it = aiter(self._backend.generate(self._req))
            delta = await anext(self._it)
        except StopAsyncIteration:
            self.finished = True
            return None
        except asyncio.CancelledError:
            raise  # we are walking away: `close` aborts
        except BaseException:
            self.finished = True  # the backend raised, so it has cleaned up
            raise
        if delta.finish_reason is not None:
            self.finished = True
        return delta

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        aclose = getattr(self._it, "aclose", None)
        try:
            if aclose is not None:
                await aclose()
        except Exception:
            log.exception("closing the backend iterator of %s failed", self._req.request_id)
        if not self.finished:
            try:
                await self._backend.abort(self._req.request_id)
            except Exception:
                log.exception("backend.abort(%s) failed", self._req.request_id)


class _Samples:
    """A request's samples as one stream of (index, delta); with one sample, its flight itself."""

    def __init__(self, flights: list[_Flight]):
        self.flights = flights
        self._queue: asyncio.Queue = asyncio.Queue()
        self._left = len(flights)
        self._pumps = [asyncio.create_task(self._pump(i, f)) for i, f in enumerate(flights)] \
            if len(flights) > 1 else []

    async def _pump(self, index: int, flight: _Flight) -> None:
        try:
            while (delta := await flight.next()) is not None:
                self._queue.put_nowait((index, delta))
        except Exception as e:  # noqa: BLE001 - handed to the reader
            self._queue.put_nowait((index, e))
            return
        self._queue.put_nowait((index, None))

    async def next(self) -> tuple[int, ApiDelta] | None:
        """The next delta of any sample; None after every sample's final one; raises a sample's error."""
        if not self._pumps:
            delta = await self.flights[0].next()
            return None if delta is None else (0, delta)
        while self._left:
            index, item = await self._queue.get()
            if item is None:
                self._left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                return index, item
        return None

    async def close(self) -> None:
        """Stop reading, then close (abort) every unfinished sample."""
        for t in self._pumps:
            t.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for f in self.flights:
            await f.close()


async def _wait_disconnect(request: web.Request) -> None:
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(_DISCONNECT_POLL_S)


class _Api:
    """The handlers of one app; holds what they share."""

    def __init__(self, backend: Backend, limits: ApiLimits, metrics: ApiMetrics):
        self.backend = backend
        self.limits = limits
        self.metrics = metrics
        self.resolver = ImageResolver(limits)
        self.created = int(time.time())

    @web.middleware
    async def errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Turns every failure into an OpenAI error body; the server keeps serving."""
        try:
            return await handler(request)
        except ApiError as e:
            err = e
        except web.HTTPRequestEntityTooLarge:
            err = ApiError(413, f"request body is larger than the limit of "
                                f"{self.limits.max_body_bytes} bytes", code="request_too_large")
        except web.HTTPException as e:
            if e.status < 400:
                raise
            err = ApiError(e.status, e.reason if e.status in (404, 405) else e.text or e.reason)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            err = _server_error()
        self.metrics.error(err.status)
        return _error_response(err)

    async def _body(self, request: web.Request) -> dict:
        # read() raises HTTPRequestEntityTooLarge past client_max_size
        return parse_body(await request.read())

    async def chat(self, request: web.Request) -> web.StreamResponse:
        start, arrival = time.perf_counter(), time.time()
        body = await self._body(request)
        parsed = await parse_chat(body, self.backend.served_models, self.limits, self.resolver,
                                  uuid.uuid4().hex, arrival)
        return await self._serve(request, parsed, start)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        start, arrival = time.perf_counter(), time.time()
        body = await self._body(request)
        parsed = parse_completion(body, self.backend.served_models, self.limits,
                                  uuid.uuid4().hex, arrival)
        return await self._serve(request, parsed, start)

    async def _serve(self, request: web.Request, parsed: ParsedRequest,
                     start: float) -> web.StreamResponse:
        trackers = [self.metrics.track(start) for _ in range(parsed.n)]
        samples = _Samples([_Flight(self.backend, r) for r in sample_requests(parsed)])
        answer = self._stream if parsed.api.stream else self._collect
        work = asyncio.create_task(answer(request, parsed, samples, trackers))
        watch = asyncio.create_task(_wait_disconnect(request))
        try:
            await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                return work.result()
            return web.Response(status=499)  # client closed request; nobody reads this
        finally:
            watch.cancel()
            work.cancel()  # no-op when done; when the client left or we were cancelled
            await asyncio.gather(work, watch, return_exceptions=True)
            for t in trackers:
                t.finish("abort")  # counts only if nothing else ended the request
            await samples.close()

    async def _collect(self, request: web.Request, parsed: ParsedRequest, samples: _Samples,
                       trackers: list[RequestTracker]) -> web.Response:
        deltas: list[list[ApiDelta]] = [[] for _ in trackers]
        try:
            while (item := await samples.next()) is not None:
                index, delta = item
                trackers[index].on_delta(delta)
                deltas[index].append(delta)
            if not all(deltas):
                raise _server_error("the backend ended the request without output")
            body = dumps(ResponseBuilder(parsed).response_n(deltas))
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
            return _failed(parsed, trackers, e)
        for t, d in zip(trackers, deltas):
            t.finish(d[-1].finish_reason)
        return web.Response(body=body, content_type="application/json")

    async def _stream(self, request: web.Request, parsed: ParsedRequest, samples: _Samples,
                      trackers: list[RequestTracker]) -> web.StreamResponse:
        # The first delta comes before the headers, so an error the backend raises
        # before any output (prompt too long, ...) keeps its HTTP status.
        try:
            item = await samples.next()
            if item is None:
                raise _server_error("the backend ended the request without output")
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
            return _failed(parsed, trackers, e)
        builder = ResponseBuilder(parsed)
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        last: list[ApiDelta | None] = [None] * len(trackers)
        try:
            await resp.prepare(request)
            try:
                while item is not None:
                    index, delta = item
                    trackers[index].on_delta(delta)
                    last[index] = delta
                    if (chunk := builder.chunk(delta, index)) is not None:
                        await resp.write(sse_event(chunk))  # goes straight to the socket
                    if delta.finish_reason is not None:
                        trackers[index].finish(delta.finish_reason)
                    item = await samples.next()
                if any(d is None for d in last):
                    raise _server_error("the backend ended a sample without output")
                if builder.include_usage:
                    await resp.write(sse_event(builder.usage_chunk(last)))
            except ApiError as e:
                _fail_all(trackers, e.status)
                await resp.write(sse_event(e.to_dict()))
            except ConnectionResetError:
                raise
            except Exception:
                log.exception("request %s failed mid-stream", parsed.api.request_id)
                _fail_all(trackers, 500)
                await resp.write(sse_event(_server_error().to_dict()))
            await resp.write(SSE_DONE)
        except ConnectionResetError:
            pass  # the client left; `_serve` aborts the request
        return resp

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list",
                                  "data": [self._model(m) for m in self.backend.served_models]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self.backend.served_models:
            raise ApiError(404, f"The model `{name}` does not exist.", param="model",
                           code="model_not_found")
        return web.json_response(self._model(name))

    def _card(self) -> dict:
        """The backend's model card ({"root", "max_model_len"}); empty when it has none."""
        return self.backend.model_card() if hasattr(self.backend, "model_card") else {}

    def _model(self, name: str) -> dict:
        card = self._card()
        return {"id": name, "object": "model", "created": self.created, "owned_by": "epd",
                "root": card.get("root") or name, "parent": None,
                "max_model_len": card.get("max_model_len")}

    def _tokenizer(self, name: str):
        """The backend's ``name`` method; backends without a tokenizer answer 501."""
        fn = getattr(self.backend, name, None)
        if fn is None:
            raise ApiError(501, f"this server's backend has no {name}", type="server_error")
        return fn

    async def tokenize(self, request: web.Request) -> web.Response:
        call = await parse_tokenize(await self._body(request), self.backend.served_models, self.limits,
                                    self.resolver)
        ids = await self._tokenizer("tokenize")(call.messages, call.prompt, call.images,
                                                call.add_special_tokens, call.add_generation_prompt)
        return web.json_response({"count": len(ids), "max_model_len": self._card().get("max_model_len"),
                                  "tokens": ids, "token_strs": None})

    async def detokenize(self, request: web.Request) -> web.Response:
        _, tokens = parse_detokenize(await self._body(request), self.backend.served_models)
        return web.json_response({"prompt": await self._tokenizer("detokenize")(tokens)})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": _VERSION})

    async def health(self, request: web.Request) -> web.Response:
        try:
            ready, details = self.backend.health()
        except Exception as e:
            log.exception("backend.health() failed")
            ready, details = False, {"error": f"health check failed: {e}"}
        return web.json_response({"status": "ok" if ready else "unavailable", **details},
                                 status=200 if ready else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def close(self, app: web.Application) -> None:
        await self.resolver.close()


def _bearer(key: str):
    """Middleware: /v1 requests without the key are a 401 (OpenAI's error body); the rest are open."""
    expected = f"Bearer {key}".encode()

    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        if request.path.startswith("/v1") and request.method != "OPTIONS":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return await handler(request)

    return check


def make_app(backend: Backend, limits: ApiLimits, metrics: ApiMetrics | None = None,
             api_key: str | None = None) -> web.Application:
    """The aiohttp application serving `backend` under `limits`.

    Run it with `web.run_app(app)` or an `AppRunner`. `app[API_METRICS]` is the
    `ApiMetrics` in use (a fresh one on a private registry when none is given).
    With `api_key`, the /v1 routes need `Authorization: Bearer <api_key>` (vLLM's rule).
    """
    metrics = metrics if metrics is not None else ApiMetrics()
    api = _Api(backend, limits, metrics)
    middlewares = [api.errors] + ([_bearer(api_key)] if api_key else [])
    app = web.Application(client_max_size=limits.max_body_bytes, middlewares=middlewares)
    app[API_METRICS] = metrics
    app.router.add_post("/v1/chat/completions", api.chat)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/v1/models/{model}", api.model)
    app.router.add_post("/tokenize", api.tokenize)
    app.router.add_post("/detokenize", api.detokenize)
    app.router.add_get("/version", api.version)
    app.router.add_get("/health", api.health)
    app.router.add_get("/metrics", api.prometheus)
    app.on_cleanup.append(api.close)
    return app
