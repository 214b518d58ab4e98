"""Shared pieces of the end-to-end tests: deployments, request bodies, references."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess

from router.serve import ROOT, Deployment, load_config

CONFIGS = ["aggregated", "1p1d", "1e1p1d", "2e1p1d"]
MAX_TOKENS = 12


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def chat_cases(images, n: int = 16) -> list[tuple[str, list]]:
    """``n`` (text, images) pairs with 0-3 images of different sizes."""
    texts = ["What is in this picture?", "Describe the colours", "Count the objects", "Hello there",
             "Tell me a story about rivers", "Why is the sky blue?", "Compare these", "A B C D"]
    out = []
    for i in range(n):
        k = i % 4
        out.append((f"{texts[i % len(texts)]} #{i}", [images[(i + j) % len(images)] for j in range(k)]))
    return out


def chat_body(model: str, text: str, imgs: list, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in imgs]
    content.append({"type": "text", "text": text})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "temperature": 0, **extra}


def reference(model_dir: str, text: str, imgs: list) -> list[int]:
    """transformers' greedy tokens for the chat the server renders (prompt from its processor)."""
    from tests.hf_reference import hf_chat

    return hf_chat(model_dir, _conversation(text, imgs), imgs, MAX_TOKENS)[1]


def reference_prompt(model_dir: str, text: str, imgs: list) -> list[int]:
    """transformers' prompt ids for that chat (images expanded): what usage.prompt_tokens counts."""
    from tests.hf_reference import hf_chat_inputs

    return hf_chat_inputs(model_dir, _conversation(text, imgs), imgs)["input_ids"][0].tolist()


def _conversation(text: str, imgs: list) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"} for _ in imgs] + [{"type": "text", "text": text}]}]


def start(config: str, model_dir: str, log_dir, **kw) -> Deployment:
    dep = Deployment(load_config(ROOT / "configs" / f"{config}.yaml"), model_dir, log_dir=log_dir, **kw)
    dep.start(timeout=240)
    return dep


def kv_blocks_used(metrics_text: str) -> int:
    return int(sum(float(v) for v in re.findall(r'^epd:kv_cache_blocks_used\{[^}]*\} ([0-9.e+]+)$',
                                                 metrics_text, re.M)))


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (its name may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_serve(proc: subprocess.Popen) -> None:
    """Ctrl-C an ``epd-serve`` started in its own session; kill its group if it has not ended in 30 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def read_chat_stream(session, url: str, body: dict, progress: list, i: int) -> dict:
    """One streamed chat completion: its token ids, text, usage, finish reason and error (an
    error event's message, or the HTTP status and body); ``progress[i]`` follows the ids."""
    out = {"ids": [], "text": "", "usage": None, "error": None, "finish": None}
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            out["error"] = f"{r.status}: {await r.text()}"
            return out
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                out["error"] = ev["error"]["message"]
                continue
            if ev.get("usage"):
                out["usage"] = ev["usage"]
            for ch in ev.get("choices", []):
                out["text"] += ch["delta"].get("content") or ""
                out["ids"] += ch.get("token_ids") or ch["delta"].get("token_ids") or []
                out["finish"] = ch.get("finish_reason") or out["finish"]
            progress[i] = len(out["ids"])
    return out
