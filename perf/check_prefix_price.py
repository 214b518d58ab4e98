"""Does the plan's prefix pricing see what the workers' prefix caches hold? One real deployment.

    python -m perf.check_prefix_price

Sends the same chat three times (text only, then with an image) to a 1e2p1d deployment of the
tiny LLaVA and sets, per request, the tokens the router's plan counted as cached (its DEBUG line,
``router.plan_metrics``) beside the tokens the prefill worker reused (the answer's
``usage.prompt_tokens_details.cached_tokens``). Exits 1 when they differ on any request after the
first of each kind (the first is cached nowhere; the cluster index learns the blocks 0.1 s later).
"""

from __future__ import annotations

import base64
import io
import json
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from router.serve import ROOT, Deployment, default_model, free_port, load_config


def _chat(url: str, content) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=60).read())["usage"]


def main() -> int:
    cfg = load_config(ROOT / "configs" / "2e1p1d.yaml")
    cfg["served_model_name"] = "m"
    cfg["workers"] = [{"role": "encode", "count": 1}, {"role": "prefill", "count": 2}, {"role": "decode", "count": 1}]
    logs = Path(tempfile.mkdtemp(prefix="epd-prefix-price-"))
    dep = Deployment(cfg, str(default_model()), port=free_port(), log_dir=logs,
                     extra_router_args=["--log-level", "DEBUG"])
    text = "Tell me a long story about a cat who lives in a lighthouse by the sea. " * 6
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(buf, format="PNG")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}
    cases = [("text", text)] * 3 + [("image", [image, {"type": "text", "text": text}])] * 3
    dep.start(180)
    try:
        worker = []
        for _, content in cases:
            worker.append(_chat(dep.url, content)["prompt_tokens_details"]["cached_tokens"])
            time.sleep(0.5)  # the cache events reach the router's index every 0.1 s
    finally:
        dep.stop()
    planned = [int(n) for n in re.findall(r"; (\d+) of \d+ tokens cached\)", (logs / "router.log").read_text())]
    bad = 0
    print("request  planned cached  worker reused")
    for i, ((kind, _), p, w) in enumerate(zip(cases, planned, worker)):
        print(f"{kind:6} {i % 3 + 1}  {p:14d}  {w:13d}")
        bad += i % 3 > 0 and p != w
    return 1 if bad or len(planned) != len(cases) else 0


if __name__ == "__main__":
    sys.exit(main())
