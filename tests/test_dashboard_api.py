"""The API behind the dashboard, on a real uvicorn in this process: keyset pages and filters that
stay on indexes at 100 000 jobs, live stage progress, result files served only by their names
inside a job's folder, processing a stored series again (audited)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vesalius.node.api import HttpServer, Tokens, create_app
from vesalius.node.api.results import job_detail
from vesalius.node.audit import OPERATOR_ACTION, Audit, read_events
from vesalius.node.config import ConfigError, parse_config
from vesalius.node.store import SeriesInfo, Store, record_progress

TOKEN = "dashboard-test-token-0123456789"
JOBS = 100_000


@dataclass
class Api:
    store: Store
    url: str

    def call(self, path: str, method: str = "GET", body: Any = None,
             token: str | None = TOKEN) -> tuple[int, Any, dict[str, str]]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data else {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, raw, got = answer.status, answer.read(), dict(answer.headers)
        except urllib.error.HTTPError as err:
            status, raw, got = err.code, err.read(), dict(err.headers)
        kind = got.get("content-type", "")
        return status, (json.loads(raw) if kind.startswith("application/json") else raw), got


def series(uid: str, ae: str = "SCANNER", study: str = "1.2.3") -> SeriesInfo:
    return SeriesInfo(uid, study, "CT", "1.2.840.10008.5.1.4.1.1.2", "chest", "CHEST", "test")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A store with 100 000 jobs over 1 000 series from two AEs, and the API over it."""
    store = Store(tmp_path_factory.mktemp("api"))
    now = time.time()
    with store.transaction() as db:
        db.executemany(
            "INSERT INTO series (series_instance_uid, study_instance_uid, modality, sop_class_uid, "
            "series_description, body_part, manufacturer, calling_ae, state, first_received, last_received, "
            "completed_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            [(f"1.2.826.0.1.{i}", f"1.2.826.9.{i // 10}", "CT", "1.2.840.10008.5.1.4.1.1.2", "chest", "CHEST",
              "test", "SCANNER" if i % 2 else "OTHER", "complete", now - 1e6 + i, now - 1e6 + i,
              now - 1e6 + i) for i in range(1000)])
        states = ("done", "done", "done", "failed", "queued")
        db.executemany(
            "INSERT INTO jobs (series_instance_uid, rule, model, destinations, state, created_at, "
            "updated_at) VALUES (?,?,?,?,?,?,?)",
            [(f"1.2.826.0.1.{i % 1000}", "ct", "builtin_ct", "[]", states[i % 5], now - JOBS + i,
              now - JOBS + i) for i in range(JOBS)])
    trail = Audit(store)
    app = create_app(store, Tokens((("local", TOKEN.encode()),)), trail, models=("builtin_ct", "other"))
    server = HttpServer(app, "127.0.0.1", 0)
    server.start()
    try:
        yield Api(store, f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()


def plan(store: Store, what: str, **filters: Any) -> str:
    sql, params = store.listing_sql(what, 50, **filters)
    return " | ".join(r["detail"] for r in store.query(f"EXPLAIN QUERY PLAN {sql}", params))


@pytest.mark.parametrize("filters,index,in_order", [
    ({"before": 50_000}, "INTEGER PRIMARY KEY", True),
    ({"state": "failed"}, "jobs_state", True),
    ({"state": "failed", "before": 50_000}, "jobs_state", True),
    ({"ae": "OTHER", "before": 50_000}, "jobs_series", False),  # sorts that AE's jobs, not all
    ({"since": time.time() - 3600, "until": time.time()}, "jobs_created", False),  # sorts that hour's
])
def test_every_jobs_page_query_uses_an_index_at_100000_jobs(api: Api, filters: dict, index: str,
                                                            in_order: bool) -> None:
    found = plan(api.store, "jobs", **filters)
    assert index in found, found
    assert "SCAN jobs" not in found, found  # no full table scan
    assert ("TEMP B-TREE" not in found) == in_order, found  # read in the index's order: no sort


def test_the_first_page_reads_the_newest_rows_in_key_order_and_stops(api: Api) -> None:
    found = plan(api.store, "jobs")
    assert found.startswith("SCAN jobs |") and "TEMP B-TREE" not in found, found


def test_pages_follow_one_another_by_keyset_with_filters(api: Api) -> None:
    status, first, headers = api.call("/jobs?state=failed&limit=100")
    assert status == 200 and len(first) == 100 and all(j["state"] == "failed" for j in first)
    assert [j["id"] for j in first] == sorted((j["id"] for j in first), reverse=True)
    link = headers["link"]
    assert link.startswith("</jobs?") and 'rel="next"' in link and f"before={first[-1]['id']}" in link
    status, second, _ = api.call(link[1:link.index(">")])
    assert status == 200 and second[0]["id"] < first[-1]["id"] and all(j["state"] == "failed" for j in second)
    _, by_ae, _ = api.call("/jobs?ae=OTHER&limit=20")
    assert {j["calling_ae"] for j in by_ae} == {"OTHER"}
    since = time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(time.time() - 100))
    _, recent, _ = api.call(f"/jobs?since={since}")
    assert 0 < len(recent) <= 101 and all(j["created_at"].endswith("+00:00") for j in recent)
    _, last_page, headers = api.call("/jobs?before=3&limit=10")
    assert [j["id"] for j in last_page] == [2, 1] and "link" not in headers
    assert api.call("/series?ae=OTHER&limit=5")[1][0]["calling_ae"] == "OTHER"


@pytest.mark.parametrize("query", ["state=sleeping", "limit=0", "limit=5000", "before=abc", "since=yesterday",
                                   "colour=red", "ae=" + "A" * 17])
def test_a_bad_filter_is_a_400_naming_it(api: Api, query: str) -> None:
    status, body, _ = api.call(f"/jobs?{query}")
    assert status == 400 and query.split("=")[0] in body["error"]


def test_a_running_job_shows_the_stage_it_started(api: Api) -> None:
    store = api.store
    with store.transaction() as db:
        job = store.add_job(db, "1.2.826.0.1.5", "ct", "builtin_ct", [])
    while (claimed := store.claim_job()) is not None and claimed["id"] != job:
        store.fail_job(claimed["id"], "not this one", retry=False)
    record_progress(store.db_path, job, "surfaces", 3, 5)
    _, rows, _ = api.call(f"/jobs?before={job + 1}&limit=1")
    assert rows[0]["state"] == "running"
    assert {k: rows[0]["progress"][k] for k in ("stage", "n", "of")} == {"stage": "surfaces", "n": 3, "of": 5}
    store.fail_job(job, "stopped by the test", retry=False)
    record_progress(store.db_path, job, "writers", 5, 5)  # a late report does not touch an ended job
    assert api.call(f"/jobs/{job}")[1]["progress"]["stage"] == "surfaces"


def test_result_files_are_served_by_name_from_inside_the_jobs_folder_only(api: Api, tmp_path: Path) -> None:
    store = api.store
    folder = store.results_dir / "1.2.826.0.1.7" / "builtin_ct"
    (folder / "meshes").mkdir(parents=True)
    (folder / "meshes" / "liver.stl").write_bytes(b"solid liver\nendsolid liver\n")
    (folder / "summary.json").write_text(json.dumps({"structures": [], "thumbnails": []}))
    secret = tmp_path / "secret.txt"
    secret.write_text("not a result")
    (folder / "link.txt").symlink_to(secret)
    with store.transaction() as db:
        job = store.add_job(db, "1.2.826.0.1.7", "ct", "builtin_ct", [])
    store.finish_job(job, folder, {"volume": 0.1}, [])
    status, detail, _ = api.call(f"/jobs/{job}")
    assert status == 200 and {f["name"] for f in detail["files"]} == {"meshes/liver.stl", "summary.json"}
    assert detail["ohif"] is None and detail["summary"] == {"structures": [], "thumbnails": []}
    status, body, headers = api.call(f"/jobs/{job}/files/meshes/liver.stl")
    assert status == 200 and body == b"solid liver\nendsolid liver\n"
    assert "attachment" in headers["content-disposition"]
    for name in ("link.txt", "../../../vesalius.sqlite", "meshes/../summary.json/..", "%2e%2e/http.token",
                 "/etc/passwd", "meshes//liver.stl"):
        assert api.call(f"/jobs/{job}/files/{name}")[0] == 404, name
    assert api.call(f"/jobs/{job}/files/meshes/liver.stl", token=None)[0] == 401
    assert api.call("/jobs/99999999")[0] == 404


def test_the_job_page_links_the_study_in_ohif_when_configured(api: Api) -> None:
    config = parse_config({"dashboard": {"ohif_url": "https://viewer.example.org/ohif/"}})
    assert config.dashboard.ohif_url == "https://viewer.example.org/ohif/"
    with pytest.raises(ConfigError, match="ohif_url"):
        parse_config({"dashboard": {"ohif_url": "javascript:alert(1)"}})
    detail = job_detail(api.store, 1, config.dashboard.ohif_url)
    assert detail is not None
    assert detail["ohif"] == f"https://viewer.example.org/ohif/viewer?StudyInstanceUIDs={detail['study_instance_uid']}"


def test_processing_a_stored_series_again_is_audited_and_only_with_a_node_model(api: Api) -> None:
    store = api.store
    uid = "1.2.826.0.1.99"
    store.store_instance(series(uid), "1.2.826.0.2.99", b"DICM" * 40, "SCANNER")
    assert api.call("/series/models")[1] == {"models": ["builtin_ct", "other"]}
    status, body, _ = api.call(f"/series/{uid}/process", "POST", {"model": "bundle:/tmp/anything"})
    assert status == 400 and "builtin_ct" in body["error"]
    status, body, _ = api.call(f"/series/{uid}/process", "POST", {"model": "other"})
    assert status == 200 and body["model"] == "other"
    row = store.job(body["job"])
    assert row is not None and row["series_instance_uid"] == uid and row["model"] == "other"
    assert api.call("/series/1.2.404/process", "POST", {})[0] == 404
    assert api.call("/series/1.2.826.0.1.3/process", "POST", {})[0] == 409  # no instances stored
    assert api.call(f"/series/{uid}/process", "POST", token=None)[0] == 401
    events = [e for e in read_events(store) if e["event"] == OPERATOR_ACTION]
    assert [(e["details"]["command"], e["details"]["status"]) for e in events[-4:]] == [
        ("process", 400), ("process", 200), ("process", 404), ("process", 409)]
    assert events[-3]["user"] == "local" and events[-3]["details"]["job"] == body["job"]


def test_the_page_and_its_assets_are_public_and_kept_to_this_origin(api: Api) -> None:
    status, page, headers = api.call("/", token=None)
    assert status == 200 and b'<dialog id="login">' in page
    policy = headers["content-security-policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy and "http" not in policy
    for asset in ("/static/app.js", "/static/viewer.js", "/static/style.css",
                  "/static/three/build/three.module.js", "/static/three/examples/jsm/loaders/GLTFLoader.js"):
        assert api.call(asset, token=None)[0] == 200, asset
    assert api.call("/static/../dashboard.py", token=None)[0] == 404
