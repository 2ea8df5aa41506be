"""POST /jobs/{id}/evaluate: a finished job's SEG against a reference SEG, figures kept with the job.

The reference is the request body, never a path: either the SEG itself (``Content-Type:
application/dicom``, at most ``MAX_REFERENCE_BYTES``, written to a private temporary file in the
data folder and removed after) or ``application/json`` ``{"reference_series_uid": UID}`` naming a
SEG series the node already holds in its spool. Audited like retry and resend, with the token's name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from vesalius.node import audit
from vesalius.node.evaluations import (
    SEGMENTATION_SOP_CLASSES,
    NotEvaluable,
    evaluate_job,
    job_segmentation,
    spooled_reference,
)
from vesalius.node.store import Store

log = logging.getLogger("vesalius.api")

MAX_REFERENCE_BYTES = 256 * 2**20  # a BINARY SEG of 100+ structures on a 512x512x600 CT stays below
MAX_JSON_BYTES = 4096
UID = re.compile(r"[0-9]+(\.[0-9]+)*")


async def _received(request: Request, folder: Path) -> Path:
    """The request body in a temporary file (0600), refused beyond the size limit as it arrives."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_REFERENCE_BYTES):
        raise NotEvaluable(413, f"a reference SEG is at most {MAX_REFERENCE_BYTES // 2**20} MiB")
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="reference-", suffix=".dcm", dir=folder)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_REFERENCE_BYTES:
                    raise NotEvaluable(413, f"a reference SEG is at most {MAX_REFERENCE_BYTES // 2**20} MiB")
                out.write(chunk)
    except BaseException:
        os.unlink(name)
        raise
    if size == 0:
        os.unlink(name)
        raise NotEvaluable(400, "the request body is empty: send the reference SEG (application/dicom) or "
                                "{\"reference_series_uid\": UID} (application/json)")
    return Path(name)


async def _reference_series(request: Request) -> str:
    body = await request.body()
    if len(body) > MAX_JSON_BYTES:
        raise NotEvaluable(413, "the JSON body is too large")
    try:
        data: Any = json.loads(body)
        uid = data["reference_series_uid"]
    except (ValueError, TypeError, KeyError):
        raise NotEvaluable(400, "expected {\"reference_series_uid\": UID}") from None
    if not isinstance(uid, str) or len(uid) > 64 or not UID.fullmatch(uid):
        raise NotEvaluable(400, "reference_series_uid is not a DICOM UID")
    return uid


def _uploaded_seg(path: Path) -> tuple[str, str | None]:
    """How the stored evaluation names an uploaded reference (by its UIDs), and its series UID;
    NotEvaluable 415 when the body is not a DICOM Segmentation."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError):
        raise NotEvaluable(415, "the request body is not a DICOM file (a Part 10 file with the DICM "
                                "preamble is expected)") from None
    if str(header.get("SOPClassUID", "")) not in SEGMENTATION_SOP_CLASSES:
        raise NotEvaluable(415, "the request body is DICOM but not a Segmentation")
    sop, series = (_uid(header.get(key)) for key in ("SOPInstanceUID", "SeriesInstanceUID"))
    return f"SEG {sop or '(irregular SOP Instance UID)'} sent with the request", series


def _uid(value: object) -> str | None:
    """A received UID, if it is one (only then may it reach the store and the audit trail)."""
    text = str(value or "")
    return text if len(text) <= 64 and UID.fullmatch(text) else None


def evaluate_routes(store: Store, trail: audit.Audit) -> list[Route]:
    incoming = store.data_dir / ".evaluate-incoming"

    async def evaluate(request: Request) -> JSONResponse:
        job_id = request.path_params["job_id"]
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        reference_uid = None
        upload: Path | None = None
        try:
            await run_in_threadpool(job_segmentation, store, job_id)  # 404/409 before a body is read
            if kind == "application/dicom":
                upload = await _received(request, incoming)
                reference, (name, reference_uid) = upload, await run_in_threadpool(_uploaded_seg, upload)
            elif kind == "application/json":
                reference_uid = await _reference_series(request)
                reference = await run_in_threadpool(spooled_reference, store, reference_uid)
                name = f"SEG series {reference_uid}"
            else:
                raise NotEvaluable(415, "send the reference SEG as application/dicom, or application/json "
                                        "{\"reference_series_uid\": UID} for a SEG series the node holds")
            body = await run_in_threadpool(evaluate_job, store, job_id, reference, name, via="http")
            code = 200
        except NotEvaluable as err:
            code, body = err.status, {"error": str(err)}
        except Exception as err:  # a library failing on these masks: an answer and a log line, not a 500 page
            log.error("evaluating job %s failed: %s", job_id, type(err).__name__)
            log.debug("evaluation failed", exc_info=True)
            code, body = 500, {"error": f"the evaluation failed ({type(err).__name__}); see the node's log"}
        finally:
            if upload is not None:
                upload.unlink(missing_ok=True)
        client = f"{request.client.host}:{request.client.port}" if request.client else None
        await run_in_threadpool(trail.record, audit.OPERATOR_ACTION,
                                outcome=audit.SUCCESS if code == 200 else audit.MINOR_FAILURE, action="E",
                                user=request.user.display_name, address=client, via="http",
                                command="evaluate", job=job_id, status=code,
                                reference_series_uid=reference_uid)
        return JSONResponse(body, status_code=code)

    return [Route("/jobs/{job_id:int}/evaluate", evaluate, methods=["POST"])]
