"""Which workers hold which requests: the router's one record of it.

A worker *runs* a request from the dispatch of a stage to it until that stage is done (its
result came, or the attempt was aborted). After that it may still *keep* part of the request's
state until the request ends: a prefill worker's parked KV, an encoder's share of a planned
encode. Every holder is a target when the attempt is aborted (``holders_of``); only what a
worker runs is its load (``requests_of``, ``count``): the planner's queue, the policy's least
loaded, a role switch's drain and ``in_flight`` in ``GET /admin/workers`` all read it here.

Invariant (``check``): a worker that runs a request is one of its holders.
"""

from __future__ import annotations


class Holdings:
    def __init__(self) -> None:
        self._runs: dict[str, set[str]] = {}  # worker id -> request ids it runs
        self._holders: dict[str, set[str]] = {}  # request id -> worker ids holding some of it

    def add(self, request_id: str, worker_id: str) -> None:
        """``worker_id`` runs a stage of ``request_id`` now."""
        self._runs.setdefault(worker_id, set()).add(request_id)
        self._holders.setdefault(request_id, set()).add(worker_id)

    def finish(self, request_id: str, worker_id: str) -> None:
        """Its stage is done; the worker still keeps part of the request (an abort target)."""
        self._discard(self._runs, worker_id, request_id)

    def remove(self, request_id: str, worker_id: str) -> None:
        """The worker holds nothing of the request any more."""
        self._discard(self._runs, worker_id, request_id)
        self._discard(self._holders, request_id, worker_id)

    def drop_request(self, request_id: str) -> set[str]:
        """Forget the request everywhere (it ended, or its attempt was aborted): its holders."""
        holders = self._holders.pop(request_id, set())
        for wid in holders:
            self._discard(self._runs, wid, request_id)
        return holders

    def drop_worker(self, worker_id: str) -> None:
        """A dead or restarted incarnation holds nothing."""
        self._runs.pop(worker_id, None)
        for rid in [r for r, ws in self._holders.items() if worker_id in ws]:
            self._discard(self._holders, rid, worker_id)

    def holders_of(self, request_id: str) -> frozenset[str]:
        return frozenset(self._holders.get(request_id, ()))

    def requests_of(self, worker_id: str) -> frozenset[str]:
        return frozenset(self._runs.get(worker_id, ()))

    def count(self, worker_id: str) -> int:
        return len(self._runs.get(worker_id, ()))

    def check(self) -> None:
        """Raise AssertionError when the invariant does not hold (for tests)."""
        for wid, rids in self._runs.items():
            for rid in rids:
                assert wid in self._holders.get(rid, ()), f"{wid} runs {rid} but does not hold it"

    @staticmethod
    def _discard(table: dict[str, set[str]], key: str, value: str) -> None:
        values = table.get(key)
        if values is not None:
            values.discard(value)
            if not values:
                del table[key]
