"""The OpenAI-compatible HTTP server (aiohttp) in front of a `Backend`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{model}],
GET /health, GET /metrics. Every error, ours or aiohttp's, is an OpenAI error body.
This module must stay light: no torch, no transformers, nothing from `stages/`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from aiohttp import web

from router.backend import ApiDelta, ApiError, ApiRequest, Backend
from router.images import ImageResolver
from router.json_body import parse_body
from router.limits import ApiLimits
from router.metrics import ApiMetrics, RequestTracker
from router.openai_protocol import (SSE_DONE, ParsedRequest, ResponseBuilder, dumps,
                                    parse_chat, parse_completion, sse_event)

log = logging.getLogger(__name__)

API_METRICS = web.AppKey("epd_api_metrics", ApiMetrics)
# aiohttp does not cancel handlers on disconnect by default, so a request waiting on the
# backend notices a vanished client by polling its transport at this period.
_DISCONNECT_POLL_S = 0.1
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"}  # tells nginx-style proxies not to buffer


def _error_response(err: ApiError) -> web.Response:
    return web.Response(status=err.status, body=dumps(err.to_dict()),
                        content_type="application/json")


def _server_error(message: str = "internal server error") -> ApiError:
    return ApiError(500, message, type="server_error")


def _failed(parsed: ParsedRequest, tracker: RequestTracker, exc: Exception) -> web.Response:
    """The error response for a request that failed before its output started (tracked)."""
    if not isinstance(exc, ApiError):
        log.error("request %s failed", parsed.api.request_id, exc_info=exc)
        exc = _server_error()
    tracker.fail(exc.status)
    return _error_response(exc)


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
        tracker = self.metrics.track(start)
        flight = _Flight(self.backend, parsed.api)
        answer = self._stream if parsed.api.stream else self._collect
        work = asyncio.create_task(answer(request, parsed, flight, tracker))
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
            tracker.finish("abort")  # counts only if nothing else ended the request
            await flight.close()

    async def _collect(self, request: web.Request, parsed: ParsedRequest, flight: _Flight,
                       tracker: RequestTracker) -> web.Response:
        deltas: list[ApiDelta] = []
        try:
            while (delta := await flight.next()) is not None:
                tracker.on_delta(delta)
                deltas.append(delta)
            if not deltas:
                raise _server_error("the backend ended the request without output")
            body = dumps(ResponseBuilder(parsed).response(deltas))
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
            return _failed(parsed, tracker, e)
        tracker.finish(deltas[-1].finish_reason)
        return web.Response(body=body, content_type="application/json")

    async def _stream(self, request: web.Request, parsed: ParsedRequest, flight: _Flight,
                      tracker: RequestTracker) -> web.StreamResponse:
        # The first delta comes before the headers, so an error the backend raises
        # before any output (prompt too long, ...) keeps its HTTP status.
        try:
            delta = await flight.next()
            if delta is None:
                raise _server_error("the backend ended the request without output")
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
            return _failed(parsed, tracker, e)
        builder = ResponseBuilder(parsed)
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        try:
            await resp.prepare(request)
            try:
                last = delta
                while delta is not None:
                    tracker.on_delta(delta)
                    last = delta
                    if (chunk := builder.chunk(delta)) is not None:
                        await resp.write(sse_event(chunk))  # goes straight to the socket
                    delta = await flight.next()
                if builder.include_usage:
                    await resp.write(sse_event(builder.usage_chunk(last)))
                tracker.finish(last.finish_reason)
            except ApiError as e:
                tracker.fail(e.status)
                await resp.write(sse_event(e.to_dict()))
            except ConnectionResetError:
                raise
            except Exception:
                log.exception("request %s failed mid-stream", parsed.api.request_id)
                tracker.fail(500)
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

    def _model(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "epd"}

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


def make_app(backend: Backend, limits: ApiLimits, metrics: ApiMetrics | None = None
             ) -> web.Application:
    """The aiohttp application serving `backend` under `limits`.

    Run it with `web.run_app(app)` or an `AppRunner`. `app[API_METRICS]` is the
    `ApiMetrics` in use (a fresh one on a private registry when none is given).
    """
    metrics = metrics if metrics is not None else ApiMetrics()
    api = _Api(backend, limits, metrics)
    app = web.Application(client_max_size=limits.max_body_bytes, middlewares=[api.errors])
    app[API_METRICS] = metrics
    app.router.add_post("/v1/chat/completions", api.chat)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/v1/models/{model}", api.model)
    app.router.add_get("/health", api.health)
    app.router.add_get("/metrics", api.prometheus)
    app.on_cleanup.append(api.close)
    return app
