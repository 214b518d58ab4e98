"""CUDA graphs for pure-decode steps: one per batch-size bucket, captured at start-up.

A step of ``b`` decodes replays the graph of the smallest bucket >= ``b``; the rows
past ``b`` are padding (context 0, slot -1: the attention backend makes them write
and read nothing). The graph covers the model body (embedding, every layer, final
norm); logits are computed outside it, on the rows that are real. The graphs read
their inputs from static buffers: token ids, positions and the backend's decode
metadata, which ``run`` refills each step with a few device copies.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to ``max_batch`` (and ``max_batch`` itself)."""
    out = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(out + [max_batch]))


class DecodeGraphs:
    def __init__(self, model, backend, kv_caches, device: torch.device, max_batch: int, max_blocks: int,
                 block_size: int):
        self.model = model
        self.buckets = buckets(max_batch)
        self.max_blocks = max_blocks
        top = self.buckets[-1]
        self.input_ids = torch.zeros(top, dtype=torch.long, device=device)
        self.positions = torch.zeros((3, top) if model.uses_mrope else (top,), dtype=torch.long, device=device)
        self.meta = backend.decode_graph_buffers(top, max_blocks, block_size, device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        t = time.perf_counter()
        pool = None
        with torch.inference_mode():
            for b in reversed(self.buckets):  # largest first: the smaller ones reuse its pool
                meta = self.meta.view(b)
                pos = self.positions[..., :b]
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):  # warm-up (Triton compiles) off the capture
                    model(pos, meta, kv_caches, input_ids=self.input_ids[:b])
                torch.cuda.current_stream(device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = model(pos, meta, kv_caches, input_ids=self.input_ids[:b])
                pool = graph.pool()
                self.graphs[b] = (graph, hidden)
        torch.cuda.synchronize(device)
        log.info("captured %d decode graphs (batch %s) in %.1f s", len(self.graphs), self.buckets,
                 time.perf_counter() - t)

    def fits(self, batch: int, meta) -> bool:
        return batch <= self.buckets[-1] and meta.cache["table"].shape[1] <= self.max_blocks

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """Hidden states [b, hidden] of a decode step whose metadata is ``meta``."""
        b = input_ids.shape[0]
        bucket = next(x for x in self.buckets if x >= b)
        self.input_ids[:b].copy_(input_ids)
        self.positions[..., :b].copy_(positions)
        self.meta.load(meta, bucket)
        graph, hidden = self.graphs[bucket]
        graph.replay()
        return hidden[:b]
