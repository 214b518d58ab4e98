"""The worker's answers to ``/tokenize`` and ``/detokenize``: the ids a request would run.

The router holds no tokenizer (it loads neither torch nor transformers), so it asks a
worker, which answers with the same code that admits a request: the prompt rules of
``stages.engine.prompt_ids`` and the engine's image-placeholder expansion. A chat's
count therefore equals the ``usage.prompt_tokens`` of the same chat sent for completion.
Both run on the engine thread, like request admission.
"""

from __future__ import annotations

from bus import messages as m
from stages.engine.prompt_ids import tokenize_chat


def tokenize(engine, msg: m.TokenizeRequest) -> list[int]:
    """Prompt ids with every image placeholder expanded; ValueError for what cannot be run."""
    tok = engine.tokenizer
    if msg.messages is not None:
        if msg.add_special_tokens is None:
            ids = engine.inputs.render_chat(msg.messages, msg.add_generation_prompt)["prompt_token_ids"]
        else:
            text = tokenize_chat(tok, msg.messages, msg.add_generation_prompt).text
            ids = list(tok.encode(text, add_special_tokens=msg.add_special_tokens))
    elif msg.prompt is not None:
        if msg.add_special_tokens is None:
            ids = engine.inputs.split(msg.prompt).token_ids
        else:
            ids = list(tok.encode(msg.prompt, add_special_tokens=msg.add_special_tokens))
    else:
        raise ValueError("give messages or prompt")
    if not msg.images:
        return list(ids)
    return engine.inputs.process(ids, list(msg.images)).token_ids


def detokenize(engine, token_ids: list[int]) -> str:
    bad = [t for t in token_ids if not 0 <= t < engine.vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is out of range [0, {engine.vocab_size})")
    return engine.tokenizer.decode(token_ids)
