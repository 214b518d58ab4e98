"""Operator routes: ``GET /admin/workers`` (every worker, its load and its cost model) and
``POST /admin/workers/{worker_id}/role`` (a live role switch, ``router.role_switch``).

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
    queue_s, cost_model, role_state, epoch}]} for every worker the router knows, dead ones
    included. ``state`` is its liveness (alive, suspect, dead, given_up); ``role_state`` is
    ``active``, or ``draining`` / ``switching`` during a role switch (then ``switching_to``)."""
    reg, planner, now = core.registry, core.planner, time.monotonic()
    out = []
    for w in sorted(reg.workers.values(), key=lambda w: w.worker_id):
        state = "given_up" if w.worker_id in reg.given_up else reg.state(w, now)
        out.append({"worker_id": w.worker_id, "role": w.role, "state": state, "device": w.info.device,
                    "incarnation": w.info.incarnation, "load": w.load,
                    "in_flight": core.holdings.count(w.worker_id), "running": w.running, "waiting": w.waiting,
                    "kv_blocks_used": w.kv_blocks_used, "kv_blocks_total": w.kv_blocks_total,
                    "queue_s": round(planner.queue_s(w, now), 4), "cost_model": planner.cost(w).to_dict(),
                    **core.switches.view(w)})
    return {"workers": out, "policy": core.policy.name,
            "slo": {"ttft_ms": _ms(planner.slo.ttft_s), "tpot_ms": _ms(planner.slo.tpot_s)},
            "admission": {"max_queue_s": core.max_queue_s if core.max_queue_s is not None else "off"}}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def add_admin_routes(app: web.Application, core, admin_key: str | None = None) -> None:
    expected = f"Bearer {admin_key}".encode() if admin_key else None

    def check(request: web.Request) -> None:
        if expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise ApiError(401, "Incorrect admin key provided.", code="invalid_api_key")

    async def workers(request: web.Request) -> web.Response:
        check(request)
        return web.json_response(workers_view(core))

    async def switch_role(request: web.Request) -> web.Response:
        """{"role": "encode"|"prefill"|"decode", "drain_s"?: seconds} -> 202 {worker_id, from, role,
        epoch, state}; 400 bad body, 404 unknown worker, 409 refused (router.role_switch)."""
        check(request)
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the body must be a JSON object like {\"role\": \"decode\"}") from None
        if not isinstance(body, dict) or not isinstance(body.get("role"), str):
            raise ApiError(400, "the body must be a JSON object with a string 'role'", param="role")
        out = core.switches.request(request.match_info["worker_id"], body["role"], body.get("drain_s"))
        return web.json_response(out, status=202)

    app.router.add_get("/admin/workers", workers)
    app.router.add_post("/admin/workers/{worker_id}/role", switch_role)
