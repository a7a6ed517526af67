"""The Files API, OpenAI's shapes, under `/v1/files` and `/openai/v1/files`.

POST   /files                 upload (multipart: `file`, `purpose`=fine-tune), streamed to disk
GET    /files                 newest first (`after`, `limit`, `purpose`)
GET    /files/{id}            the file object
GET    /files/{id}/content    the bytes as uploaded
DELETE /files/{id}            409 while a pending, running or paused job trains on it
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from sllm.api.errors import error_responses
from sllm.api.uploads import receive_upload
from sllm.files.models import FileDeleted, FileList, FileObject
from sllm.files.store import FileRecord, FileStore
from sllm.jobs.models import INT64_MAX

router = APIRouter(tags=["files"])
PREFIXES = ("/v1", "/openai/v1")
UPLOAD_PATHS = frozenset(f"{p}/files" for p in PREFIXES)  # bodies the edge streams through

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "purpose": {"type": "string", "enum": ["fine-tune"]},
                },
            }
        }
    },
}


def _files(request: Request) -> FileStore:
    return request.app.state.services.files


def to_wire(rec: FileRecord) -> FileObject:
    return FileObject(
        id=rec.id,
        bytes=rec.bytes,
        created_at=rec.created_at,
        filename=rec.filename,
        purpose=rec.purpose,
    )


def _route(method: str, path: str, **kwargs):
    """Register one handler under `/v1` and `/openai/v1`."""

    def decorate(fn):
        for prefix in PREFIXES:
            op = f"{fn.__name__}{'_openai' if prefix != '/v1' else ''}"
            router.add_api_route(prefix + path, fn, methods=[method], operation_id=op, **kwargs)
        return fn

    return decorate


@_route(
    "POST",
    "/files",
    response_model=FileObject,
    responses=error_responses(413),
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def upload_file(request: Request) -> FileObject:
    """Upload training data (JSON Lines, checked line by line); `purpose` must be `fine-tune`."""
    content_type = request.headers.get("content-type", "")
    return to_wire(await receive_upload(content_type, request.stream(), _files(request)))


@_route("GET", "/files", response_model=FileList, responses=error_responses(404))
def list_files(
    request: Request,
    limit: int = Query(10000, ge=-INT64_MAX - 1, le=INT64_MAX),
    after: str | None = Query(None),
    purpose: str | None = Query(None),
    order: str = Query("desc", pattern="^(asc|desc)$"),
) -> FileList:
    """Uploaded files, newest first (`order=asc`: oldest first within the page)."""
    records, more = _files(request).list(limit=limit, after=after, purpose=purpose)
    data = [to_wire(r) for r in records]
    if order == "asc":
        data.reverse()
    return FileList(
        data=data,
        has_more=more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@_route("GET", "/files/{file_id}", response_model=FileObject, responses=error_responses(404))
def get_file(file_id: str, request: Request) -> FileObject:
    """One file's object."""
    return to_wire(_files(request).get(file_id))


@_route(
    "GET",
    "/files/{file_id}/content",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes."},
        **error_responses(404),
    },
)
def file_content(file_id: str, request: Request) -> FileResponse:
    """The file's bytes, as uploaded."""
    store = _files(request)
    rec = store.get(file_id)
    return FileResponse(
        store.content_path(file_id),
        media_type="application/octet-stream",
        filename=rec.filename,
    )


@_route(
    "DELETE", "/files/{file_id}", response_model=FileDeleted, responses=error_responses(404, 409)
)
def delete_file(file_id: str, request: Request) -> FileDeleted:
    """Delete a file; a 409 while a job that will still run trains on it."""
    _files(request).delete(file_id)
    return FileDeleted(id=file_id)
