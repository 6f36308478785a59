"""Error bodies of the service: every refused request gets a 4xx/503 JSON body
``{"error", "field", "expected"}``.

:class:`~serving.validation.RequestError` carries one; :func:`error_response` turns it into an
HTTP response (with ``Retry-After`` on a 503); :func:`reshape_validation_error` turns BentoML's
pydantic error body into the same form.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from serving.validation import RequestError

RETRY_AFTER_S = 1

# pydantic names the member of a union (an episode array is nested lists or a PackedArray) in an
# error's location; these are not request fields.
_UNION_TAGS = {
    "list[float]",
    "list[list[float]]",
    "list[int]",
    "list[list[int]]",
    "list[union[float,int]]",
    "PackedArray",
}


def _format_loc(loc: Any) -> str:
    """pydantic ``("episodes", 2, "actions", 0)`` -> ``"episodes[2].actions[0]"``."""
    out = ""
    for part in loc or ():
        if part in _UNION_TAGS:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _relevant(detail: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drops a union member's complaint that the value has the other member's form (a list sent
    where a PackedArray object would go, or an object where lists would), keeping the problems
    within the form the client chose."""
    kept = [
        d
        for d in detail
        if not (
            set(d.get("loc") or ()) & _UNION_TAGS
            and d.get("type") in ("model_type", "list_type", "model_attributes_type")
        )
    ]
    return kept or detail


_EXPECTED = {
    "missing": "a value: this field is required",
    "extra_forbidden": "only the documented fields (see /docs.json)",
    "json_invalid": "a JSON object",
    "model_type": "a JSON object",
    "model_attributes_type": "a JSON object",
    "string_too_short": "a non-empty string",
}


def reshape_validation_error(body: dict[str, Any]) -> dict[str, Any]:
    """BentoML's pydantic error body ``{"error", "detail": [{"type", "loc", "msg"}, ...]}`` in
    this service's form ``{"error", "field", "expected", "detail"}`` (first problem first)."""
    detail = _relevant(body.get("detail") or [{}])
    first = detail[0]
    field = _format_loc(first.get("loc"))
    msg = first.get("msg", "invalid value")
    more = f" (and {len(detail) - 1} more problem(s), see detail)" if len(detail) > 1 else ""
    return {
        "error": f"{field}: {msg}{more}",
        "field": field,
        "expected": _EXPECTED.get(first.get("type"), msg.removeprefix("Input should be ")),
        "detail": detail,
    }


def error_response(error: RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON response of a refused request (``Retry-After`` on a 503)."""
    headers = dict(headers or {})
    if error.status == 503:
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    return JSONResponse(error.to_json(), status_code=error.status, headers=headers or None)
