"""CUDA graphs for pure-decode steps: one per batch-size bucket, captured at start-up.

A step of ``b`` decodes replays the graph of the smallest bucket >= ``b``; the rows
past ``b`` are padding (context 0, slot -1: the attention backend makes them write
and read nothing). The graph covers the model body (embedding, every layer, final
norm); logits are computed outside it, on the real rows.

The graphs read their inputs from static device buffers. Token ids, positions, slots
and context lengths sit in one int64 tensor filled by one host-to-device copy per
step from pinned memory; the block tables go in a second copy from a pinned buffer
(only the ``b x W`` entries in use) and one device copy into the captured table.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from stages.attention.backend import token_slots

log = logging.getLogger(__name__)


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to ``max_batch`` (and ``max_batch`` itself)."""
    out = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(out + [max_batch]))


class DecodeGraphs:
    def __init__(self, model, backend, kv_caches, device: torch.device, max_batch: int, max_blocks: int,
                 block_size: int):
        self.model, self.block_size = model, block_size
        self.buckets = buckets(max_batch)
        self.max_blocks = max_blocks
        top = self.buckets[-1]
        self.pos_rows = 3 if model.uses_mrope else 1
        rows = self.pos_rows + 3  # ids, positions, slots, context lengths
        self.host = torch.zeros(rows, top, dtype=torch.long).pin_memory()
        self.host_np = self.host.numpy()
        self.host_np[self.pos_rows + 1] = -1  # padding rows: no slot
        self.inputs = self.host.to(device)
        self.copied = torch.cuda.Event()
        self.table = torch.zeros(top, max_blocks, dtype=torch.int32, device=device)
        self.table_stage = torch.empty(top * max_blocks, dtype=torch.int32, device=device)
        # Pinned once: pinning a fresh 100+ KB buffer each step cost 3-6 ms at 128-256 x 4,096 tokens.
        self.table_host = torch.empty(top * max_blocks, dtype=torch.int32).pin_memory()
        self.table_host_np = self.table_host.numpy()
        ids = self.inputs[0]
        positions = self.inputs[1:1 + self.pos_rows] if model.uses_mrope else self.inputs[1]
        slots, ctx = self.inputs[self.pos_rows + 1], self.inputs[self.pos_rows + 2]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        t = time.perf_counter()
        pool = None
        with torch.inference_mode():
            for b in reversed(self.buckets):  # largest first: the smaller ones reuse its pool
                meta = backend.decode_graph_metadata(slots[:b], ctx[:b], self.table, block_size)
                pos = positions[..., :b]
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):  # warm-up (Triton compiles) off the capture
                    model(pos, meta, kv_caches, input_ids=ids[:b])
                torch.cuda.current_stream(device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = model(pos, meta, kv_caches, input_ids=ids[:b])
                pool = graph.pool()
                self.graphs[b] = (graph, hidden)
        torch.cuda.synchronize(device)
        log.info("captured %d decode graphs (batch %s) in %.1f s", len(self.graphs), self.buckets,
                 time.perf_counter() - t)

    def fits(self, batch: int, table: np.ndarray) -> bool:
        return batch <= self.buckets[-1] and table.shape[1] <= self.max_blocks

    def run(self, ids: list[int] | None, ctx_lens: list[int], table: np.ndarray,
            deltas: np.ndarray | None, ids_dev: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [b, hidden] of ``b`` decodes: token ids, context lengths (the new
        token included), padded block tables [b, W] and M-RoPE position deltas (None: plain RoPE).
        ``ids_dev``: the token ids already on the device instead (``ids`` None)."""
        b = len(ctx_lens)
        bucket = next(x for x in self.buckets if x >= b)
        ctx = np.asarray(ctx_lens, np.int64)
        pos = ctx - 1
        self.copied.synchronize()  # the previous step's copies have left the pinned buffers
        h, r = self.host_np, self.pos_rows
        if ids_dev is None:
            h[0, :b] = ids
        h[1:1 + r, :b] = pos if deltas is None else pos + deltas
        h[r + 1, :b] = token_slots(table, np.arange(b), pos, self.block_size)
        h[r + 1, b:bucket] = -1
        h[r + 2, :b] = ctx
        h[r + 2, b:bucket] = 0
        self.inputs.copy_(self.host, non_blocking=True)
        if ids_dev is not None:
            self.inputs[0, :b].copy_(ids_dev)  # stream-ordered after the step that produced them
        w = table.shape[1]
        staged = self.table_stage[:b * w]
        self.table_host_np[:b * w] = table.reshape(-1)
        staged.copy_(self.table_host[:b * w], non_blocking=True)
        self.copied.record()
        self.table[:b, :w].copy_(staged.view(b, w))
        graph, hidden = self.graphs[bucket]
        graph.replay()
        return hidden[:b]
