"""Every route of the direct API, mounted on the ``/api/`` sub-app in one call
(:func:`mount_api_routes`), and ``GET /api/openapi.json`` built from them."""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from .elsewhere import HolderFinder
from .instances_routes import instance_operations
from .messages_routes import max_body_bytes, message_operations
from .openapi import Answer, Operation, add_operations, openapi_document
from .sender import ApiSender

DESCRIPTION = ("The worker's own API (docs/api.md): the instances it holds, their QR codes, and messages sent "
               "once per Idempotency-Key. Errors are {\"error\": {\"code\", \"message\"}}.")


def api_operations(sender: ApiSender, *, media_max_bytes: int, finder: HolderFinder | None = None) -> list[Operation]:
    """The routes (without the document's own); ``finder``: in a fleet, who holds the others."""
    return [*instance_operations(sender.instances, finder),
            *message_operations(sender, max_body=max_body_bytes(media_max_bytes), finder=finder)]


def mount_api_routes(api: web.Application, sender: ApiSender, *, media_max_bytes: int, version: str,
                     extra: Sequence[Operation] = (), finder: HolderFinder | None = None) -> None:
    """The routes and the document describing them and ``extra`` (operations whose routes are
    already on ``api``: the event stream)."""
    operations = api_operations(sender, media_max_bytes=media_max_bytes, finder=finder)

    async def openapi(_: web.Request) -> web.Response:
        return web.json_response(document)

    operations.append(Operation("get", "/openapi.json", openapi, "getOpenApi", "this document",
                                answers={200: Answer("the OpenAPI 3.1 document (application/json)")}))
    document = openapi_document([*operations, *extra], version=version, description=DESCRIPTION)
    add_operations(api, operations)
