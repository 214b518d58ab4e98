"""``epd-router``: the router, its HTTP API and its SDK front in one light process (no torch)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal

from aiohttp import web

from router.admin import add_admin_routes
from router.autoscale import AutoscaleConfig, Autoscaler
from router.api import make_app
from router.client_front import ClientFront
from router.cluster_index import MAX_ALIASES, MAX_EMBEDDING_ENTRIES, MAX_KV_ENTRIES
from router.core import RouterCore
from router.limits import ApiLimits
from router.metrics import ApiMetrics, RoleSwitchMetrics
from router.plan import Slo
from router.plan_metrics import PlanMetrics
from router.policy import POLICIES, make_policy
from router.worker_metrics import WorkerMetrics

log = logging.getLogger("epd.router")


def parse_expect(spec: str) -> dict[str, int]:
    """``encode=1,prefill=1,decode=1`` -> {"encode": 1, ...}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        role, _, n = part.partition("=")
        if role not in ("encode", "prefill", "decode", "mixed") or not n.isdigit():
            raise ValueError(f"bad --expect entry {part!r}; use role=count with roles encode/prefill/decode/mixed")
        out[role] = int(n)
    return out


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, unless it has none to show (None, a switch, "")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, True, False, "", argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="epd-router", description=__doc__, formatter_class=HelpWithDefaults)
    ap.add_argument("--served-model-name", required=True, help="the model name the API answers to")
    ap.add_argument("--host", default="127.0.0.1", help="address the HTTP API and the SDK front listen on")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port of the OpenAI API")
    ap.add_argument("--sdk-port", type=int, default=7102, help="port of the ZeroMQ SDK front on --host")
    ap.add_argument("--worker-addr", default="tcp://127.0.0.1:7100", help="workers connect here")
    ap.add_argument("--control-addr", default="tcp://127.0.0.1:7101", help="control broadcasts (PUB)")
    ap.add_argument("--client-addr", default=None,
                    help="the SDK front's whole ZeroMQ address, instead of tcp://HOST:SDK_PORT")
    ap.add_argument("--api-key", default=None,
                    help="/v1 routes then need 'Authorization: Bearer KEY'; $EPD_API_KEY when not given "
                         "(the SDK front has no key: keep it on a private address)")
    ap.add_argument("--no-cluster-cache", dest="cluster_cache", action="store_false",
                    help="never reuse another worker's image embeddings or prefix KV (for A/B runs); "
                         "default: reuse them")
    ap.add_argument("--cluster-index-max-kv", type=int, default=MAX_KV_ENTRIES,
                    help="KV block hashes the cluster index remembers (least recently used go first)")
    ap.add_argument("--cluster-index-max-embeddings", type=int, default=MAX_EMBEDDING_ENTRIES,
                    help="image embeddings the cluster index remembers (least recently used go first)")
    ap.add_argument("--cluster-index-max-aliases", type=int, default=MAX_ALIASES,
                    help="image-bytes -> pixel-hash aliases the cluster index remembers")
    ap.add_argument("--expect", default="", help="workers /health waits for, e.g. encode=1,prefill=1,decode=1")
    ap.add_argument("--policy", default="slo_aware", choices=sorted(POLICIES),
                    help="dispatch policy: slo_aware plans each request from the workers' measured costs; "
                         "least_loaded and round_robin are baselines")
    ap.add_argument("--slo-ttft-ms", type=float, help="time-to-first-token target (a request's body may "
                                                      "override it with \"slo\": {\"ttft_ms\": ...})")
    ap.add_argument("--slo-tpot-ms", type=float, help="time-per-output-token target: slo_aware only plans "
                                                      "decode workers predicted to meet it")
    ap.add_argument("--max-queue-s", type=float, help="admission: answer 429 (Retry-After) when every plan's "
                                                      "predicted queueing exceeds this (default: queue)")
    ap.add_argument("--admin-key", default=None, help="/admin routes then need 'Authorization: Bearer KEY'; "
                                                      "$EPD_ADMIN_KEY when not given")
    ap.add_argument("--heartbeat-timeout", type=float, default=5.0,
                    help="seconds of silence after which a worker counts as dead")
    ap.add_argument("--retry-budget", type=int, default=2,
                    help="times one request may be moved off a failed worker before it fails")
    ap.add_argument("--stop-workers", action="store_true",
                    help="on exit, tell every worker to stop too (default: they stay and register again "
                         "with the next router on this address)")
    ap.add_argument("--worker-wait", type=float, default=60.0,
                    help="seconds a request waits for a worker of a role none is left of to come back")
    ap.add_argument("--switch-drain-s", type=float, default=30.0,
                    help="a live role switch lets the worker's running requests finish this long, then hands "
                         "what is left to other workers")
    ap.add_argument("--autoscale", default=None, metavar="JSON",
                    help="router.autoscale as JSON, e.g. '{\"interval_s\": 2, \"cooldown_s\": 20}': move workers "
                         "between encode, prefill and decode as the load shifts (router.autoscale); default off")
    ap.add_argument("--max-body-mb", type=float, default=32, help="largest request body, MiB")
    ap.add_argument("--max-images", type=int, default=8, help="images per request")
    ap.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="pixels per image")
    ap.add_argument("--remote-images", default="off", choices=["off", "allowlist", "any"],
                    help="whether http(s) image URLs are fetched")
    ap.add_argument("--allowed-domains", default="", help="comma-separated, with --remote-images allowlist")
    ap.add_argument("--log-level", default="INFO", help="logging level")
    args = ap.parse_args(argv)
    args.client_addr = args.client_addr or f"tcp://{args.host}:{args.sdk_port}"
    args.api_key = args.api_key or os.environ.get("EPD_API_KEY") or None
    args.admin_key = args.admin_key or os.environ.get("EPD_ADMIN_KEY") or None
    return args


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> None:
    limits = ApiLimits(max_body_bytes=int(args.max_body_mb * (1 << 20)), max_images_per_request=args.max_images,
                       max_image_pixels=args.max_image_pixels, remote_images=args.remote_images,
                       allowed_domains=tuple(d for d in args.allowed_domains.split(",") if d))
    api_metrics = ApiMetrics()
    core = RouterCore([args.served_model_name], make_policy(args.policy), parse_expect(args.expect),
                      args.heartbeat_timeout, WorkerMetrics(api_metrics), cluster_cache=args.cluster_cache,
                      retry_budget=args.retry_budget, worker_wait_s=args.worker_wait,
                      slo=Slo(ttft_s=args.slo_ttft_ms / 1e3 if args.slo_ttft_ms else None,
                              tpot_s=args.slo_tpot_ms / 1e3 if args.slo_tpot_ms else None),
                      max_queue_s=args.max_queue_s, plan_metrics=PlanMetrics(api_metrics.registry),
                      cluster_index_bounds={"max_kv_entries": args.cluster_index_max_kv,
                                            "max_embedding_entries": args.cluster_index_max_embeddings,
                                            "max_aliases": args.cluster_index_max_aliases},
                      switch_drain_s=args.switch_drain_s)
    core.switches.metrics = RoleSwitchMetrics(api_metrics.registry)
    await core.start(args.worker_addr, args.control_addr)
    autoscale = AutoscaleConfig.from_dict(json.loads(args.autoscale)) if args.autoscale else AutoscaleConfig()
    if autoscale.enabled:
        core.autoscaler = Autoscaler(core, autoscale, api_metrics.registry)
        core._spawn(core.autoscaler.run())
    front = ClientFront(core, limits, admin_key=args.admin_key)
    await front.start(args.client_addr)
    app = make_app(core, limits, api_metrics, api_key=args.api_key)
    add_admin_routes(app, core, args.admin_key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    log.info("router up: http://%s:%d  SDK %s  workers connect to %s", args.host, args.port, args.client_addr,
             args.worker_addr)
    await stop.wait()
    await runner.cleanup()
    await front.close()
    await core.close(shutdown_workers=args.stop_workers)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s router %(levelname)s %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
