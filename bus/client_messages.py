"""The client SDK's messages (``bus.client`` <-> ``router.client_front``), type ids 40-59.

Re-exported by ``bus.messages``, whose import registers them with the codec.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from bus.codec import message


# ---- client SDK <-> router ---------------------------------------------------------------------
@message(40)
class ClientRequest:
    """An OpenAI request body sent over ZeroMQ; validated exactly like the HTTP one."""

    request_id: str
    kind: str  # "chat" | "completion"
    body: dict


@message(41)
class ClientAbort:
    request_id: str


@message(42)
class ClientError:
    request_id: str
    status: int
    message: str
    type: str = "invalid_request_error"


@message(43)
class HealthQuery:
    pass


@message(44)
class HealthReply:
    ready: bool
    detail: dict[str, Any]


@message(45)
class AdminCall:
    """An operator call, as the HTTP ``/admin`` routes: ``action`` "workers" (no args) or
    "switch_role" (worker_id, role, drain_s). Answered by ``AdminReply`` or ``ClientError``."""

    request_id: str
    action: str
    args: dict[str, Any] = field(default_factory=dict)
    admin_key: str | None = None


@message(46)
class AdminReply:
    request_id: str
    body: dict[str, Any]
