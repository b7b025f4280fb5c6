"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure, never a trace."""
from __future__ import annotations

import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("chatterbox.serve")


class APIError(Exception):
    """An error the client should see: HTTP status, OpenAI error type, the offending parameter, a code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, **kw) -> JSONResponse:
    return APIError(status, message, **kw).response()


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str], str]:
    """(message, param, code) for the first problem FastAPI/pydantic found in the request."""
    errs = exc.errors()
    if not errs:
        return "invalid request", None, "invalid_request"
    e = errs[0]
    loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "form")]
    param = ".".join(loc) or None
    kind = e.get("type", "")
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({e.get('msg', '')})", None, "invalid_json"
    if kind == "extra_forbidden":
        return f"unknown parameter '{param}'", param, "unknown_parameter"
    if kind == "missing":
        if not loc:
            return "the request needs a JSON body", None, "missing_body"
        return f"missing required parameter '{param}'", param, "missing_required_parameter"
    if kind in ("model_attributes_type", "dict_type") and not loc:
        return "the request body must be a JSON object", None, "invalid_type"
    where = f"'{param}': " if param else ""
    return f"invalid value for {where}{e.get('msg', 'invalid value')}", param, "invalid_value"


def install_handlers(app: FastAPI) -> None:
    """Map every exception FastAPI may raise (and any unexpected one) to an OpenAI-shaped JSON error."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param, code = _validation_message(exc)
        return error_response(400, message, param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(404, f"no route {request.method} {request.url.path}; see GET /v1/models, "
                                  "POST /v1/audio/speech, GET /v1/audio/voices", code="not_found")
        if exc.status_code == 405:
            return error_response(405, f"method {request.method} is not allowed on {request.url.path}",
                                  code="method_not_allowed")
        return error_response(exc.status_code, str(exc.detail), code="http_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(exc).__name__}); see the server log",
                              type="server_error", code="internal_error")
