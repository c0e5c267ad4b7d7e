"""Request bodies as one nested dict, whether JSON or multipart form as the openai client writes it.

The openai client sends an edit as multipart/form-data: scalars as text, files as parts, and `extra_body`
values flattened with brackets: a list as `key[]` (repeated), a dict as `key[sub]`, a list of dicts as
`key[][sub]` (a new dict starts where a field repeats). `unflatten` undoes exactly that. Form values stay text
(the field rules in fields.py read "2" as 2, "true" as True); uploaded files stay UploadFile objects.
"""

from __future__ import annotations

import json
import re

from fastapi import Request
from starlette.datastructures import UploadFile

from .errors import APIError

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


def unflatten(items) -> dict:
    """[(key, value), ...] with bracket keys -> a nested dict (see the module note)."""
    out: dict = {}
    for key, value in items:
        match = _KEY.match(key)
        if not match:
            raise APIError(400, f"cannot read the form field name {key!r}", param=key)
        name, brackets = match[1], re.findall(r"\[([^\[\]]*)\]", match[2])
        if not brackets:
            out[name] = [*out[name], value] if isinstance(out.get(name), list) else (
                [out[name], value] if name in out else value)
        elif brackets == [""]:
            out.setdefault(name, [])
            _as_list(out, name, key).append(value)
        elif len(brackets) == 1:
            target = out.setdefault(name, {})
            if not isinstance(target, dict):
                raise APIError(400, f"form field {key!r} mixes a value and named parts", param=name)
            target[brackets[0]] = value
        elif len(brackets) == 2 and brackets[0] == "" and brackets[1]:
            out.setdefault(name, [])
            rows = _as_list(out, name, key)
            if not rows or not isinstance(rows[-1], dict) or brackets[1] in rows[-1]:
                rows.append({})
            rows[-1][brackets[1]] = value
        else:
            raise APIError(400, f"form field {key!r} is nested deeper than this API reads", param=name)
    return out


def _as_list(out: dict, name: str, key: str) -> list:
    if not isinstance(out.get(name), list):
        raise APIError(400, f"form field {key!r} mixes a list and a single value", param=name)
    return out[name]


async def read_body(request: Request, max_files: int, max_fields: int = 256) -> dict:
    """The body as a dict: JSON (an object) or multipart/url-encoded form (unflattened)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=max_files, max_fields=max_fields, max_part_size=2**20)
        except APIError:
            raise
        except Exception as error:  # python-multipart and Starlette's limits raise several kinds
            raise APIError(400, f"cannot read the form: {getattr(error, 'detail', error)}") from None
        return unflatten(form.multi_items())
    if content_type in ("application/json", ""):
        raw = await request.body()
        try:
            body = json.loads(raw or b"{}")
        except ValueError as error:
            raise APIError(400, f"the body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the body must be a JSON object, got {type(body).__name__}")
        return body
    raise APIError(415, f"send application/json or multipart/form-data, not {content_type!r}",
                   code="unsupported_media_type")


def is_upload(value) -> bool:
    return isinstance(value, UploadFile)
