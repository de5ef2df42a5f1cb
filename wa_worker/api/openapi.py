"""The direct API's routes as data, and the OpenAPI 3.1 document built from them.

Each route module declares :class:`Operation` values (method, path, handler,
the pydantic models of its body and answers); :func:`add_operations` registers
them on the ``/api/`` sub-app and :func:`openapi_document` assembles the
document from the same values, the schemas coming from pydantic's
``models_json_schema``. Nothing of the document is written by hand, so a route
or a field cannot be served without being described.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from .models import ErrorBody

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MOUNT_PATH = "/api"
_REF = "#/components/schemas/{model}"


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    where: str  # "path" | "header" | "query"
    description: str
    required: bool = True
    pattern: str | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    description: str
    model: type[BaseModel] | None = None  # None: no JSON body (see ``png``)
    png: bool = False  # also (or only) image/png bytes
    stream: bool = False  # text/event-stream: Server-Sent Events whose ``data:`` lines are ``model``
    headers: tuple[str, ...] = ()  # names of response headers worth saying (Location, Retry-After)


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str  # under /api, e.g. "/instances/{id}"
    handler: Handler
    operation_id: str
    summary: str
    body: type[BaseModel] | None = None
    params: tuple[Param, ...] = ()
    answers: dict[int, Answer] = field(default_factory=dict)


# errors every route may answer (the door: docs/api.md)
COMMON_ERRORS = {
    401: Answer("no or wrong API token", ErrorBody),
    429: Answer("this token's rate limit (Retry-After says when)", ErrorBody, headers=("Retry-After",)),
}

_HEADER_SCHEMAS = {
    "Location": {"type": "string", "description": "where the outcome can be read (2xx), or the same request at "
                                                  "the worker that holds the instance (307)"},
    "Retry-After": {"type": "integer", "description": "seconds"},
}


def add_operations(app: web.Application, operations: Sequence[Operation]) -> None:
    for op in operations:
        app.router.add_route(op.method.upper(), op.path, op.handler)


def _models(operations: Sequence[Operation]) -> list[type[BaseModel]]:
    seen: dict[str, type[BaseModel]] = {}
    for op in operations:
        for model in (op.body, *(a.model for a in (*op.answers.values(), *COMMON_ERRORS.values()))):
            if model is not None:
                seen.setdefault(model.__name__, model)
    return list(seen.values())


def _answer(answer: Answer, schemas_ref: Callable[[type[BaseModel]], dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"description": answer.description}
    content: dict[str, Any] = {}
    if answer.model is not None and answer.stream:
        # a stream of SSE frames; each frame's data line is one JSON object of the model
        content["text/event-stream"] = {"schema": {"type": "string", "description": "Server-Sent Events: id: <seq>, "
                                                   "event: <type>, data: one JSON object per event"},
                                        "x-sse-data": schemas_ref(answer.model)}
    elif answer.model is not None:
        content["application/json"] = {"schema": schemas_ref(answer.model)}
    if answer.png:
        content["image/png"] = {"schema": {"type": "string", "contentMediaType": "image/png"}}
    if content:
        out["content"] = content
    if answer.headers:
        out["headers"] = {h: {"schema": _HEADER_SCHEMAS[h]} for h in answer.headers}
    return out


def openapi_document(operations: Sequence[Operation], *, version: str, title: str = "wa-worker direct API",
                     description: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``operations`` (schemas from their pydantic models)."""
    def mode(model: type[BaseModel]) -> JsonSchemaMode:
        return "validation" if any(op.body is model for op in operations) else "serialization"

    keys, defs = models_json_schema([(m, mode(m)) for m in _models(operations)], ref_template=_REF)
    schemas = dict(defs.get("$defs", {}))

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return dict(keys[(model, mode(model))])

    paths: dict[str, Any] = {}
    for op in operations:
        entry: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary}
        if op.params:
            entry["parameters"] = [_param(p) for p in op.params]
        if op.body is not None:
            entry["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(op.body)}}}
        answers = {**op.answers, **COMMON_ERRORS}
        entry["responses"] = {str(status): _answer(answers[status], ref) for status in sorted(answers)}
        paths.setdefault(MOUNT_PATH + op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "API_TOKEN"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "API_TOKEN"},
            },
        },
    }


def _param(p: Param) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if p.pattern is not None:
        schema["pattern"] = p.pattern
    return {"name": p.name, "in": p.where, "required": p.required, "description": p.description, "schema": schema}
