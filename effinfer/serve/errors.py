"""OpenAI-style error responses: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

``APIError`` is raised anywhere in a handler and rendered by the app's exception handler; the
same body replaces FastAPI's 422 (as a 400), Starlette's 404/405 and unexpected 500s.
"""

from __future__ import annotations

import json
import re

import pydantic
from starlette.responses import Response

from effinfer.sampling_params import InvalidSamplingParams


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> Response:
        return error_response(self.status, self.message, self.param, self.code, self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    # As OpenAI: every client error is an invalid_request_error, told apart by status and code.
    error_type = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    # ASCII-escaped: a message may quote a client's string, which can hold lone surrogates.
    content = json.dumps(error_body(status, message, param, code))
    return Response(content, status_code=status, headers=headers, media_type="application/json")


def from_validation_error(error: pydantic.ValidationError) -> APIError:
    """A 400 for the first problem pydantic found, naming the field as a dotted path."""
    first = error.errors(include_url=False)[0]
    # Union members appear in the location as type names ("str", "list[int]"); they are not fields.
    loc = [str(part) for part in first["loc"] if isinstance(part, int) or not _is_type_tag(part)]
    path = ".".join(loc)
    union_field = next((str(p) for p in reversed(first["loc"]) if str(p) in _UNION_FORMS), None)
    if union_field and len(loc) < len(first["loc"]):
        shown = repr(first.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        path = ".".join(loc[: loc.index(union_field) + 1])
        message = f"{path}: must be {_UNION_FORMS[union_field]} (got {shown})"
    elif first["type"] == "extra_forbidden":
        message = f"unknown field {path!r}: this server does not accept it"
    elif first["type"] == "missing":
        message = f"{path!r} is required"
    else:
        shown = repr(first.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        message = f"{path}: {first['msg']} (got {shown})" if path else first["msg"]
    return APIError(400, message, param=path or None, code="invalid_value")


# Fields that take one of several shapes, described as a whole rather than by the first shape tried.
_UNION_FORMS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
}


def _is_type_tag(part: str) -> bool:
    return bool(re.fullmatch(r"[a-z]+\[.*\]|str|int|float|bool|list|dict|none|function-\w+.*", part)) or (
        part[:1].isupper() and "." not in part
    )


def from_sampling_error(error: InvalidSamplingParams) -> APIError:
    match = re.match(r"invalid sampling parameter (\w+)=", str(error))
    return APIError(400, str(error), param=match.group(1) if match else None, code="invalid_value")
