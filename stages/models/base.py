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
    """Base for every model family the engine serves."""

    #: multimodal input processor class, or None for text-only families
    is_multimodal: bool = False
    #: positions are [3, T] (M-RoPE) instead of [T]
    uses_mrope: bool = False

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

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors in; raises on a missing or unexpected name."""
        raise NotImplementedError

    # KV cache geometry, read by the runner to allocate the cache.
    num_layers: int
    num_kv_heads: int
    head_dim: int


class VisionLanguageModel(EngineModel):
    """A vision tower + projector in front of ``self.language_model`` (a DecoderLM).

    Subclasses build the vision side and set ``language_model``; the text path
    and the KV geometry are the decoder's.
    """

    is_multimodal = True
    language_model: EngineModel

    def _adopt_geometry(self) -> None:
        lm = self.language_model
        self.num_layers, self.num_kv_heads, self.head_dim = lm.num_layers, lm.num_kv_heads, lm.head_dim

    def embed_tokens(self, input_ids):
        return self.language_model.embed_tokens(input_ids)

    def forward(self, positions, meta, kv_caches, input_ids=None, inputs_embeds=None):
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
