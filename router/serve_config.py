"""``epd-serve``'s configuration: the deployment YAML (``configs/``), its checks, the worker
plan (ids and devices), the command-line overrides, and the epd-router / epd-stage flags each
setting becomes. No processes are started here (``router.serve``).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "1e1p1d.yaml"
API_FLAGS = {"max_body_mb": "--max-body-mb", "max_images": "--max-images", "max_image_pixels": "--max-image-pixels",
             "remote_images": "--remote-images", "allowed_domains": "--allowed-domains",
             "heartbeat_timeout": "--heartbeat-timeout", "retry_budget": "--retry-budget",
             "worker_wait_s": "--worker-wait", "switch_drain_s": "--switch-drain-s"}
ENGINE_FLAGS = {"dtype": "--dtype", "device": "--device", "kv_cache_memory_gb": "--kv-cache-memory-gb",
                "num_kv_blocks": "--num-kv-blocks", "max_num_seqs": "--max-num-seqs", "block_size": "--block-size",
                "max_num_batched_tokens": "--max-num-batched-tokens", "max_model_len": "--max-model-len",
                "load_format": "--load-format", "threads": "--threads", "async_decode": "--async-decode"}


def cluster_cache_args(cfg) -> list[str]:
    """epd-router flags of ``router.cluster_cache``: true/false, or {enabled, max_kv_entries,
    max_embedding_entries, max_aliases} (the cluster index's bounds)."""
    if not isinstance(cfg, dict):
        return ["--no-cluster-cache"] if cfg is False else []
    out = ["--no-cluster-cache"] if cfg.get("enabled", True) is False else []
    for key, flag in (("max_kv_entries", "--cluster-index-max-kv"),
                      ("max_embedding_entries", "--cluster-index-max-embeddings"),
                      ("max_aliases", "--cluster-index-max-aliases")):
        if cfg.get(key) is not None:
            out += [flag, str(int(cfg[key]))]
    return out


def slo_args(router_cfg: dict) -> list[str]:
    """epd-router flags of ``router.slo: {ttft_ms, tpot_ms}`` and ``router.admission: {max_queue_s}``
    (``off`` or absent: requests queue without bound)."""
    out: list[str] = []
    slo = router_cfg.get("slo") or {}
    for key, flag in (("ttft_ms", "--slo-ttft-ms"), ("tpot_ms", "--slo-tpot-ms")):
        if slo.get(key) is not None:
            out += [flag, str(slo[key])]
    admission = router_cfg.get("admission")
    if isinstance(admission, dict) and admission.get("max_queue_s") not in (None, "off", False):
        out += ["--max-queue-s", str(admission["max_queue_s"])]
    return out


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_model() -> Path:
    out = Path(os.environ.get("EPD_CACHE", Path.home() / ".cache" / "epd")) / "models" / "llava-tiny"
    # In a subprocess: this process stays free of torch. --reuse rebuilds only a stale directory.
    subprocess.run([sys.executable, "-m", "stages.models.make_model", "--family", "llava", "--size", "tiny",
                    "--seed", "0", "--out", str(out), "--reuse"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def load_config(path: str | Path) -> dict:
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    if not cfg.get("workers"):
        raise ValueError(f"{path}: a deployment needs a 'workers' list")
    for w in cfg["workers"]:
        if w.get("role") not in ("encode", "prefill", "decode", "mixed"):
            raise ValueError(f"{path}: worker role must be encode, prefill, decode or mixed, got {w.get('role')!r}")
        _check_placement(path, w)
    if (cfg.get("launcher") or {}).get("kind", "local") not in ("local", "ray"):
        raise ValueError(f"{path}: launcher kind must be local or ray, got {cfg['launcher'].get('kind')!r}")
    return cfg


def _check_placement(path, w: dict) -> None:
    """A worker entry places its workers with ``device: cuda:1`` (all of them) or ``devices: [...]``
    (worker i on ``devices[i % len(devices)]``: one per GPU, or several sharing one)."""
    devices = w.get("devices")
    if devices is None:
        return
    if "device" in w:
        raise ValueError(f"{path}: a {w['role']} entry gives both 'device' and 'devices'")
    if not isinstance(devices, list) or not devices or not all(isinstance(d, str) for d in devices):
        raise ValueError(f"{path}: 'devices' of a {w['role']} entry must be a non-empty list of device names")
    if len(devices) > int(w.get("count", 1)):
        raise ValueError(f"{path}: a {w['role']} entry lists {len(devices)} devices for "
                         f"{w.get('count', 1)} worker(s)")


def worker_plan(cfg: dict) -> list[tuple[str, dict, str]]:
    """(worker id, its entry, its device) for every worker; ids number each role across entries.

    An entry's ``devices`` places its worker i on ``devices[i % len(devices)]``; else its ``device``,
    else ``engine.device``.
    """
    default = (cfg.get("engine") or {}).get("device", "cpu")
    seen: dict[str, int] = {}
    out = []
    for w in cfg["workers"]:
        devices = w.get("devices")
        for i in range(int(w.get("count", 1))):
            n = seen.get(w["role"], 0)
            seen[w["role"]] = n + 1
            out.append((f"{w['role']}-{n}", w, devices[i % len(devices)] if devices else w.get("device", default)))
    return out


# epd-serve flags that override the config's engine settings (vLLM's spelling where it has one).
ENGINE_OVERRIDES = ("dtype", "device", "max_model_len", "max_num_seqs", "kv_cache_memory_gb")


def config_path(name: str) -> Path:
    """A config file, or the name of one in configs/ (``1p1d`` -> configs/1p1d.yaml)."""
    path = Path(name)
    if not path.exists() and (ROOT / "configs" / f"{name}.yaml").exists():
        return ROOT / "configs" / f"{name}.yaml"
    return path


def list_configs() -> str:
    """Each shipped config with the first line of its comment."""
    lines = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        head = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        lines.append(f"{path.stem:18} {head}")
    return "\n".join(lines)


def apply_overrides(cfg: dict, args: argparse.Namespace) -> dict:
    """The config with the command line's settings on top (they win over per-worker entries too)."""
    if args.served_model_name:
        cfg["served_model_name"] = args.served_model_name
    engine = cfg.setdefault("engine", {})
    for key in ENGINE_OVERRIDES:
        value = getattr(args, key)
        if value is None:
            continue
        engine[key] = value
        for w in cfg["workers"]:
            w.pop(key, None)
            if key == "device":
                w.pop("devices", None)
    return cfg
