"""Reading a local Hugging Face model directory: config, weights, family.

Weights come from ``model.safetensors`` or a sharded set with
``model.safetensors.index.json``; ``load_format="dummy"`` skips the files and
fills every parameter with small random values (real sizes, for benchmarks).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from stages.attention.backend import get_attention_backend
from stages.models.base import EngineModel
from stages.models.random_weights import tensor_seed

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "llava", "qwen2_5_vl")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on cpu (the fast dtype without bf16 instructions), bfloat16 elsewhere."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return _DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name.startswith("npu"):
        try:
            import torch_npu  # noqa: F401  (registers the npu device)
        except ImportError as e:
            raise ValueError("device 'npu' needs torch_npu (pip install 'epd[npu]')") from e
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available")
    return dev


def load_hf_config(model_dir: str | Path):
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a model directory (no config.json)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"unsupported model family {model_type!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
    return AutoConfig.from_pretrained(path, local_files_only=True)


def iter_checkpoint(model_dir: str | Path, keep=lambda key: True) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors whose key passes ``keep``. The files are memory-mapped
    (safe_open), so a tensor left out is never read from disk."""
    path = Path(model_dir)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        # Only the shards that hold a wanted tensor are opened.
        files = sorted({f for k, f in weight_map.items() if keep(k)})
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{model_dir} holds no safetensors weights (use load_format='dummy' for random ones)")
    for name in files:
        with safe_open(path / name, framework="pt") as f:
            for key in f.keys():
                if keep(key):
                    yield key, f.get_tensor(key)


def _dummy_weights(model: EngineModel, parts) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights for ``parts``. Each tensor draws from its own generator, seeded by its
    name: a worker holding only some parts gets the very values a whole-model worker holds
    (one shared generator would shift every tensor after a part left out)."""
    # Drawn on the model's device: a 7B model's 8.3 G values take ~45 s from the cpu generator.
    for name, p in model.named_parameters():
        if model.part_of(name) not in parts:
            continue
        owner, _, leaf = name.rpartition(".")
        if "norm" in owner.rpartition(".")[2]:  # norms stay neutral so activations stay sane
            yield name, torch.ones(p.shape) if leaf == "weight" else torch.zeros(p.shape)
        else:
            gen = torch.Generator(p.device).manual_seed(tensor_seed(0, name))
            yield name, torch.empty(p.shape, device=p.device, dtype=p.dtype).uniform_(-0.05, 0.05, generator=gen)


_INIT_FNS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
             "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextmanager
def _no_init():
    """Build modules without initialising their parameters: every one is overwritten by the load
    (``copy_named_weights`` refuses a partial load), and drawing ~100 M random values first
    made a small model's build, and a live role switch, take seconds on a CPU. The patch is
    process-wide while it lasts; in a worker only the engine thread builds modules."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FNS}
    for name in _INIT_FNS:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype,
                load_format: str = "auto", hf_config=None, attention_backend: str = "auto",
                parts=None) -> EngineModel:
    """Instantiate our implementation of the directory's family with the parts ``parts``
    (default: all) and load their weights."""
    from stages.models.registry import model_class

    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"unsupported load_format {load_format!r}; choose auto, safetensors or dummy")
    hf_config = hf_config or load_hf_config(model_dir)
    cls = model_class(hf_config.model_type)
    parts = tuple(p for p in cls.PARTS if parts is None or p in parts)
    backend = get_attention_backend(device, attention_backend, dtype)
    with torch.device(device), _default_dtype(dtype), _no_init():
        model = cls(hf_config, backend, parts=parts)
    model.attention_backend = backend
    # What a later ``add_part`` needs to build and fill a part the same way.
    model.source = (str(model_dir), device, dtype, load_format)
    _load(model, parts)
    return model.eval()


def _load(model: EngineModel, parts) -> None:
    model_dir, _, _, load_format = model.source
    parts = frozenset(parts)
    if load_format == "dummy":
        model.load_weights(_dummy_weights(model, parts), parts)
        return

    def keep(key: str) -> bool:
        target = model.checkpoint_name(key)
        return target is not None and model.part_of(target) in parts

    model.load_weights(iter_checkpoint(model_dir, keep), parts)


def add_part(model: EngineModel, part: str) -> None:
    """Build ``part`` of a model made by :func:`build_model` and fill it from the same source
    (the same files, or the same random weights)."""
    if part in model.parts:
        return
    _, device, dtype, _ = model.source
    with torch.device(device), _default_dtype(dtype), _no_init():
        model.build_part(part)
    _load(model, (part,))
    model.eval()
