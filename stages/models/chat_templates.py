"""Jinja chat templates that mimic the real families' templates.

Every template accepts ``message["content"]`` as a string or as a list of parts
``{"type": "text", "text": ...}``, ``{"type": "image"}`` or ``{"type": "image_url", ...}``.
Vision families render one image placeholder per image part, as the real
templates do; text-only families render only the text parts.
"""

from __future__ import annotations

# Text of a message whose content may be a string or a list of parts; image parts dropped.
# No whitespace control ({%- -%}): it would eat the literal newlines the formats need.
_TEXT_OF = (
    "{% macro text_of(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for part in content %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
)

# ChatML as in Qwen2.5 / Qwen3 (Qwen2.5 adds a default system prompt; Qwen3 does not).
_CHATML = (
    _TEXT_OF
    + "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and default_system %}"
    "<|im_start|>system\n{{ default_system }}<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ text_of(message['content']) }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-VL: the real template's image branch (one vision_start/image_pad/vision_end per image).
QWEN2_5_VL = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN2 = "{% set default_system = 'You are a helpful assistant.' %}" + _CHATML
QWEN3 = "{% set default_system = '' %}" + _CHATML

# Llama 3 instruct: the template writes bos itself (the tokenizer adds one too when asked to).
LLAMA = (
    _TEXT_OF
    + "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ text_of(message['content']) | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# llava-1.5-hf: "USER: <image>\n<text> ASSISTANT:"; images first, then text, as the real one.
LLAVA = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}{{ '<image>\n' }}{% endif %}"
    "{% endfor %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

TEMPLATES = {"qwen2": QWEN2, "qwen3": QWEN3, "qwen2_5_vl": QWEN2_5_VL, "llama": LLAMA, "llava": LLAVA}
