"""STOW-RS in (PS3.18 10.5): ``POST /studies`` and ``POST /studies/{study}`` with a
``multipart/related; type="application/dicom"`` body, behind the API's token guard.

The body is streamed through python-multipart's ``MultipartParser`` (the RFC 2046 framing
parser under Starlette's form parsing, which itself only takes multipart/form-data; the framing
of multipart/related is the same), each part into its own file in the spool's incoming folder,
bounded in total (``max_stow_mb``) and per part (``max_instance_mb``). Only a body read to its
closing delimiter within those bounds is stored, each part through node.ingest (the checks and
durability of C-STORE), and only then answered: nothing is acknowledged before it is on disk, and
a malformed (400), oversized (413) or wrongly typed (415) body stores nothing.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vesalius.node import audit, ingest
from vesalius.node.config import Config
from vesalius.node.store import Store

log = logging.getLogger("vesalius.stow")

DICOM_JSON = "application/dicom+json"
# PS3.18 10.5.3 / PS3.4 Annex B status codes as FailureReason values
FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE, FAILURE_REASON = "00081198", "00081199", "00081197"
SOP_CLASS, SOP_INSTANCE = "00081150", "00081155"


class BodyTooLarge(Exception):
    pass


@dataclass
class Part:
    path: Path
    file: BinaryIO
    headers: dict[str, str] = field(default_factory=dict)
    size: int = 0


class PartsOnDisk:
    """python-multipart callbacks writing each part into a file of ``folder``, within limits."""

    def __init__(self, folder: Path, max_part: int) -> None:
        self.folder = folder
        self.max_part = max_part
        self.parts: list[Part] = []
        self.ended = False
        self._field = b""
        self._value = b""

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_part_data": self._data, "on_part_end": self._part_end, "on_end": self._end}

    def _begin(self) -> None:
        with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".stow", delete=False) as f:
            path = Path(f.name)
        self.parts.append(Part(path, open(path, "wb")))  # noqa: SIM115  (closed in _part_end/discard)

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self.parts[-1].headers[name] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        part.size += end - start
        if part.size > self.max_part:
            raise BodyTooLarge(f"a part is larger than {self.max_part // 2**20} MB (max_instance_mb)")
        part.file.write(data[start:end])

    def _part_end(self) -> None:
        self.parts[-1].file.close()

    def _end(self) -> None:
        self.ended = True

    def discard(self) -> None:
        for part in self.parts:
            part.file.close()
            part.path.unlink(missing_ok=True)


def _media_type(header: str) -> tuple[str, dict[str, str]]:
    """A Content-Type as (type, parameters), parsed by the standard library's email package."""
    message = Message()
    message["content-type"] = header
    params = {str(k).lower(): str(v) for k, v in (message.get_params() or [])[1:]}
    return message.get_content_type(), params


def _failure(reason: int, sop_class: str = "", sop_instance: str = "") -> dict[str, Any]:
    item: dict[str, Any] = {FAILURE_REASON: {"vr": "US", "Value": [reason]}}
    if sop_class:
        item[SOP_CLASS] = {"vr": "UI", "Value": [sop_class]}
    if sop_instance:
        item[SOP_INSTANCE] = {"vr": "UI", "Value": [sop_instance]}
    return item


def _error(status: int, text: str) -> JSONResponse:
    return JSONResponse({"error": text}, status_code=status)


def stow_routes(store: Store, config: Config) -> list[Route]:
    max_body = config.max_stow_mb * 2**20
    max_part = config.max_instance_mb * 2**20
    min_free = config.min_free_disk_mb * 2**20
    trail = audit.Audit(store)

    async def stow(request: Request) -> Response:
        media_type, params = _media_type(request.headers.get("content-type", ""))
        part_type = params.get("type", "application/dicom")
        if media_type != "multipart/related" or part_type != "application/dicom":
            return _error(415, 'expected Content-Type: multipart/related; type="application/dicom"')
        boundary = params.get("boundary", "")
        if not boundary or len(boundary) > 70:
            return _error(400, "the multipart/related Content-Type has no (valid) boundary")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            return _error(413, f"the body is larger than {config.max_stow_mb} MB (max_stow_mb)")
        study = request.path_params.get("study")
        if study is not None and ingest.uid_problem("StudyInstanceUID", study):
            return _error(400, "the study in the path is not a UID")
        store.incoming_dir.mkdir(parents=True, exist_ok=True)
        sink = PartsOnDisk(store.incoming_dir, max_part)
        parser = MultipartParser(boundary, sink.callbacks())  # type: ignore[arg-type]
        total = 0
        try:
            async for chunk in request.stream():
                total += len(chunk)
                if total > max_body:
                    raise BodyTooLarge(f"the body is larger than {config.max_stow_mb} MB (max_stow_mb)")
                await run_in_threadpool(parser.write, chunk)
            parser.finalize()
            if not sink.ended or not sink.parts:
                raise MultipartParseError("the body ends before its closing delimiter" if sink.parts
                                          else "the body holds no parts")
        except BodyTooLarge as err:
            sink.discard()
            return _error(413, str(err))
        except (MultipartParseError, ValueError) as err:
            sink.discard()
            return _error(400, f"malformed multipart/related body: {err}")
        except ClientDisconnect:
            sink.discard()
            return _error(400, "the client went away before the body ended")
        except BaseException:
            sink.discard()
            raise
        status, answer = await run_in_threadpool(_store_parts, sink.parts, study, request.user.display_name,
                                                 request.client.host if request.client else None)
        return JSONResponse(answer, status_code=status, media_type=DICOM_JSON)

    def _store_parts(parts: list[Part], study: str | None, user: str,
                     address: str | None) -> tuple[int, dict[str, Any]]:
        stored: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        touched: set[str] = set()
        studies: set[str] = set()
        for part in parts:
            kind, _ = _media_type(part.headers.get("content-type", "application/dicom"))
            if kind != "application/dicom":
                part.path.unlink(missing_ok=True)
                failed.append(_failure(ingest.CANNOT_UNDERSTAND))
                continue
            if study is not None and _study_of(part.path) != study:
                part.path.unlink(missing_ok=True)
                failed.append(_failure(ingest.CANNOT_UNDERSTAND))
                continue
            outcome = ingest.store_file(store, part.path, "STOW-RS", min_free)
            if outcome.status != ingest.SUCCESS:
                log.warning("STOW-RS from %s: instance refused: %s", user, outcome.problem)
                failed.append(_failure(outcome.status, outcome.sop_class_uid, outcome.sop_instance_uid))
                continue
            touched.add(outcome.series_instance_uid)
            studies.add(outcome.study_instance_uid)
            stored.append({SOP_CLASS: {"vr": "UI", "Value": [outcome.sop_class_uid]},
                           SOP_INSTANCE: {"vr": "UI", "Value": [outcome.sop_instance_uid]}})
        store.mark_released(sorted(touched))  # as when a sender's association ends
        trail.record(audit.INSTANCES_TRANSFERRED,
                     outcome=audit.SUCCESS if not failed else audit.MINOR_FAILURE,
                     action="C", user=user, address=address, via="STOW-RS", instances=len(stored),
                     refused=len(failed), studies=sorted(studies))
        answer: dict[str, Any] = {}
        if stored:
            answer[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": stored}
        if failed:
            answer[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
        return (200 if not failed else 202 if stored else 409), answer

    return [Route("/studies", stow, methods=["POST"]), Route("/studies/{study}", stow, methods=["POST"])]


def _study_of(path: Path) -> str | None:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).get("StudyInstanceUID", "")).rstrip("\x00 ")
    except Exception:  # unreadable: refused as not of the study
        return None
