"""Holds the model and the KV cache; turns a scheduled batch into tensors and logits.

Bookkeeping (which blocks, which tokens) belongs to the scheduler; the
runner only obeys it: it lays the batch out flat (decodes first), writes
image embeddings over their placeholder rows, runs the model and returns
the logits of the rows that sample.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from stages.attention.backend import PersistentBlockTables
from stages.attention.staging import PinnedStaging
from stages.engine.config import EngineConfig
from stages.engine.cpu_threads import StepThreads, step_flops
from stages.engine.decode_graphs import DecodeGraphs
from stages.engine.scheduler import ScheduledSeq
from stages.engine.sequence import ImageItem, Sequence
from stages.engine.roles import needs_kv, role_parts
from stages.models.loader import add_part, build_model
from transfer.content_cache import ContentCache

log = logging.getLogger(__name__)


class ModelRunner:
    """The model's parts and the KV pool follow the engine's role (``stages/engine/roles.py``):
    an encode runner has no pool (``num_blocks`` 0, ``kv_caches`` empty); a runner without the
    vision part builds it on the first image it must encode itself."""

    def __init__(self, config: EngineConfig, hf_config, device: torch.device, dtype: torch.dtype):
        self.config, self.hf_config, self.device, self.dtype = config, hf_config, device, dtype
        self.model = build_model(config.model, device, dtype, config.load_format, hf_config,
                                 attention_backend=config.attention_backend, parts=role_parts(config.role))
        self.backend = self.model.attention_backend
        self.block_size = config.block_size
        self.encoder_cache = ContentCache(config.encoder_cache_mb << 20)
        self.num_images_encoded = 0
        self._ids_staging, self._pos_staging = PinnedStaging(torch.long), PinnedStaging(torch.long)
        self.num_blocks, self.kv_caches, self.graphs, self.block_tables = 0, [], None, None
        self._lm_params = None  # counted on the first step (the language part may come later)
        self.threads = StepThreads(device, config.cpu_parallel_min_gflop * 1e9)
        text_cfg = getattr(hf_config, "text_config", None) or hf_config
        self._attn_width = text_cfg.num_attention_heads * self.model.head_dim
        if needs_kv(config.role):
            self.allocate_kv()

    def _part_params(self, part: str) -> int:
        """Parameters of one part (a tied tensor once): what a token or an image pass multiplies."""
        seen = {}
        for name, p in self.model.named_parameters():
            if self.model.part_of(name) == part:
                seen[p.data_ptr()] = p.numel()
        return sum(seen.values())

    def allocate_kv(self) -> None:
        """Allocate the KV pool (an explicit block count wins over the memory budget)."""
        config, m = self.config, self.model
        self.num_blocks = config.num_kv_blocks or self._blocks_for_budget(config.kv_cache_memory_gb)
        shape = (self.num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(m.num_layers)]
        text_cfg = getattr(self.hf_config, "text_config", None) or self.hf_config
        max_len = getattr(text_cfg, "max_position_embeddings", 0)
        max_blocks = min(self.num_blocks, -(-(config.max_model_len or max_len or 1 << 20) // self.block_size))
        self.block_tables = PersistentBlockTables(config.max_num_seqs, max_blocks)
        if self.device.type == "cuda":
            # Before capture: the graphs record the kernels chosen. The switch is process-wide
            # (stages.models.layers.linear): the last engine built in a process sets it.
            from stages.models import gemv_triton

            if config.decode_gemv is False:
                gemv_triton.disable_decode_gemv()
            else:
                picked = gemv_triton.prepare_decode_gemv(self.model)
                log.info("decode GEMV: our kernel for %d of %d (rows, N, K) shapes, cuBLAS for the rest",
                         sum(c is not None for c in picked.values()), len(picked))
        if config.cuda_graphs and self.device.type == "cuda" and self.backend.supports_cuda_graphs:
            self.graphs = DecodeGraphs(self.model, self.backend, self.kv_caches, self.device, config.max_num_seqs,
                                       max_blocks, self.block_size)

    def free_kv(self) -> None:
        self.num_blocks, self.kv_caches, self.graphs, self.block_tables = 0, [], None, None

    def set_parts(self, parts) -> None:
        """Hold exactly ``parts``: free the others first (lower peak), then build the missing."""
        self._lm_params = None
        for part in self.model.parts - set(parts):
            self.model.drop_part(part)
        for part in parts:
            add_part(self.model, part)

    def ensure_vision(self) -> None:
        if "vision" not in self.model.parts:
            log.info("building the vision tower: this worker must encode an image itself")
            with torch.inference_mode(False):  # called from inside a step: the weights must be ordinary tensors
                add_part(self.model, "vision")

    def memory(self) -> dict:
        """Bytes of the weights held (a tied tensor counted once) and of the KV pool."""
        seen, weights = set(), 0
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                weights += t.numel() * t.element_size()
        kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv_caches)
        return {"parts": sorted(self.model.parts), "weights_bytes": weights, "kv_bytes": kv,
                "num_blocks": self.num_blocks}

    def _blocks_for_budget(self, gb: float) -> int:
        m = self.model
        per_block = 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * self.dtype.itemsize
        return max(2, int(gb * (1 << 30)) // per_block)

    # ---- images -----------------------------------------------------------------------------
    def image_embedding(self, img: ImageItem) -> torch.Tensor:
        if img.embedding is not None:
            return img.embedding
        emb = self.encoder_cache.get(img.content_hash)
        if emb is None:
            emb = self.encode([img])[0]
        return emb

    @torch.inference_mode()
    def encode(self, images: list[ImageItem]) -> list[torch.Tensor]:
        """Run the vision encoder on ``images`` and cache the results by content hash."""
        self.ensure_vision()
        flops = 2.0 * self._part_params("vision") * sum(img.length for img in images)
        with self.threads.run(flops):
            embs = self.model.encode_images([img.inputs for img in images])
        for img, emb in zip(images, embs):
            if emb.shape[0] != img.length:
                raise RuntimeError(f"image {img.content_hash[:12]} encoded to {emb.shape[0]} tokens, "
                                   f"the prompt holds {img.length} placeholders")
            self.encoder_cache.put(img.content_hash, emb)
        self.num_images_encoded += len(images)
        return embs

    def _ensure_encoded(self, batch: list[ScheduledSeq]) -> None:
        """Encode, in one call, every image a prefill chunk of this step needs and lacks."""
        todo: dict[str, ImageItem] = {}
        for s in batch:
            start, end = s.seq.num_computed_tokens, s.seq.num_computed_tokens + s.num_new_tokens
            for img in s.seq.images:
                if (img.embedding is None and img.offset < end and start < img.offset + img.length
                        and img.content_hash not in self.encoder_cache):
                    todo.setdefault(img.content_hash, img)
        if todo:
            self.encode(list(todo.values()))

    # ---- KV in and out (disaggregated prefill/decode) --------------------------------------
    def _token_slots(self, seq: Sequence, n: int) -> torch.Tensor:
        bs, pos = self.block_size, np.arange(n)
        table = np.asarray(seq.block_table[:-(-n // bs)], np.int64)
        return torch.from_numpy(table[pos // bs] * bs + pos % bs).to(self.device)

    def read_kv(self, seq: Sequence, n: int) -> torch.Tensor:
        """KV of ``seq``'s first ``n`` tokens: [layers, 2, n, kv_heads, head_dim] (a copy)."""
        return self._read_slots(self._token_slots(seq, n))

    def read_blocks(self, blocks: list[int]) -> torch.Tensor:
        """KV of whole blocks, in order, shaped like :meth:`read_kv`'s."""
        bs = self.block_size
        slots = (np.asarray(blocks, np.int64)[:, None] * bs + np.arange(bs)).reshape(-1)
        return self._read_slots(torch.from_numpy(slots).to(self.device))

    def kv_shape(self, n: int) -> tuple[int, ...]:
        """The shape :meth:`read_kv` gives for ``n`` tokens (what an imported KV must have)."""
        k = self.kv_caches[0][0]
        return (len(self.kv_caches), 2, n, *k.shape[2:])

    @torch.inference_mode()
    def _read_slots(self, slots: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.stack([k.view(-1, *k.shape[2:])[slots], v.view(-1, *v.shape[2:])[slots]])
                            for k, v in self.kv_caches])

    @torch.inference_mode()
    def write_kv(self, seq: Sequence, kv: torch.Tensor) -> None:
        """Store ``kv`` (as from :meth:`read_kv`) into ``seq``'s first blocks."""
        slots = self._token_slots(seq, kv.shape[2])
        kv = kv.to(device=self.device, dtype=self.dtype)
        for layer, (k, v) in enumerate(self.kv_caches):
            k.view(-1, *k.shape[2:]).index_copy_(0, slots, kv[layer, 0])
            v.view(-1, *v.shape[2:]).index_copy_(0, slots, kv[layer, 1])

    # ---- one step ---------------------------------------------------------------------------
    def _positions(self, batch: list[ScheduledSeq], meta) -> torch.Tensor:
        """Rotary positions of the flat batch: [T], or [3, T] for M-RoPE models.

        Vectorized from the backend's host layout; only M-RoPE prefill chunks that still cover
        prompt tokens (whose image tokens have grid positions) copy their rows one sequence each.
        """
        pos = meta.host["positions"]
        if not self.model.uses_mrope:
            return torch.from_numpy(pos)
        deltas = np.fromiter((s.seq.mrope_delta if s.seq.mrope_positions is not None else 0 for s in batch),
                             np.int64, len(batch))
        out = np.broadcast_to(pos + deltas[meta.host["seq_of_token"]], (3, len(pos))).copy()
        out = torch.from_numpy(out)
        for s, row0 in zip(batch, meta.query_start):
            seq, start = s.seq, s.seq.num_computed_tokens
            n = seq.num_prompt_tokens
            if seq.mrope_positions is not None and start < n:
                end = min(start + s.num_new_tokens, n)
                out[:, row0:row0 + end - start] = seq.mrope_positions[:, start:end]
        return out

    @staticmethod
    def _step_has_images(batch: list[ScheduledSeq]) -> bool:
        """Whether any image placeholder lies among this step's new tokens."""
        for s in batch:
            start = s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            if any(img.offset < end and start < img.offset + img.length for img in s.seq.images):
                return True
        return False

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq],
                kv_loads: list[Sequence] = ()) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one step; returns float32 logits [n_sampling, vocab] and their sequences."""
        if self._lm_params is None:
            self._lm_params = self._part_params("language")
        q = [s.num_new_tokens for s in batch]
        ctx = [s.seq.num_computed_tokens + s.num_new_tokens for s in batch]
        with self.threads.run(step_flops(self._lm_params, self._attn_width, self.model.num_layers, q, ctx)):
            return self._execute(batch, kv_loads)

    def _execute(self, batch, kv_loads):
        for seq in kv_loads:
            self.write_kv(seq, seq.pending_kv)
            seq.pending_kv = None
        batch = sorted(batch, key=lambda s: s.num_new_tokens != 1)  # decodes first (stable)
        # One pass over the sequences (no loop over tokens): ids, lengths, tables, sampling rows.
        ids, q_lens, ctx_lens, tables, sample_rows, sample_seqs = [], [], [], [], [], []
        offset = 0
        for s in batch:
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            if n == 1:
                ids.append(seq.token_id(start))
            else:
                ids.extend(seq.token_ids(start, start + n))
            q_lens.append(n)
            ctx_lens.append(start + n)
            tables.append(seq.block_table)
            offset += n
            if s.samples:
                sample_rows.append(offset - 1)
                sample_seqs.append(seq)
        dev = self.device
        table = self.block_tables.gather([s.seq.request_id for s in batch], tables)
        images = self.model.is_multimodal and self._step_has_images(batch)
        if (self.graphs is not None and table is not None and offset == len(batch) == len(sample_rows)
                and not images and self.graphs.fits(len(batch), table)):
            deltas = None
            if self.model.uses_mrope:
                deltas = np.fromiter((s.seq.mrope_delta for s in batch), np.int64, len(batch))
            hidden = self.graphs.run(ids, ctx_lens, table, deltas)
            return self.model.compute_logits(hidden).float(), sample_seqs
        meta = self.backend.build_metadata(q_lens, ctx_lens, tables, self.block_size, dev, table)
        pos = self._pos_staging.to_device(self._positions(batch, meta).numpy(), dev)
        input_ids = self._ids_staging.to_device(np.asarray(ids, np.int64), dev)
        embeds = self._embed_with_images(batch, input_ids, meta.query_start) if images else None
        hidden = self.model(pos, meta, self.kv_caches, input_ids=input_ids, inputs_embeds=embeds)
        if not sample_rows:
            return torch.empty(0), []
        if len(sample_rows) < hidden.shape[0]:
            hidden = hidden[torch.tensor(sample_rows, device=dev)]
        logits = self.model.compute_logits(hidden)
        return logits.float(), sample_seqs

    @torch.inference_mode()
    def execute_decode(self, seqs: list[Sequence], ids: torch.Tensor) -> torch.Tensor:
        """One decode token per sequence whose input ids are already on the device (the
        previous step's argmax: ``stages/engine/lookahead.py``); each sequence's blocks cover
        ``num_computed_tokens + 1``. Returns float32 logits [len(seqs), vocab]."""
        ctx_lens = [s.num_computed_tokens + 1 for s in seqs]
        tables = [s.block_table for s in seqs]
        flops = step_flops(self._lm_params, self._attn_width, self.model.num_layers, [1] * len(seqs), ctx_lens)
        with self.threads.run(flops):
            table = self.block_tables.gather([s.request_id for s in seqs], tables)
            deltas = None
            if self.model.uses_mrope:
                deltas = np.fromiter((s.mrope_delta for s in seqs), np.int64, len(seqs))
            if self.graphs is not None and table is not None and self.graphs.fits(len(seqs), table):
                hidden = self.graphs.run(None, ctx_lens, table, deltas, ids_dev=ids)
                return self.model.compute_logits(hidden).float()
            batch = [ScheduledSeq(s, 1) for s in seqs]
            meta = self.backend.build_metadata([1] * len(seqs), ctx_lens, tables, self.block_size, self.device,
                                               table)
            pos = self._pos_staging.to_device(self._positions(batch, meta).numpy(), self.device)
            hidden = self.model(pos, meta, self.kv_caches, input_ids=ids)
            return self.model.compute_logits(hidden).float()

    def _embed_with_images(self, batch, input_ids, q_start) -> torch.Tensor:
        self._ensure_encoded(batch)
        embeds = self.model.embed_tokens(input_ids)
        for s, row0 in zip(batch, q_start):
            start = s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            for img in s.seq.images:
                lo, hi = max(start, img.offset), min(end, img.offset + img.length)
                if lo >= hi:
                    continue
                emb = self.image_embedding(img)
                embeds[row0 + lo - start: row0 + hi - start] = \
                    emb[lo - img.offset: hi - img.offset].to(embeds.dtype)
        return embeds
