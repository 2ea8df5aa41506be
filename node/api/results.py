"""A job's page data and its result files: GET /jobs/{id} and GET /jobs/{id}/files/{name}.

A file is served only when its name is one of the files found inside the job's own results
folder: the client's text is looked up among those names, never joined into a path itself.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from vesalius.node.api.routes import shaped
from vesalius.node.paths import inside
from vesalius.node.store import Store

MEDIA_TYPES = {".dcm": "application/dicom", ".glb": "model/gltf-binary", ".stl": "model/stl",
               ".png": "image/png", ".json": "application/json", ".nii": "application/octet-stream",
               ".gz": "application/gzip", ".nrrd": "application/octet-stream"}
SHOWN_INLINE = (".png", ".json", ".glb")  # the page reads these; the others are downloads


def result_files(result_dir: Path) -> dict[str, Path]:
    """Relative name (a/b.ext) -> path of every regular file in a results folder (no links)."""
    root = result_dir.resolve()
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and not any(p.startswith(".") for p in
                                                                 path.relative_to(root).parts):
            found[path.relative_to(root).as_posix()] = path
    return found


def _result_dir(store: Store, job: Any) -> Path | None:
    if not job["result_dir"]:
        return None
    folder = Path(job["result_dir"])
    try:  # a row's folder must still be one of the store's results folders
        inside(store.results_dir, *folder.resolve().relative_to(store.results_dir).parts)
    except ValueError:
        return None
    return folder if folder.is_dir() else None


def job_detail(store: Store, job_id: int, ohif_url: str = "") -> dict[str, Any] | None:
    """The job row, its deliveries, its summary (model, structures, stage timings), its files
    and the OHIF link, as the job page shows them; None when there is no such job."""
    rows = store.listing("jobs", 1, before=job_id + 1)
    if not rows or rows[0]["id"] != job_id:
        return None
    job = store.job(job_id)
    assert job is not None
    detail = shaped(rows[0])
    detail["deliveries"] = [shaped(d) for d in store.listing("deliveries", 100, job=job_id)]
    folder = _result_dir(store, job)
    files = result_files(folder) if folder else {}
    detail["summary"] = None
    if "summary.json" in files:
        detail["summary"] = json.loads(files["summary.json"].read_text())
    detail["files"] = [{"name": name, "bytes": path.stat().st_size} for name, path in files.items()]
    study = detail.get("study_instance_uid")
    detail["ohif"] = (f"{ohif_url.rstrip('/')}/viewer?{urllib.parse.urlencode({'StudyInstanceUIDs': study})}"
                      if ohif_url and study else None)
    return detail


def result_routes(store: Store, ohif_url: str = "") -> list[Route]:
    """GET /jobs/{id}: the job page's data; GET /jobs/{id}/files/{name}: one of its result files."""
    def detail(request: Request) -> JSONResponse:
        job_id = request.path_params["job_id"]
        found = job_detail(store, job_id, ohif_url)
        if found is None:
            return JSONResponse({"error": f"no job {job_id}"}, status_code=404)
        return JSONResponse(found)

    def file(request: Request) -> Response:
        job_id, name = request.path_params["job_id"], request.path_params["name"]
        job = store.job(job_id)
        folder = _result_dir(store, job) if job is not None else None
        path = result_files(folder).get(name) if folder else None
        if path is None:
            return JSONResponse({"error": f"job {job_id} has no result file by that name"}, status_code=404)
        suffix = path.suffix.lower()
        return FileResponse(path, media_type=MEDIA_TYPES.get(suffix, "application/octet-stream"),
                            filename=None if suffix in SHOWN_INLINE else path.name,
                            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    return [Route("/jobs/{job_id:int}", detail), Route("/jobs/{job_id:int}/files/{name:path}", file)]
