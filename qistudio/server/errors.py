"""Errors as OpenAI's API gives them: {"error": {"message", "type", "param", "code"}} with the matching status.

Every mistake a caller can make is an APIError with a 4xx status raised where it is found; the handlers below also
turn the framework's own errors (unknown route, wrong method, an over-long body) into the same JSON, so a client
(the openai package raises BadRequestError, NotFoundError, RateLimitError... from the status) never meets a bare
500 or an HTML page for its own mistake.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
         404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
         413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "server_error"}  # fmt: skip


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body exceeds the server's limit of {limit} bytes",
                         code="request_too_large")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error" if status < 500
                                                            else "server_error"),
                      "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), status_code=error.status,
                        headers=error.headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(
            error.status_code, str(error.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return error_response(APIError(error.status_code, message, code=code, headers=getattr(error, "headers", None)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}",
                                       code="internal_error"))
