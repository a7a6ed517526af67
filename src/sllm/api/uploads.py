"""A multipart upload streamed straight into the file store: the `file` part's bytes go to disk as
they arrive (never whole in memory, nor spooled to a temporary file first as form parsing does);
the small fields (`purpose`) are kept, at most `MAX_FIELD_BYTES` each.

The edge lets `multipart/form-data` bodies of the upload routes through unread (`streamed_paths`);
the size limit is then the file store's (`--max-upload-bytes`), checked as the bytes arrive.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from sllm.errors import InvalidRequestError, SllmError
from sllm.files.store import FileRecord, FileStore, Upload

MAX_FIELD_BYTES = 1024
MAX_PARTS = 16


class _Parts:
    """Callbacks of python-multipart's push parser."""

    def __init__(self, store: FileStore) -> None:
        self.store = store
        self.upload: Upload | None = None
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self.parts = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name: str | None = None
        self._field = bytearray()
        self._to_file = False

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise InvalidRequestError(f"At most {MAX_PARTS} form fields.", param="file")
        self._disposition, self._name, self._field, self._to_file = b"", None, bytearray(), False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        if len(self._header_value) > MAX_FIELD_BYTES:
            raise InvalidRequestError("A form part's header is too long.", param="file")

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "file" and b"filename" in options:
            if self.upload is not None:
                raise InvalidRequestError("Send one `file` per upload.", param="file")
            self.filename = options[b"filename"].decode("utf-8", "replace")
            self.upload = self.store.begin()
            self._to_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._to_file:
            self.upload.write(data[start:end])
            return
        self._field += data[start:end]
        if len(self._field) > MAX_FIELD_BYTES:
            raise InvalidRequestError(
                f"The form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes; only "
                "`file` carries data.",
                param=self._name or None,
            )

    def on_part_end(self) -> None:
        if not self._to_file and self._name:
            self.fields[self._name] = self._field.decode("utf-8", "replace")


async def receive_upload(
    content_type: str, stream: AsyncIterator[bytes], store: FileStore
) -> FileRecord:
    """Parse a multipart body (`file`, `purpose`) into the store; any failure keeps nothing."""
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise InvalidRequestError(
            "Upload a file as multipart/form-data with the fields `file` and `purpose`.",
            param="file",
        )
    parts = _Parts(store)
    parser = MultipartParser(params[b"boundary"], parts.callbacks())
    try:
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
    except BaseException as exc:
        if parts.upload is not None:
            parts.upload.abort()
        if isinstance(exc, SllmError) or not isinstance(exc, Exception):
            raise
        if isinstance(exc, (OSError, ClientDisconnect)):
            raise
        raise InvalidRequestError(  # python-multipart's parse errors, a truncated body
            f"The multipart body could not be parsed ({type(exc).__name__}).", param="file"
        ) from None
    if parts.upload is None:
        raise InvalidRequestError("The form has no `file` part (a file upload).", param="file")
    upload = parts.upload
    return await run_in_threadpool(upload.finish, parts.filename, parts.fields.get("purpose"))
