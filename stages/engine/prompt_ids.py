"""How a prompt becomes token ids: the one rule for chat messages and completions, every family.

It follows the model directory's own tokenizer and chat template, as transformers'
processors do:

- completion text: tokenized with the tokenizer's special tokens; its post-processor
  decides which (LLaVA and Llama prepend bos, Qwen adds none), as ``processor(text=...)``
  and ``tokenizer(text)`` do.
- completion token ids: run exactly as given.
- chat messages: the chat template renders the text, which is then tokenized with the
  tokenizer's special tokens unless the text already begins with the bos token (the
  template wrote it). This is the rule of ``ProcessorMixin.apply_chat_template``:
  LLaVA-1.5's template writes no ``<s>`` and gets one, Llama 3's writes
  ``<|begin_of_text|>`` and keeps exactly one, Qwen's templates have no bos at all.

Image placeholders stay one token per image here; the engine's InputProcessor expands
them. Every entry point (offline ``LLM``, the workers behind the HTTP API and the SDK)
comes through here. No torch and no transformers import: only the tokenizer object
given is called.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenizedPrompt:
    """A prompt's text (None when given as ids), its token ids and its image sources in order."""

    text: str | None
    token_ids: list[int]
    images: list = field(default_factory=list)


def completion_ids(tokenizer, text: str) -> list[int]:
    """A completion prompt's ids: the tokenizer with its own special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=True))


def chat_text_ids(tokenizer, text: str) -> list[int]:
    """A rendered chat's ids: special tokens added unless the template already wrote the bos."""
    bos = getattr(tokenizer, "bos_token", None)
    wrote_bos = bool(bos) and text.startswith(bos)
    return list(tokenizer.encode(text, add_special_tokens=not wrote_bos))


def chat_images(messages: list[dict]) -> list:
    """Image sources of OpenAI-style messages, in order of appearance; raises on a bad shape."""
    if not isinstance(messages, list):
        raise ValueError("messages must be a list")
    images = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError("each message must be an object with a 'role'")
        content = m.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                url = part.get("image_url")
                images.append(url.get("url") if isinstance(url, dict) else url)
            elif kind == "image":
                images.append(part.get("image") or part.get("url") or part.get("path"))
            elif kind != "text":
                raise ValueError(f"unsupported content part type {kind!r}")
    return images


def tokenize_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                  chat_template: str | None = None) -> TokenizedPrompt:
    """OpenAI-style messages -> rendered text, token ids and the image sources."""
    images = chat_images(messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template,
                                         add_generation_prompt=add_generation_prompt)
    return TokenizedPrompt(text, chat_text_ids(tokenizer, text), images)


def tokenize_prompt(tokenizer, prompt, images: list | None = None) -> TokenizedPrompt:
    """A completion prompt -> ids: a str, a list of ids, or a dict with ``prompt`` or
    ``prompt_token_ids`` and optionally ``multi_modal_data={"image": [...]}``.
    ``images`` are appended after the dict's own."""
    images = list(images or [])
    if isinstance(prompt, dict):
        mm = prompt.get("multi_modal_data") or {}
        unknown = set(mm) - {"image"}
        if unknown:
            raise ValueError(f"unsupported multi_modal_data key(s): {sorted(unknown)}; only 'image'")
        imgs = mm.get("image")
        if imgs is not None and not isinstance(imgs, (list, tuple)):
            imgs = [imgs]
        images = list(imgs or []) + images
        if "prompt_token_ids" in prompt:
            return TokenizedPrompt(prompt.get("prompt"), list(prompt["prompt_token_ids"]), images)
        prompt = prompt.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError("a prompt dict needs 'prompt' (str) or 'prompt_token_ids' (list of int)")
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty")
        return TokenizedPrompt(prompt, completion_ids(tokenizer, prompt), images)
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return TokenizedPrompt(None, list(prompt), images)
    raise ValueError(f"unsupported prompt of type {type(prompt).__name__}")
