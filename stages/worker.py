"""``epd-stage``: one stage worker (encode, prefill, decode or mixed) on the bus.

The worker connects a DEALER to the router, announces itself (WorkerReady:
role, KV geometry, transfer addresses, an incarnation id), heartbeats its
load, and serves what the router sends. The engine runs in its own thread;
this asyncio loop only moves messages and bytes. A live role switch
(``SwitchRole``) is run by ``stages.role_switch``, mixed in.

The router pings twice a second. A worker that hears nothing from it for
``ROUTER_SILENT_S`` reconnects and registers again (same incarnation), with a
growing pause between tries, so a restarted router finds its workers back; a
new router id in the pings aborts what the worker ran for the old router.
SIGTERM drains for at most ``DRAIN_S`` and the process is gone within
``EXIT_DEADLINE_S``; with ``EPD_PARENT_PID`` set (``epd-serve``) the worker
also stops when that parent is gone.

Content-hash caches shared across workers (embeddings by pixel hash, KV
blocks by chained block hash) live in ``stages.peer_cache`` (``self.peer_cache``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter, deque

import torch

from bus import messages as m
from bus.sampling_params import SamplingParams
from bus.sockets import AsyncSocket
from bus.step_cost import encode_features
from stages import profiler, tokenize_service
from stages.engine.handoff import Handoff, HandoffImage
from stages.engine.llm_engine import LLMEngine
from stages.engine.outputs import RequestOutput
from stages.engine_thread import EngineThread
from stages.peer_cache import PeerCache
from stages.role_switch import RoleSwitchMixin
from stages.wire import handoff_header, output_to_delta
from stages.worker_args import engine_config, parse_args
from transfer.base import KeyNotFound, TransferError
from transfer.hash_keys import handoff_key
from transfer.select import make_backend

log = logging.getLogger("epd.stage")
HEARTBEAT_S = 1.0
ABORT_MEMORY_S = 120.0
ROUTER_SILENT_S = 4.0  # no word from the router this long (it pings every 0.5 s): reconnect
RECONNECT_MAX_S = 8.0  # cap of the pause between reconnects while the router stays away
DRAIN_S = 3.0  # SIGTERM: running requests may finish this long
EXIT_DEADLINE_S = 10.0  # SIGTERM: the process is gone by then, whatever hangs


class StageWorker(RoleSwitchMixin):
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.role = args.role
        self.worker_id = args.worker_id or f"{args.role}-{uuid.uuid4().hex[:8]}"
        self.incarnation = uuid.uuid4().hex
        self.epoch = 0  # +1 per live role switch
        self.done = asyncio.Event()
        self.counters: Counter[str] = Counter({name: 0 for name in m.CACHE_COUNTERS})
        self.pull_timeout = args.pull_timeout
        # Aborts can overtake the work they cancel (it may be pulling its KV): remember them a while.
        self.aborted: dict[str, float] = {}
        self.router_id: str | None = None  # from the router's pings
        self.stale: set[str] = set()  # requests running when the router went silent
        self.heard = time.monotonic()  # when the router last said anything
        parent = os.environ.get("EPD_PARENT_PID")
        self.parent = int(parent) if parent and parent.isdigit() else None

    # ---- start-up ---------------------------------------------------------------------------
    async def run(self) -> None:
        a = self.args
        self.engine = LLMEngine(engine_config(a))
        cost_model = profiler.profile(self.engine, self.role, use_cache=not a.no_profile_cache)
        self.encode_timings: deque[list[float]] = deque(maxlen=m.MAX_TIMINGS)
        self.loop = asyncio.get_running_loop()
        self.transfer = make_backend(a.transfer, a.host)
        await self.transfer.start()
        self.sock = AsyncSocket("dealer", a.router, bind=False, identity=self.worker_id.encode())
        self.peer_cache = PeerCache(self.engine, self.transfer, self.sock.send, self._pull_failed, self.counters,
                                    self.loop, worker_id=self.worker_id, incarnation=self.incarnation,
                                    role=self.role, epoch=self.epoch, pull_timeout=self.pull_timeout)
        self.threads = EngineThread(self.engine, self.loop, self._on_outputs)
        self.threads.start()
        eng = self.engine
        self.info = m.WorkerInfo(self.worker_id, self.incarnation, self.role, a.model, str(eng.device),
                                 eng.max_model_len, eng.runner.num_blocks, eng.config.block_size,
                                 bool(eng.runner.model.is_multimodal), self.transfer.card, os.getpid(),
                                 cost_model)
        await self.sock.send(m.WorkerReady(self.info))
        self.heard = time.monotonic()
        log.info("%s ready (%s on %s)", self.worker_id, self.role, eng.device)
        tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._heartbeats()),
                 asyncio.create_task(self.peer_cache.report_events()), asyncio.create_task(self._link())]
        if a.control:
            self.sub = AsyncSocket("sub", a.control, bind=False)
            tasks.append(asyncio.create_task(self._control_loop()))
        await self.done.wait()
        await self._drain()
        for t in tasks:
            t.cancel()
        self.threads.stop()
        try:
            await asyncio.wait_for(self.transfer.close(), 3.0)
        except (TimeoutError, Exception):  # noqa: BLE001 - leaving anyway
            log.warning("the transfer backend did not close cleanly")
        self.sock.close()

    def stop(self) -> None:
        """SIGTERM/SIGINT, a Shutdown broadcast, a dead engine or a gone parent: leave, boundedly."""
        if not self.done.is_set():
            # Whatever hangs below (a wedged transfer, a step that never ends), the process goes.
            t = threading.Timer(EXIT_DEADLINE_S, os._exit, (1,))
            t.daemon = True
            t.start()
        self.done.set()

    async def _drain(self) -> None:
        """Let running requests finish for at most DRAIN_S while the router still listens."""
        deadline = time.monotonic() + DRAIN_S
        while (time.monotonic() < deadline and self.engine.has_unfinished_requests()
               and time.monotonic() - self.heard < ROUTER_SILENT_S and self.threads.fatal is None):
            await asyncio.sleep(0.1)

    # ---- the router link ----------------------------------------------------------------------
    async def _link(self) -> None:
        """Reconnect and register again while the router is silent; stop when the parent is gone."""
        pause = 1.0
        while True:
            await asyncio.sleep(0.5)
            if self.parent is not None and os.getppid() != self.parent:
                log.error("the parent process %d is gone; worker exits", self.parent)
                self.stop()
                return
            if time.monotonic() - self.heard < ROUTER_SILENT_S:
                pause = 1.0
                continue
            log.warning("no word from the router for %.0f s; registering again", time.monotonic() - self.heard)
            # What runs now was sent by the router that went silent; a new one (its pings carry
            # a new id) will not wait for it. Taken before registering: a new router sends work
            # as soon as it has our WorkerReady, possibly before its first ping.
            self.stale = await self.threads.call(lambda e: {*e.requests, *e.handoffs})
            await self.sock.send(m.WorkerReady(self.info))  # the DEALER reconnects by itself
            await asyncio.sleep(pause)  # its pings reset `heard` if it is back
            pause = min(2 * pause, RECONNECT_MAX_S)

    async def _ping(self, msg: m.Ping) -> None:
        stale, self.stale = self.stale, set()
        if self.router_id is not None and stale:
            # A new router: nobody waits for what this worker ran for the old one.
            log.warning("the router restarted; aborting %d request(s) of the old one", len(stale))
            await self.threads.call(lambda e: [e.abort_request(r) for r in stale])
        self.router_id = msg.router_id

    async def _pull_failed(self, rid: str, holder: dict, err: Exception) -> None:
        """Tell the router a peer did not deliver: it stops sending that peer work until it is sure."""
        if isinstance(err, KeyNotFound):  # the peer answered: it only no longer holds the key
            return
        try:
            await self.sock.send(m.PullFailed(rid, holder, f"{type(err).__name__}: {err}"))
        except Exception:  # noqa: BLE001 - best effort
            log.exception("reporting a failed pull")

    # ---- loops ------------------------------------------------------------------------------
    async def _heartbeats(self) -> None:
        eng = self.engine
        while True:
            if time.monotonic() - self.heard > ROUTER_SILENT_S:  # nobody listens: do not pile them up
                await asyncio.sleep(HEARTBEAT_S)
                continue
            blocks, sched = eng.blocks, eng.scheduler
            await self.sock.send(m.Heartbeat(
                self.worker_id, self.incarnation, len(sched.running), len(sched.waiting),
                blocks.num_used_blocks, blocks.num_blocks, eng.runner.num_images_encoded,
                blocks.prefix_hits, blocks.prefix_queries, dict(self.transfer.pulls_by_backend),
                dict(self.counters), self._timings(), self.epoch))
            await asyncio.sleep(HEARTBEAT_S)

    def _timings(self) -> list[list[float]]:
        """The latest step and encode timings since the last heartbeat (the router's online correction)."""
        steps = self.engine.step_samples
        rows = [[0.0, *f, s] for f, s in (steps.popleft() for _ in range(len(steps)))]
        rows += [self.encode_timings.popleft() for _ in range(len(self.encode_timings))]
        return rows[-m.MAX_TIMINGS:]

    async def _control_loop(self) -> None:
        while True:
            _, msg = await self.sub.recv()
            if isinstance(msg, m.Shutdown):
                log.info("shutdown broadcast: %s", msg.reason)
                self.stop()
            elif isinstance(msg, m.WorkerGone) and msg.worker_id != self.worker_id:
                try:
                    await self.transfer.forget_peer(msg.transfer)
                except Exception:  # noqa: BLE001 - pulls still end at their timeout
                    log.exception("forgetting peer %s failed", msg.worker_id)

    async def _recv_loop(self) -> None:
        handlers = {m.GenerateRequest: self._generate, m.EncodeRequest: self._encode,
                    m.DecodeRequest: self._decode, m.AbortRequest: self._abort, m.ReleaseKv: self._release,
                    m.PrefixExport: self.peer_cache.on_prefix_export, m.PrefixAnswer: self.peer_cache.on_prefix_answer,
                    m.TokenizeRequest: self._tokenize, m.DetokenizeRequest: self._detokenize,
                    m.SwitchRole: self._switch_role}
        while True:
            _, msg = await self.sock.recv()
            self.heard = time.monotonic()
            if isinstance(msg, m.Ping):
                if msg.router_id != self.router_id:
                    asyncio.create_task(self._guard(self._ping, msg))
                else:
                    self.stale = set()  # the same router, only slow: what runs is still its
                continue
            handler = handlers.get(type(msg))
            if handler is None:
                log.warning("ignoring unexpected %s", type(msg).__name__)
                continue
            asyncio.create_task(self._guard(handler, msg))

    async def _guard(self, handler, msg) -> None:
        """Run a handler; any failure becomes a precise RequestFailed for that request alone."""
        rid = getattr(msg, "request_id", None)
        try:
            await handler(msg)
        except ValueError as e:  # bad input: the client's fault
            await self._fail(rid, 400, str(e))
        except Exception as e:  # noqa: BLE001 - reported, never fatal to the worker
            log.exception("request %s failed", rid)
            await self._fail(rid, 503 if isinstance(e, TransferError) else 500, f"{type(e).__name__}: {e}",
                             "internal_error")

    async def _fail(self, rid: str | None, status: int, message: str, kind: str = "invalid_request_error"):
        if rid is not None:
            await self.sock.send(m.RequestFailed(rid, status, message, kind))

    # ---- handlers ---------------------------------------------------------------------------
    async def _generate(self, msg: m.GenerateRequest) -> None:
        images = await self.peer_cache.request_images(msg)
        if msg.messages is not None:
            prompt = self.engine.inputs.render_chat(msg.messages, msg.add_generation_prompt)
            n_parts = len(prompt["multi_modal_data"]["image"])
            if n_parts != len(images):
                raise ValueError(f"the messages hold {n_parts} image part(s) but {len(images)} image(s) came")
            prompt["multi_modal_data"]["image"] = images
        elif msg.prompt_token_ids is not None:
            prompt = {"prompt_token_ids": msg.prompt_token_ids, "multi_modal_data": {"image": images}}
        elif msg.prompt is not None:
            prompt = {"prompt": msg.prompt, "multi_modal_data": {"image": images}}
        else:
            raise ValueError("the request has no messages, prompt or prompt_token_ids")
        params = SamplingParams.from_dict(msg.sampling)
        rid = msg.request_id
        if self._was_aborted(rid):
            return

        r = msg.resume
        resume = (list(r.token_ids), r.text_len, r.cumulative_logprob) if r is not None else None

        def prepare(e: LLMEngine):
            req = e.prepare_request(rid, prompt, params, prefill_only=msg.prefill_only, resume=resume,
                                    prompt_name="messages" if msg.messages is not None else "prompt")
            return (req, *e.prefix_probe(req))

        req, hashes, local = await self.threads.call(prepare)
        prefix = None
        if len(hashes) > local and self.role in ("prefill", "mixed"):
            prefix = await self.peer_cache.fetch_prefix(rid, hashes, local)
        if self._was_aborted(rid):
            return
        used = await self.threads.call(lambda e: e.submit(req, prefix))
        self.counters["kv_prefix_blocks_fetched"] += used // self.engine.config.block_size

    async def _tokenize(self, msg: m.TokenizeRequest) -> None:
        ids = await self.threads.call(lambda e: tokenize_service.tokenize(e, msg))
        await self.sock.send(m.Tokenized(msg.request_id, token_ids=ids))

    async def _detokenize(self, msg: m.DetokenizeRequest) -> None:
        text = await self.threads.call(lambda e: tokenize_service.detokenize(e, msg.token_ids))
        await self.sock.send(m.Tokenized(msg.request_id, text=text))

    async def _encode(self, msg: m.EncodeRequest) -> None:
        def encode(e: LLMEngine):
            t0 = time.perf_counter()
            out = e.encode_images(msg.images)
            self.encode_timings.append([1.0, *encode_features(len(out), sum(p.num_tokens for p in out)),
                                        time.perf_counter() - t0])
            return out

        prepared = await self.threads.call(encode)
        for p in prepared:
            self.peer_cache.publish(p)
        await self.sock.send(m.EncodeDone(msg.request_id, [self.peer_cache.ref(p) for p in prepared]))

    async def _decode(self, msg: m.DecodeRequest) -> None:
        try:
            tensors = await self.transfer.pull(msg.holder, msg.kv_key, timeout=self.pull_timeout,
                                               device=str(self.engine.device))
        except TransferError as e:
            await self._pull_failed(msg.request_id, msg.holder, e)
            raise
        await self.sock.send(m.KvTaken(msg.request_id, msg.kv_key))
        h = msg.header
        handoff = Handoff(msg.request_id, h.prompt_token_ids, h.output_token_ids, h.params, h.prompt,
                          [HandoffImage(i.content_hash, i.offset, i.length,
                                        tuple(i.grid_thw) if i.grid_thw else None) for i in h.images],
                          h.sent_text_len, h.num_cached_tokens, h.cumulative_logprob, h.generator_state,
                          tensors[0], list(tensors[1:]))
        if self._was_aborted(msg.request_id):
            return
        await self.threads.call(lambda e: e.add_prefilled(handoff))

    def _was_aborted(self, rid: str) -> bool:
        now = time.monotonic()
        for old in [r for r, t in self.aborted.items() if now - t > ABORT_MEMORY_S]:
            del self.aborted[old]
        return rid in self.aborted

    async def _abort(self, msg: m.AbortRequest) -> None:
        self.aborted[msg.request_id] = time.monotonic()
        await self.threads.call(lambda e: e.abort_request(msg.request_id))
        self.transfer.drop(handoff_key(msg.request_id))

    async def _release(self, msg: m.ReleaseKv) -> None:
        self.transfer.drop(msg.kv_key)

    # ---- engine outputs (called on the event loop) --------------------------------------------
    def _on_outputs(self, outs: list[RequestOutput] | None, handoffs: dict[str, Handoff] | None) -> None:
        if outs is None:  # the engine thread died
            log.error("engine failed: %s; worker exits", self.threads.fatal)
            self.stop()
            return
        asyncio.create_task(self._send_outputs(outs, handoffs or {}))

    async def _send_outputs(self, outs: list[RequestOutput], handoffs: dict[str, Handoff]) -> None:
        # One message per step, not per request: the router's per-message cost (a socket wakeup,
        # a decode, the dispatch) is paid once per step. A PrefillDone still follows its delta.
        deltas = [output_to_delta(out, self.engine.tokenizer) for out in outs]
        await self.sock.send(deltas[0] if len(deltas) == 1 else m.TokenDeltas(deltas))
        for out in outs:
            h = handoffs.get(out.request_id)
            if h is not None:
                key = handoff_key(out.request_id)
                self.transfer.put(key, [h.kv, *h.image_embeddings])
                await self.sock.send(m.PrefillDone(out.request_id, handoff_header(h), key,
                                                   self.transfer.card))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {args.role} %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    worker = StageWorker(args)

    async def runner():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    asyncio.run(runner())
    if "ucxx" in sys.modules:
        # ucxx can crash in the interpreter's last garbage collection when a pull timed out on
        # an endpoint whose receives were still posted; everything is closed by now: leave.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
