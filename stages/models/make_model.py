"""epd-make-model: write a deterministic Hugging Face model directory with random weights.

    epd-make-model --family {llava,qwen2_5_vl,qwen2,qwen3,llama} --size {tiny,small,7b} \\
        --seed N --out DIR [--shard-size-mb M] [--dtype float32|bfloat16] [--config-only]

The directory loads unchanged with transformers' Auto classes (and is meant to be
served by vLLM): config.json, generation_config.json, model.safetensors (or
model-0000i-of-0000n.safetensors + model.safetensors.index.json), tokenizer.json,
tokenizer_config.json, special_tokens_map.json, chat_template.jinja and, for the
vision families, preprocessor_config.json (+ processor_config.json for llava), and
epd_make_model.json (the arguments and format revision, for ``--reuse``).
Nothing is downloaded: the tokenizer is trained here (``tokenizer_builder``).
The same arguments give byte-identical files.

Sizes (parameters, counted on the saved tensors):

=========== ======= ==================
family      tiny    small
=========== ======= ==================
llama       0.21 M  100.7 M
qwen2       0.14 M  88.1 M (tied head)
qwen3       0.14 M  88.1 M (tied head)
llava       0.25 M  112.5 M (vision 10.6 M)
qwen2_5_vl  0.22 M  102.8 M (tied head)
=========== ======= ==================

tiny text: hidden 64, 2 layers, 2 heads / 1 kv head, head_dim 32, MLP 128, vocab
1024 (tokenizer 1000). small text: hidden 768, 12 layers, 12 / 4 heads, head_dim 64,
MLP 2048, vocab 16384 (tokenizer 16000). Vision towers: see ``model_configs``.

``7b`` (qwen2_5_vl only) is Qwen2.5-VL-7B-Instruct's shape: hidden 3584, 28 layers,
28 / 4 heads, head_dim 128, MLP 18944, vocab 152064 (tokenizer 151665), untied head,
vision tower of 32 blocks (hidden 1280, window attention), 8.29 B parameters. Its
weights are not written (16.6 GB in bf16): ``--config-only`` writes every file but
the safetensors, and the engine serves it with ``load_format="dummy"``.

Checkpoint key layout (the hub's, details and initialisation in ``random_weights``):
llama/qwen2/qwen3 ``model.*`` + ``lm_head.weight`` (llama only; qwen ties it);
llava ``language_model.model.*``, ``language_model.lm_head.weight``,
``multi_modal_projector.*``, ``vision_tower.vision_model.*``;
qwen2_5_vl ``model.*``, ``visual.*`` (tied, no ``lm_head.weight``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from stages.models import model_configs as mc
from stages.models.random_weights import random_state_dict
from stages.models.tokenizer_builder import write_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VISION_FAMILIES = ("llava", "qwen2_5_vl")
_SAFETENSORS_META = {"format": "pt"}
OUTPUT_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json",
                "preprocessor_config.json", "processor_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# Bump when the generated models change (shapes, init, tokenizer): cached directories rebuild.
FORMAT_REV = 3
STAMP = "epd_make_model.json"
CONFIG_ONLY_SIZES = ("7b",)  # too big to write random weights for: served with load_format="dummy"


def make_model(family: str, size: str, out_dir: str | Path, seed: int = 0,
               shard_size_mb: float | None = None, dtype: str = "float32", reuse: bool = False,
               config_only: bool = False) -> Path:
    """Write the model directory ``out_dir`` (created; emptied of old model files) and return it.

    ``shard_size_mb`` splits the weights into shards of at most that many MiB (a tensor
    larger than the limit gets a shard of its own), as ``save_pretrained`` does.
    ``reuse`` keeps a directory this same version built with the same arguments.
    ``config_only`` writes everything but the weights (for ``load_format="dummy"``).
    """
    if family not in mc.FAMILIES or size not in mc.SIZES or dtype not in DTYPES:
        raise ValueError(f"unknown family/size/dtype: {family!r} {size!r} {dtype!r}")
    mc.check_size(family, size)
    if size in CONFIG_ONLY_SIZES and not config_only:
        raise ValueError(f"size {size!r} is written without weights: pass config_only and serve it "
                         "with load_format='dummy'")
    out = Path(out_dir)
    stamp = {"rev": FORMAT_REV, "family": family, "size": size, "seed": seed, "shard_size_mb": shard_size_mb,
             "dtype": dtype}
    if config_only:
        stamp["config_only"] = True
    if reuse and (out / STAMP).is_file() and json.loads((out / STAMP).read_text()) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    # A previous run (other sharding, other family) must not leave stale files behind.
    for old in [*out.glob("model*.safetensors"), *(out / name for name in OUTPUT_FILES)]:
        old.unlink(missing_ok=True)

    text = mc.TEXT[size]
    ids = write_tokenizer(out, family, mc.TOKENIZER_CORPUS[size], text.tokenizer_tokens, text.max_positions)
    if ids["tokenizer_size"] > text.vocab_size:
        raise AssertionError(f"tokenizer has {ids['tokenizer_size']} tokens > vocab {text.vocab_size}")
    config = mc.model_config(family, size, dtype, ids)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation_config(family, ids))
    for name, cfg in (("preprocessor_config.json", mc.preprocessor_config(family, size)),
                      ("processor_config.json", mc.processor_config(family, size))):
        if cfg is not None:
            _write_json(out / name, cfg)

    if not config_only:
        shapes = transformers_shapes(out, family)
        tensors = random_state_dict(family, shapes, seed, ids["tokenizer_size"],
                                    tied=mc.tie_embeddings(family, size), dtype=DTYPES[dtype])
        write_safetensors(out, tensors, shard_size_mb)
    _write_json(out / STAMP, stamp)
    return out


def generation_config(family: str, ids: dict) -> dict:
    """generation_config.json: greedy by default; every end-of-turn/end-of-text id stops."""
    if family == "llama":
        eos = [ids["end_of_text"], ids["eos"]]
    elif family == "llava":
        eos = [ids["eos"]]
    else:
        eos = [ids["eos"], ids["endoftext"]]
    cfg = {"eos_token_id": eos}
    if mc.config_bos(ids) is not None:
        cfg["bos_token_id"] = mc.config_bos(ids)
    if ids["pad"] is not None:
        cfg["pad_token_id"] = ids["pad"]
    return cfg


def transformers_shapes(model_dir: Path, family: str) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of the transformers model built from ``model_dir/config.json``.

    The model is built on the meta device: no memory, no transformers init; only the
    names and shapes are used, so the checkpoint matches what transformers expects.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir)
    auto = AutoModelForImageTextToText if family in VISION_FAMILIES else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_safetensors(out: Path, tensors: dict[str, torch.Tensor], shard_size_mb: float | None) -> None:
    """One model.safetensors, or shards plus the standard model.safetensors.index.json."""
    if shard_size_mb is None:
        _save(tensors, out / "model.safetensors")
        return
    limit = int(shard_size_mb * 1024 * 1024)
    shards: list[dict[str, torch.Tensor]] = [{}]
    filled = 0
    for key, t in tensors.items():  # model order, like save_pretrained: layer 0 before layer 1
        nbytes = t.numel() * t.element_size()
        if shards[-1] and filled + nbytes > limit:
            shards.append({})
            filled = 0
        shards[-1][key] = t
        filled += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        _save(shard, out / name)
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata=_SAFETENSORS_META)
    path.chmod(0o644)  # safetensors creates 0600 files; a server running as another user must read them


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="epd-make-model", description=__doc__.splitlines()[0])
    p.add_argument("--family", required=True, choices=mc.FAMILIES)
    p.add_argument("--size", required=True, choices=mc.SIZES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--shard-size-mb", type=float, default=None)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--reuse", action="store_true", help="keep DIR if this version built it with these arguments")
    p.add_argument("--config-only", action="store_true",
                   help="write no weights (serve with load_format dummy); required for --size 7b")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = make_model(args.family, args.size, args.out, seed=args.seed,
                     shard_size_mb=args.shard_size_mb, dtype=args.dtype, reuse=args.reuse,
                     config_only=args.config_only)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
