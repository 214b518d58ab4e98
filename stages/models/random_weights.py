"""Checkpoint key layout and deterministic random weights for the synthetic models.

Key layout (what the safetensors files hold; our engine's loader reads these names):

- llama / qwen2 / qwen3: the ordinary causal-LM layout, ``model.embed_tokens.weight``,
  ``model.layers.{i}.self_attn.{q,k,v,o}_proj.*`` (qwen2: q/k/v biases; qwen3:
  ``self_attn.{q,k}_norm.weight``), ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``,
  ``model.layers.{i}.{input,post_attention}_layernorm.weight``, ``model.norm.weight``,
  ``lm_head.weight`` (absent when ``tie_word_embeddings`` is true: qwen2, qwen3).
- llava (the llava-1.5-hf hub layout, which vLLM's loader expects):
  ``language_model.model.*`` (Llama decoder), ``language_model.lm_head.weight``,
  ``multi_modal_projector.linear_{1,2}.{weight,bias}``,
  ``vision_tower.vision_model.{embeddings,pre_layrnorm,encoder.layers.{i},post_layernorm}.*``.
- qwen2_5_vl (the Qwen2.5-VL hub layout): ``model.*`` (Qwen2 decoder, q/k/v biases),
  ``visual.patch_embed.proj.weight``, ``visual.blocks.{i}.{norm1,norm2,attn.qkv,attn.proj,
  mlp.{gate,up,down}_proj}.*``, ``visual.merger.{ln_q,mlp.0,mlp.2}.*``; ``lm_head.weight``
  absent because tiny and small are tied.

Transformers 5 builds these models as ``model.language_model.*`` / ``model.vision_tower.*``
/ ``model.visual.*`` and renames the hub keys above on load (its ``conversion_mapping``).

Initialisation. Transformers' own init (std 0.02) makes a random model emit the same
token for every prompt, which would make equality tests with our engine vacuous. Here
every matrix is N(0, 1/fan_in) so activations keep unit scale through the layers (the
decoder's attention output projection at gain 0.5 and MLP down projection at gain 2, see
``_residual_gain``), token embeddings are N(0, 1) so the input matters, norm weights are
1 + N(0, 0.1), biases N(0, 0.05), and the head is N(0, 10^2/hidden) so logits have std
~10 (tied models: embeddings N(0, 0.03^2) and a final norm weight ~10/(0.03*sqrt(hidden))
instead). Measured on tiny models: 16 greedy tokens hold ~14 distinct ids on average and
top-1/top-2 logit gaps below 0.1 occur at ~3% of steps (median gap ~2). Rows of the
embedding and head past the tokenizer's size (the vocab padding) are zero, so those ids
score 0 and are never the argmax in practice.

Each tensor draws from its own generator, seeded from (seed, family, key), so a tensor's value
does not depend on which other tensors exist or on their order.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch

LOGIT_STD = 10.0
NORM_JITTER = 0.1
BIAS_STD = 0.05
TIED_EMBED_STD = 0.03
ATTN_OUT_GAIN = 0.5
MLP_OUT_GAIN = 2.0
_DECODER_OUT_PROJ = re.compile(r"\blayers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.weight$")

# (pattern on the transformers 5 key, replacement) -> hub key, tried in order; first match wins.
_HUB_RENAMES = {
    "llava": [
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^model\.vision_tower\.", "vision_tower.vision_model."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    ],
    "qwen2_5_vl": [
        (r"^model\.language_model\.", "model."),
        (r"^model\.visual\.", "visual."),
        (r"^lm_head\.", "lm_head."),
    ],
}


def hub_key(family: str, hf_key: str) -> str:
    """The checkpoint name of a transformers 5 state-dict key (see module docstring)."""
    rules = _HUB_RENAMES.get(family)
    if rules is None:
        return hf_key
    for pattern, repl in rules:
        if re.match(pattern, hf_key):
            return re.sub(pattern, repl, hf_key, count=1)
    raise KeyError(f"{family}: no hub name for {hf_key!r}")


def tensor_seed(seed: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _residual_gain(key: str) -> float:
    """Output-projection gains of the decoder's residual branches.

    The attention value path is linear in the token embeddings, so with tied embeddings it
    adds a random-signed "copy the context" bias to the logits that makes greedy decoding
    loop; a weaker attention branch and a stronger (non-linear) MLP branch keep outputs
    diverse (measured: mean distinct tokens in 16 greedy steps ~10 -> ~14 for tied tiny).
    """
    m = _DECODER_OUT_PROJ.search(key)
    if m is None:
        return 1.0
    return ATTN_OUT_GAIN if m.group(1) == "self_attn.o_proj" else MLP_OUT_GAIN


def _is_token_table(key: str) -> bool:
    return key.endswith("embed_tokens.weight") or key.endswith("lm_head.weight")


def init_tensor(key: str, shape: tuple[int, ...], seed: int, tokenizer_size: int) -> torch.Tensor:
    """A float32 tensor for checkpoint key ``key``, which may carry a "family:" prefix
    (it seeds the generator, so families differ); rules in the module docstring."""
    g = torch.Generator().manual_seed(tensor_seed(seed, key))
    t = torch.empty(shape, dtype=torch.float32)
    if key.endswith(".bias"):
        return t.normal_(0.0, BIAS_STD, generator=g)
    if len(shape) == 1 and key.endswith(".weight"):  # RMSNorm / LayerNorm scale
        return t.normal_(1.0, NORM_JITTER, generator=g)
    if key.endswith("lm_head.weight"):
        t.normal_(0.0, LOGIT_STD / math.sqrt(shape[1]), generator=g)
    elif key.endswith("embed_tokens.weight"):
        t.normal_(0.0, 1.0, generator=g)
    elif len(shape) == 1 or key.endswith("position_embedding.weight"):
        t.normal_(0.0, 1.0, generator=g)  # CLIP class / position embeddings
    else:  # Linear [out, in] and patch convolutions [out, c, (t,) h, w]
        fan_in = math.prod(shape[1:])
        t.normal_(0.0, _residual_gain(key) / math.sqrt(fan_in), generator=g)
    if _is_token_table(key):
        t[tokenizer_size:] = 0.0
    return t


def _final_norm_gain(hidden: int) -> float:
    """Final-norm weight for tied models: with embeddings of std TIED_EMBED_STD it gives
    logits of std ~LOGIT_STD, like trained tied models (small embeddings, large final norm)."""
    return LOGIT_STD / (TIED_EMBED_STD * math.sqrt(hidden))


def random_state_dict(family: str, shapes: dict[str, tuple[int, ...]], seed: int, tokenizer_size: int,
                      tied: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Hub-named tensors for every transformers key in ``shapes`` (in that order).

    With ``tied`` the head is left out (it shares the embedding), the embedding is small
    and the final norm large: a big tied embedding would make every position predict its
    own input token, since e(x).e(x) dominates e(x).e(y).
    """
    out: dict[str, torch.Tensor] = {}
    for hf_key, shape in shapes.items():
        if tied and hf_key == "lm_head.weight":
            continue
        key = hub_key(family, hf_key)
        t = init_tensor(f"{family}:{key}", shape, seed, tokenizer_size)
        if tied and key.endswith("embed_tokens.weight"):
            t *= TIED_EMBED_STD
        elif tied and key == "model.norm.weight":
            t *= _final_norm_gain(shape[0])
        out[key] = t.to(dtype).contiguous()
    return out
