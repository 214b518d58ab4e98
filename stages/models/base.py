"""What the engine needs from a model.

A model runs one flat batch of new tokens (decodes and prefill chunks mixed)
over the paged KV cache and returns hidden states; the runner picks the rows
it samples from and asks for their logits. Multimodal models also expose
their input processor (placeholder expansion, image preprocessing) and an
``encode_images`` used by the encode stage.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from stages.attention.backend import AttentionMetadata


class EngineModel(nn.Module):
    """Base for every model family the engine serves.

    A model is made of named parts (``PARTS``): "language" (the decoder: embeddings, layers,
    head) and, for vision-language families, "vision" (the vision tower and its projector).
    A worker builds only the parts its role needs (``stages/engine/roles.py``); a part absent
    has no module, hence no parameter and no memory. ``build_part`` adds one later, under the
    caller's device and default dtype; ``drop_part`` frees one.
    """

    PARTS: tuple[str, ...] = ("language",)
    #: multimodal input processor class, or None for text-only families
    is_multimodal: bool = False
    #: positions are [3, T] (M-RoPE) instead of [T]
    uses_mrope: bool = False

    def part_of(self, name: str) -> str:
        """The part a parameter (or submodule) name belongs to."""
        return "language"

    @property
    def parts(self) -> frozenset[str]:
        """The parts built now."""
        return frozenset(self.PARTS)

    def build_part(self, part: str) -> None:
        raise ValueError(f"{type(self).__name__} cannot add part {part!r}")

    def drop_part(self, part: str) -> None:
        raise ValueError(f"{type(self).__name__} cannot drop part {part!r}")

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def checkpoint_name(self, key: str) -> str | None:
        """The parameter a checkpoint tensor fills, or None to drop it."""
        raise NotImplementedError

    def skip_param(self, name: str) -> bool:
        """Parameters or buffers no checkpoint fills (rotary tables, tied heads)."""
        return False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], parts=None) -> None:
        """Copy checkpoint tensors into the parts ``parts`` (default: all built); raises on a
        missing or unexpected name. Tensors of other parts must not be in ``weights``."""
        parts = self.parts if parts is None else frozenset(parts)
        copy_named_weights(self, weights, self.checkpoint_name,
                           skip=lambda n: self.skip_param(n) or self.part_of(n) not in parts)

    # KV cache geometry, read by the runner to allocate the cache.
    num_layers: int
    num_kv_heads: int
    head_dim: int


class VisionLanguageModel(EngineModel):
    """A vision tower + projector in front of ``self.language_model`` (a DecoderLM).

    Subclasses build the vision side in ``_build_vision`` (its modules named in
    ``VISION_MODULES``) and the decoder in ``_build_language``; the text path and the KV
    geometry are the decoder's. The geometry comes from the config, so a model without its
    language part (an encode worker) still knows it.
    """

    PARTS = ("vision", "language")
    VISION_MODULES: tuple[str, ...] = ()
    is_multimodal = True
    language_model: EngineModel

    def __init__(self, hf_config, backend, parts=PARTS):
        super().__init__()
        self.hf_config, self.backend = hf_config, backend
        for part in self.PARTS:
            if part in parts:
                self.build_part(part)

    def _set_geometry(self, spec) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = spec.layers, spec.kv_heads, spec.head_dim

    def part_of(self, name):
        return "language" if name.split(".", 1)[0] == "language_model" else "vision"

    @property
    def parts(self):
        names = set(self._modules)
        return frozenset(p for p, mods in (("vision", self.VISION_MODULES), ("language", ("language_model",)))
                         if all(m in names for m in mods))

    def build_part(self, part):
        if part in self.parts:
            return
        if part == "vision":
            self._build_vision()
        elif part == "language":
            self._build_language()
        else:
            raise ValueError(f"unknown part {part!r}")

    def drop_part(self, part):
        for name in self.VISION_MODULES if part == "vision" else ("language_model",):
            if name in self._modules:
                delattr(self, name)

    def _build_vision(self) -> None:
        raise NotImplementedError

    def _build_language(self) -> None:
        raise NotImplementedError

    def _need(self, part: str) -> None:
        if part not in self.parts:
            raise RuntimeError(f"this worker holds no {part} weights (its role does not need them)")

    def embed_tokens(self, input_ids):
        self._need("language")
        return self.language_model.embed_tokens(input_ids)

    def forward(self, positions, meta, kv_caches, input_ids=None, inputs_embeds=None):
        self._need("language")
        return self.language_model(positions, meta, kv_caches, input_ids, inputs_embeds)

    def compute_logits(self, hidden):
        return self.language_model.compute_logits(hidden)

    def encode_images(self, inputs: list[dict]) -> list[torch.Tensor]:
        """One embedding [num_tokens, hidden] per image's preprocessed inputs."""
        raise NotImplementedError


def copy_named_weights(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       rename, skip=lambda name: False) -> None:
    """Load ``weights`` into ``module``'s parameters after ``rename(name)``.

    ``rename`` returns the parameter name or None to drop the tensor. Every
    parameter must be filled exactly once: a partial load would silently
    serve random weights.
    """
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    loaded: set[str] = set()
    for name, tensor in weights:
        target = rename(name)
        if target is None or skip(target):
            continue
        dest = params.get(target)
        if dest is None:
            dest = buffers.get(target)
        if dest is None:
            raise ValueError(f"checkpoint tensor {name!r} (as {target!r}) has no place in the model")
        if tuple(dest.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(dest.shape)}")
        with torch.no_grad():
            dest.copy_(tensor.to(dest.dtype))
        loaded.add(target)
    missing = [n for n in params if n not in loaded and not skip(n)]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")


class ImageSupport:
    """A VLM family's image handling outside the network.

    ``placeholder_id`` is the token that stands for one image in a prompt;
    ``preprocess`` turns one RGB image into the encoder's inputs and says how
    many placeholder tokens the image expands to.
    """

    placeholder_id: int

    def preprocess(self, image) -> tuple[dict, int]:
        raise NotImplementedError

    def mrope_positions(self, token_ids: list[int], images: list) -> tuple[torch.Tensor, int] | None:
        """M-RoPE positions [3, T] and the delta for later tokens; None for plain RoPE."""
        return None


def load_image_processor(model_dir):
    """The directory's image processor, PIL flavour (the fast one needs torchvision)."""
    import transformers
    from transformers import AutoImageProcessor

    kwargs: dict = {"local_files_only": True}
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["backend"] = "pil"
    else:
        kwargs["use_fast"] = False
    return AutoImageProcessor.from_pretrained(model_dir, **kwargs)
