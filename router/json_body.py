"""Request bytes -> a JSON object the server can hold, or a 400 saying why not.

JSON can say things Python's parser turns into failures deeper down: nesting that overflows
the recursion limit, and `\\ud800`-style escapes without their pair, which decode to lone
surrogates that no UTF-8 encoder (msgpack, the tokenizer, our own responses) accepts.
Both are the client's fault, so both are refused here with a precise message.
"""

from __future__ import annotations

import json
from typing import Any

from router.backend import ApiError

# Real requests nest about 6 levels; the parser (and anything recursive after it) would fail
# near Python's recursion limit of 1000.
MAX_JSON_DEPTH = 100


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object (not yet checked by `check_json_tree`)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"invalid JSON: {e}") from None
    except RecursionError:  # the parser recurses once per nesting level
        raise _too_deep(None) from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def check_json_tree(body: dict) -> None:
    """Refuse nesting deeper than `MAX_JSON_DEPTH` and strings (values or keys) that are not
    Unicode text. Iterative, so any depth is safe to look at; `param` names the field."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep(path)
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(key, str) and not _is_text(key):
                raise ApiError(400, f"a key in {path or 'the request body'} is not valid Unicode "
                                    f"(a lone surrogate)", param=path or None)
            if isinstance(value, str):
                if not _is_text(value):
                    where = _join(path, key)
                    raise ApiError(400, f"{where} is not valid Unicode: it holds a lone surrogate "
                                        f"(an unpaired \\ud800-\\udfff escape)", param=where)
            elif isinstance(value, (dict, list)):
                stack.append((value, _join(path, key), depth + 1))


def _too_deep(path: str | None) -> ApiError:
    top = path.split(".", 1)[0].split("[", 1)[0] if path else None
    return ApiError(400, f"the JSON body is nested too deeply (more than {MAX_JSON_DEPTH} levels)",
                    param=top or None)


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _is_text(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
