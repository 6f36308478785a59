"""The service's front door: an ASGI middleware in front of BentoML's routes.

For every request it
- checks the bearer token (``METARL_API_TOKEN``) on the API routes and ``/metrics``: 401 with
  ``WWW-Authenticate: Bearer`` and a JSON reason otherwise (``/livez``, ``/readyz``, ``/healthz``
  and the OpenAPI document stay open);
- reads an API request's body itself, counting the bytes that actually arrive (with or without
  ``Content-Length``, chunked or not) and stopping at ``METARL_MAX_BODY_BYTES`` with a 413, so an
  oversized body is never held in memory; a body that stops arriving for
  ``METARL_READ_TIMEOUT_S`` gets a 408;
- bounds the ``/adapt`` requests queued or running in this worker (``METARL_MAX_PENDING``):
  one more gets a 503 with ``Retry-After`` instead of waiting in an unbounded queue;
- parses every API body as JSON whatever its ``Content-Type`` says (``curl -d`` sends
  form-urlencoded), and reshapes BentoML's pydantic 400 bodies into ``{"error", "field",
  "expected"}`` (:mod:`serving.errors`);
- corrects the OpenAPI document (:func:`serving.schemas.patch_openapi`: nullable fields, the
  error statuses, the bearer scheme when a token is configured).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable
from typing import Any

from serving.errors import error_response, reshape_validation_error
from serving.validation import RequestError

OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/docs.json", "/docs", "/")
PROTECTED_EXTRA = ("/metrics",)


class _BodyTooLarge(Exception):
    pass


class _BodyStalled(Exception):
    pass


class _ClientGone(Exception):
    pass


class RequestGuard:
    """ASGI middleware (see the module docstring).

    Args:
        app: the wrapped ASGI app.
        api_paths: the service's API routes (their bodies are read and checked here).
        max_body_bytes: most bytes of a request body.
        read_timeout_s: longest pause while a body arrives.
        max_pending: most ``/adapt`` requests in this worker at once.
        token: the bearer token, or ``None`` for no authentication.
        queued_paths: the routes counted against ``max_pending``.
        openapi_patch: applied to the OpenAPI document (``/docs.json``) before it is sent.
    """

    def __init__(
        self,
        app,
        api_paths: tuple[str, ...],
        max_body_bytes: int,
        read_timeout_s: float,
        max_pending: int,
        token: str | None = None,
        queued_paths: tuple[str, ...] = ("/adapt",),
        openapi_patch: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ):
        self.app, self.api_paths = app, tuple(api_paths)
        self.max_body_bytes, self.read_timeout_s = int(max_body_bytes), float(read_timeout_s)
        self.max_pending, self.queued_paths = int(max_pending), tuple(queued_paths)
        self._token = token.encode() if token else None
        self.openapi_patch = openapi_patch
        self.pending = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        is_api = path in self.api_paths
        if self._token is not None and (is_api or path in PROTECTED_EXTRA):
            refusal = self._check_token(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        if path == "/docs.json" and self.openapi_patch is not None:
            await self.app(scope, receive, _patching_openapi(send, self.openapi_patch))
            return
        if not is_api:
            await self.app(scope, receive, send)
            return
        await self._api(scope, receive, send)

    # -- authentication --------------------------------------------------------------------------

    def _check_token(self, scope):
        given = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        scheme, _, credentials = (given or b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._token):
            return None
        if given is None:
            reason, challenge = "missing Authorization header", 'Bearer realm="metarl"'
        else:  # never echo what was sent: it may be a real secret meant for something else
            reason = "invalid bearer token"
            challenge = 'Bearer realm="metarl", error="invalid_token"'
        error = RequestError(
            f"{reason}: this service requires a bearer token",
            "Authorization",
            "Authorization: Bearer <the service's METARL_API_TOKEN>",
            status=401,
        )
        return error_response(error, {"WWW-Authenticate": challenge})

    # -- API routes ------------------------------------------------------------------------------

    async def _api(self, scope, receive, send):
        headers = dict(scope["headers"])
        if headers.get(b"content-type") != b"application/json":
            # The API speaks JSON only: parse the body as JSON whatever it is labelled, which
            # also keeps BentoML's other decoders out of reach.
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [
                (b"content-type", b"application/json")
            ]
        close = {"Connection": "close"}  # the rest of the body is not read: end the connection
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            too_large = self._too_large(f"the body announces {int(length)} bytes")
            await error_response(too_large, close)(scope, receive, send)
            return
        try:
            body = await self._read_body(receive)
        except _BodyTooLarge:
            too_large = self._too_large("reading stopped there")
            await error_response(too_large, close)(scope, receive, send)
            return
        except _BodyStalled:
            error = RequestError(
                f"the request body stopped arriving for {self.read_timeout_s:g} s "
                "(METARL_READ_TIMEOUT_S)",
                "body",
                "the whole body sent without pausing",
                status=408,
            )
            await error_response(error, close)(scope, receive, send)
            return
        except _ClientGone:
            return
        queued = scope["path"] in self.queued_paths
        if queued and self.pending >= self.max_pending:
            error = RequestError(
                f"this worker already has {self.pending} adaptation requests queued or running "
                f"(METARL_MAX_PENDING={self.max_pending})",
                "service",
                "a retry after Retry-After seconds, or fewer concurrent /adapt calls",
                status=503,
            )
            await error_response(error)(scope, receive, send)
            return
        if queued:
            self.pending += 1
        try:
            await self.app(scope, _replay(body, receive), _reshaping_send(send))
        finally:
            if queued:
                self.pending -= 1

    def _too_large(self, what: str) -> RequestError:
        return RequestError(
            f"the request body exceeds the limit of {self.max_body_bytes} bytes "
            f"(METARL_MAX_BODY_BYTES); {what}",
            "body",
            f"at most {self.max_body_bytes} bytes",
            status=413,
        )

    async def _read_body(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                raise _BodyStalled from None
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """A ``receive`` that hands the app the body already read, then waits for the disconnect."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _buffering_send(send, wants, rewrite):
    """A ``send`` that holds a response for which ``wants(start message)`` is true, then sends
    ``rewrite(body)`` instead of its body (``Content-Length`` adjusted)."""
    held: dict[str, Any] = {}

    async def buffered(message):
        if message["type"] == "http.response.start" and wants(message):
            held["start"], held["body"] = message, []
            return
        if "start" not in held or message["type"] != "http.response.body":
            await send(message)
            return
        held["body"].append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = rewrite(b"".join(held["body"]))
        headers = [(k, v) for k, v in held["start"]["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**held["start"], "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return buffered


def _reshape_400(body: bytes) -> bytes:
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if isinstance(data, dict) and "detail" in data and "field" not in data:
        return json.dumps(reshape_validation_error(data)).encode()
    return body


def _reshaping_send(send):
    return _buffering_send(send, lambda m: m["status"] == 400, _reshape_400)


def _patching_openapi(send, patch):
    def rewrite(body: bytes) -> bytes:
        try:
            spec = json.loads(body)
        except ValueError:
            return body
        return json.dumps(patch(spec)).encode()

    return _buffering_send(send, lambda m: m["status"] == 200, rewrite)
