"""Operator routes: ``GET /admin/workers`` (every worker, its load and its cost model).

With an admin key (``--admin-key`` / ``router.admin_key`` / ``$EPD_ADMIN_KEY``) every
``/admin`` route needs ``Authorization: Bearer KEY`` and answers 401 without it; the OpenAI
routes keep their own ``--api-key``.
"""

from __future__ import annotations

import hmac
import time

from aiohttp import web

from router.backend import ApiError


def workers_view(core) -> dict:
    """{"workers": [{worker_id, role, state, device, load, kv_blocks_used, kv_blocks_total,
    queue_s, cost_model}]} for every worker the router knows, dead ones included."""
    reg, planner, now = core.registry, core.planner, time.monotonic()
    out = []
    for w in sorted(reg.workers.values(), key=lambda w: w.worker_id):
        state = "given_up" if w.worker_id in reg.given_up else reg.state(w, now)
        out.append({"worker_id": w.worker_id, "role": w.role, "state": state, "device": w.info.device,
                    "incarnation": w.info.incarnation, "load": w.load, "running": w.running, "waiting": w.waiting,
                    "kv_blocks_used": w.kv_blocks_used, "kv_blocks_total": w.kv_blocks_total,
                    "queue_s": round(planner.queue_s(w, now), 4), "cost_model": planner.cost(w).to_dict()})
    return {"workers": out, "policy": core.policy.name,
            "slo": {"ttft_ms": _ms(planner.slo.ttft_s), "tpot_ms": _ms(planner.slo.tpot_s)},
            "admission": {"max_queue_s": core.max_queue_s if core.max_queue_s is not None else "off"}}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def add_admin_routes(app: web.Application, core, admin_key: str | None = None) -> None:
    expected = f"Bearer {admin_key}".encode() if admin_key else None

    async def workers(request: web.Request) -> web.Response:
        if expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise ApiError(401, "Incorrect admin key provided.", code="invalid_api_key")
        return web.json_response(workers_view(core))

    app.router.add_get("/admin/workers", workers)
