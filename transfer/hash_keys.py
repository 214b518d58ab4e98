"""Content keys every process agrees on, without decoding anything.

The router hashes each image's encoded bytes (cheap: it never decodes
pixels) to recognise an image it has seen; workers key embeddings by the hash
of the decoded pixels (``stages.engine.images.image_content_hash``), which
the router learns from the first encode. The store keys name what a worker
publishes for pulls.
"""

from __future__ import annotations

from array import array

import xxhash


def image_bytes_key(data: bytes) -> str:
    """xxh3-128 of an image file's bytes, as 32 hex digits."""
    return xxhash.xxh3_128_hexdigest(data)


def embedding_key(content_hash: str) -> str:
    """Store key of an image embedding on its encode worker."""
    return f"emb/{content_hash}"


def handoff_key(request_id: str) -> str:
    """Store key of a prefilled request's KV on its prefill worker."""
    return f"kv/{request_id}"


def prefix_key(request_id: str, nonce: str) -> str:
    """Store key of prompt blocks a worker copied out for another one."""
    return f"prefix/{request_id}/{nonce}"


def hash_block(parent: int | None, token_ids: list[int], extra: tuple) -> int:
    """Chained hash of one full KV block: its parent's hash, its token ids, and ``extra`` (the
    content hashes and offsets of the images it overlaps). Engines key cached blocks by it and
    the router prices prefix hits by it, so it lives here, where both may import it."""
    h = xxhash.xxh3_128()
    h.update((parent or 0).to_bytes(16, "little"))
    h.update(array("q", token_ids).tobytes())
    if extra:
        h.update(repr(extra).encode())
    return h.intdigest()
