"""Streaming detokenization and stop-string search.

`IncrementalDetokenizer` follows vLLM's prefix_offset/read_offset scheme: each step
decodes only a short window of ids, twice (the window's already-emitted prefix, and the
whole window), and emits the difference. Decoding a window with a little left context
rather than the new ids alone keeps tokenizer-specific joins right (e.g. SentencePiece
dropping the leading space of the first token); holding back text that ends in U+FFFD
keeps a multi-byte character split across tokens from being emitted half-formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
# Prompt ids kept as left context for the first output tokens (vLLM uses 5).
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns one request's output ids into text deltas, one step at a time.

    Invariant: the concatenation of every `add` delta and the final `flush` equals
    `tokenizer.decode(token_ids, skip_special_tokens=...)` for byte-level BPE tokenizers
    (given a prompt that ends on a whole character). Tokenizers whose decode applies a
    non-local cleanup (`clean_up_tokenization_spaces` on WordPiece) can differ at window
    edges, as in vLLM.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True):
        self._tokenizer = tokenizer
        # Fast tokenizers ignore spaces_between_special_tokens; slow ones honour it.
        self._decode_kwargs = {"skip_special_tokens": skip_special_tokens,
                               "spaces_between_special_tokens": spaces_between_special_tokens}
        # A fast tokenizer without the cleanup pass decodes exactly as its Rust backend does:
        # call that directly (the wrapper's argument handling cost more than the decode).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast = None
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._fast = backend.decode
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self.token_ids: list[int] = []
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._fast is not None:
            return self._fast(ids, skip_special_tokens=self._decode_kwargs["skip_special_tokens"])
        return self._tokenizer.decode(ids, **self._decode_kwargs)

    def add(self, new_token_ids: Sequence[int]) -> str:
        """Append output ids; return the newly complete text (may be "")."""
        new_token_ids = list(new_token_ids)
        self.token_ids.extend(new_token_ids)
        self._ids.extend(new_token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of the request: release text held back for an incomplete character.

        What a byte-level decode of the full output shows for those bytes (U+FFFD) is
        what gets emitted.
        """
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        window_text = self._decode(self._ids[self._prefix_offset:])
        if not final and window_text.endswith(REPLACEMENT_CHAR):
            return ""
        if len(window_text) <= len(self._prefix_text):
            # Nothing visible yet (e.g. only skipped special tokens); keep the window.
            return ""
        delta = window_text[len(self._prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        # Ids before the window are never decoded again.
        if self._prefix_offset > 4096:
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        self.text += delta
        return delta


def find_stop_string(text: str, new_delta_len: int, stops: list[str],
                     include_stop_str: bool) -> tuple[str, int] | None:
    """The stop string completed by the last `new_delta_len` chars of `text`, if any.

    Returns (stop, length to truncate `text` to): the text before the stop, or through it
    when `include_stop_str`. Only occurrences that end inside the new delta are searched
    (earlier ones were found by earlier calls). With several matches the one starting
    first wins; at the same start, the one listed first.
    """
    if new_delta_len <= 0 or not stops:
        return None
    best: tuple[str, int] | None = None
    for stop in stops:
        start = max(0, len(text) - new_delta_len - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[1]):
            best = (stop, index)
    if best is None:
        return None
    stop, index = best
    return stop, index + len(stop) if include_stop_str else index


def stop_string_holdback(text: str, stops: list[str]) -> int:
    """How many trailing chars of `text` to withhold from a stream: the longest suffix
    that is a proper prefix of some stop string, so it could still become a stop."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held
