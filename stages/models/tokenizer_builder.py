"""Build a family-flavoured byte-level BPE tokenizer locally and deterministically.

The BPE is trained with the ``tokenizers`` library on a corpus embedded below, with
the real family's pre-tokenizer (a regex Split, then ByteLevel without regex), a
ByteLevel decoder and no UNK, so every UTF-8 string round-trips. The Qwen families
also carry Qwen2's NFC normalizer (text round-trips up to NFC) and its regex (one
digit per pre-token): transformers 5 loads any ``model_type: qwen2`` tokenizer as
``Qwen2Tokenizer``, which rebuilds exactly that pipeline whatever tokenizer.json says,
so tokenizer.json must already match it for every loader to agree.
Training is deterministic (checked across processes with different hash seeds).

Layout of ids, by family (``n`` = number of trained BPE tokens):

- qwen2 / qwen3: ``<|endoftext|>`` n, ``<|im_start|>`` n+1, ``<|im_end|>`` n+2;
  qwen2_5_vl adds ``<|vision_start|>`` n+3, ``<|vision_end|>`` n+4, ``<|image_pad|>`` n+5,
  ``<|vision_pad|>`` n+6, ``<|video_pad|>`` n+7.
  No bos is added when encoding (as in Qwen). eos = ``<|im_end|>``, pad = ``<|endoftext|>``.
- llama: ``<|begin_of_text|>`` n, ``<|end_of_text|>`` n+1, ``<|start_header_id|>`` n+2,
  ``<|end_header_id|>`` n+3, ``<|eot_id|>`` n+4; the post-processor prepends bos.
  eos = ``<|eot_id|>`` (generation also stops on ``<|end_of_text|>``).
- llava (Llama-2/vicuna style): ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 come first; then the
  BPE; then ``<image>`` and ``<pad>``. The post-processor prepends ``<s>``. eos = ``</s>``.

``tokenizer_class`` is ``PreTrainedTokenizerFast`` for every family: transformers 5
maps it to its generic ``TokenizersBackend``, which uses tokenizer.json unchanged
(``LlamaTokenizer`` would force a Metaspace pre-tokenizer on it), except for
``model_type: qwen2`` (see above).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

from stages.models.chat_templates import TEMPLATES

# Pre-tokenizer regexes of Llama 3 and Qwen2 (they differ only in how digits group).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
QWEN_FAMILIES = ("qwen2", "qwen3", "qwen2_5_vl")

CORPUS = """\
The quick brown fox jumps over the lazy dog while the farmer counts his sheep twice.
A small boat drifted across the harbour at dawn; gulls circled above the fishing nets,
and an old sailor mended ropes on the pier, humming a song about distant islands.

Photosynthesis converts light, water and carbon dioxide into sugar and oxygen. Plants
store the energy in starch, which animals later burn to move, grow and keep warm.
The mitochondria in every cell release that energy in small, controlled steps.

To bake bread, mix 500 grams of flour with 320 ml of water, 10 g of salt and 7 g of
yeast. Knead for ten minutes, let the dough rise for an hour, shape it, and bake at
230 degrees for about 35 minutes until the crust sounds hollow when tapped.

In 1969, two astronauts walked on the Moon while a third orbited above. Their computer
had 4 KB of memory, yet it guided the landing. Engineers still study how the team
handled alarms 1201 and 1202 during the final descent.

"Where are you going?" she asked. "To the library," he replied, "because the exam is
on Monday, and I haven't read chapters 7, 8 or 9!" They laughed, then walked together
through the rain, past the museum, the bakery and the train station.

def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a  # fibonacci(10) == 55

Prices rose by 3.5% in March, compared with 2.8% in February; the central bank kept its
rate at 4.25% and said inflation should return to 2% by 2026. Markets were calm.

Mountains, rivers, forests and deserts shape the climate of each continent. Cold air
sinks, warm air rises, and the resulting winds carry rain from the oceans inland.
Music, painting, theatre and poetry describe the same world in different languages.

Questions? Answers! Lists: apples, pears, plums; numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100
1000 65536; symbols: + - * / = < > ( ) [ ] { } @ # $ % ^ & _ | ~ ` ' " : ; , . ! ?
Café, naïve, façade, jalapeño, Zürich, São Paulo, Kraków, Ελλάδα, Москва, 東京, 北京.
"""

# Syllables for the pseudo-words that give the small vocabulary enough distinct merges.
_SYLLABLES = (
    "ka to ri men sol var ex qu dra li po nu ber sta gi fon el an ish ore ly tion pre un zo "
    "wy cha th ack ing ver mo ple sk ou ai bri col den fer gan hel jor kin lum nor pal rus tem"
).split()


PSEUDO_WORDS = {"tiny": 150, "small": 12000, "large": 140000}  # large: 151,665 tokens (Qwen2.5's count)


def corpus(size: str) -> list[str]:
    """The training corpus: English repeated (so its merges come first), then pseudo-words
    whose only job is to give the BPE enough distinct merges to reach the target size."""
    lines = CORPUS.splitlines() * 4
    rng = random.Random(20240229)
    words: set[str] = set()
    while len(words) < PSEUDO_WORDS[size]:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))))
    ordered = sorted(words)
    lines += [" ".join(ordered[i:i + 16]) for i in range(0, len(ordered), 16)]
    return lines


def family_specials(family: str) -> tuple[list[str], list[str]]:
    """(specials placed before the BPE vocabulary, specials appended after it)."""
    if family in ("qwen2", "qwen3"):
        return [], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if family == "qwen2_5_vl":
        # vLLM's Qwen2.5-VL processor also looks up the video tokens, even for image-only use.
        return [], ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|vision_pad|>", "<|video_pad|>"]
    if family == "llama":
        return [], ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eot_id|>"]
    if family == "llava":
        return ["<unk>", "<s>", "</s>"], ["<image>", "<pad>"]
    raise ValueError(f"unknown family {family!r}")


def role_tokens(family: str) -> dict[str, str | None]:
    """Names of the bos / eos / pad / unk tokens, plus the image placeholder if any."""
    if family in QWEN_FAMILIES:
        roles = {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "unk": None}
        roles["image"] = "<|image_pad|>" if family == "qwen2_5_vl" else None
        return roles
    if family == "llama":
        return {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": None, "unk": None, "image": None}
    return {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>", "image": "<image>"}


def build_tokenizer(family: str, size: str, total_tokens: int) -> Tokenizer:
    """Train the BPE and attach the family's special tokens; ``total_tokens`` includes specials."""
    leading, trailing = family_specials(family)
    qwen = family in QWEN_FAMILIES
    tok = Tokenizer(models.BPE())
    if qwen:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN if qwen else LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=total_tokens - len(trailing),
        min_frequency=1,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in leading],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(size), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in trailing])

    byte_level = processors.ByteLevel(trim_offsets=False)
    bos = role_tokens(family)["bos"]
    if bos is None:
        tok.post_processor = byte_level
    else:
        bos_id = tok.token_to_id(bos)
        template = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    return tok


def token_ids(tok: Tokenizer, family: str) -> dict[str, int | None]:
    """Ids of the role tokens plus every special token by name (for config files)."""
    ids = {role: (tok.token_to_id(name) if name else None) for role, name in role_tokens(family).items()}
    if family == "qwen2_5_vl":
        ids["vision_start"] = tok.token_to_id("<|vision_start|>")
        ids["vision_end"] = tok.token_to_id("<|vision_end|>")
        ids["video"] = tok.token_to_id("<|video_pad|>")
    if family == "llama":
        ids["end_of_text"] = tok.token_to_id("<|end_of_text|>")
    if family in QWEN_FAMILIES:
        ids["endoftext"] = tok.token_to_id("<|endoftext|>")
    return ids


def tokenizer_config(family: str, model_max_length: int) -> dict:
    """tokenizer_config.json; the chat template is also written to chat_template.jinja."""
    roles = role_tokens(family)
    cfg = {
        "bos_token": roles["bos"],
        "chat_template": TEMPLATES[family],
        "clean_up_tokenization_spaces": False,
        "eos_token": roles["eos"],
        "model_max_length": model_max_length,
        "pad_token": roles["pad"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if roles["unk"]:
        cfg["unk_token"] = roles["unk"]
    if family == "llava":
        cfg["padding_side"] = "left"
    return cfg


def special_tokens_map(family: str) -> dict:
    roles = role_tokens(family)
    return {f"{r}_token": roles[r] for r in ("bos", "eos", "pad", "unk") if roles[r]}


def write_tokenizer(out_dir: Path, family: str, size: str, total_tokens: int,
                    model_max_length: int) -> dict[str, int | None]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    chat_template.jinja to ``out_dir``; return the special token ids."""
    tok = build_tokenizer(family, size, total_tokens)
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(family, model_max_length))
    _write_json(out_dir / "special_tokens_map.json", special_tokens_map(family))
    # Transformers 5 reads chat_template.jinja first (tokenizer and processor alike);
    # older readers and vLLM's fallbacks look in tokenizer_config.json. Both hold the same text.
    (out_dir / "chat_template.jinja").write_text(TEMPLATES[family], encoding="utf-8")
    ids = token_ids(tok, family)
    ids["tokenizer_size"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
