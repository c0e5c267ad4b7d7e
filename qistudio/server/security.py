"""Who may call, and how much they may send: the Bearer API key and the request-body limit.

The key is compared in constant time; every route but GET /health needs it when the server has one (the openai
client sends `Authorization: Bearer KEY`). The body limit is an ASGI middleware in front of everything: a declared
Content-Length over the limit is refused before a byte is read, and a body that grows past it while streaming in
(chunked uploads) stops being read with the same 413.
"""

from __future__ import annotations

import hmac
import ipaddress
import json

from .errors import BodyTooLarge, error_body

OPEN_PATHS = ("/health",)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def authorized(header: str | None, api_key: str) -> bool:
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


async def _send_error(send, status: int, message: str, code: str, headers: tuple = ()) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: the API key check, then the body limit."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.limit = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] not in OPEN_PATHS and not authorized(headers.get("authorization"),
                                                                                self.api_key):
            return await _send_error(send, 401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                                     "invalid_api_key", ((b"www-authenticate", b"Bearer"),))
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, 413, f"the request body ({declared} bytes) exceeds the server's limit "
                                     f"of {self.limit} bytes", "request_too_large")
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)  # the app's handler answers 413
            return message

        await self.app(scope, limited_receive, send)
