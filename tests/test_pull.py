"""Pulling from archives (issue 19) with real peers: Orthanc (C-FIND/C-MOVE and C-GET through its
DICOM port, QIDO-RS/WADO-RS through its DICOMweb plugin) and DCMTK dcmqrscp as a second,
independent Q/R SCP. Counts are taken at the archive's side: dcmqrscp's log names every C-MOVE
request (with its time) and every C-STORE sub-operation the node acknowledged."""

from __future__ import annotations

import getpass
import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from datetime import time as clock
from pathlib import Path

import pydicom
import pytest

from tests.conftest import free_port
from tests.orthanc_peer import OrthancProcess, orthanc_config, plugin_library, running_orthanc
from tests.peers import NodeProcess, vesalius_node, wait_for
from tests.phantoms import PhantomSeries, write_phantom_series
from tests.qr_peers import dcmqrscp, silent_listener
from tests.study_phantoms import CHEST
from vesalius.inference.fields import FieldError
from vesalius.node.checks import ConfigError
from vesalius.node.config import parse_config
from vesalius.node.pull import jobs
from vesalius.node.pull.query import PullQuery, SeriesMatch, StudyMatch
from vesalius.node.sources import in_window, parse_window
from vesalius.node.store import Store

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
PULL_TIMEOUT = 240  # s: a few small studies through the pipeline on 2 shared cores


def study(folder: Path, date: str, description: str = "Chest", modality: str = "CT",
          slices: int = 6, seed: int = 0) -> PhantomSeries:
    """One small one-series study of the chest phantom, with its date, description and modality."""
    series = write_phantom_series(folder, shape=(slices, 32, 32), spacing=(5.0, 6.0, 6.0), objects=CHEST,
                                  series_description=f"{description} series", seed=seed)
    for path in series.paths:
        ds = pydicom.dcmread(path)
        ds.StudyDate = ds.SeriesDate = date
        ds.StudyDescription = description
        ds.Modality = modality
        ds.save_as(path, enforce_file_format=True)
    return series


@contextmanager
def archive(tmp: Path, node_port: int) -> Iterator[OrthancProcess]:
    """A plain Orthanc with its DICOMweb plugin, knowing the node as modality VESALIUS."""
    config = orthanc_config(tmp, free_port(), free_port(), vesalius=None,
                            modalities={"vesalius": ["VESALIUS", "127.0.0.1", node_port]})
    config["Plugins"] = [str(plugin_library("libOrthancDicomWeb"))]
    del config["PythonScript"], config["PythonVerbose"]
    with running_orthanc(tmp, config, plugin="dicom-web") as server:
        yield server


def sources_toml(*tables: dict[str, object]) -> str:
    lines = []
    for table in tables:
        lines.append("[[sources]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    config = node.log_path.with_suffix(".toml")
    return subprocess.run([sys.executable, "-m", "vesalius.node.cli", "pull", *args, "--config", str(config),
                           "--data-dir", str(node.data_dir)], capture_output=True, text=True, timeout=120)


def post_json(node: NodeProcess, path: str, document: object, token: str | None = "") -> tuple[int, dict]:
    """(status, JSON answer) of a POST with a JSON body; ``token`` as in NodeProcess.request."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token or node.token()}"
    request = urllib.request.Request(f"http://127.0.0.1:{node.http_port}{path}", method="POST",
                                     data=json.dumps(document).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def pull_state(node: NodeProcess, job: int) -> dict:
    return node.get(f"/pulls/{job}")


def finished(node: NodeProcess, job: int) -> dict | None:
    state = pull_state(node, job)
    return state if state["state"] in ("done", "failed", "cancelled") else None


def study_states(state: dict) -> dict[str, str]:
    return {s["study_instance_uid"]: s["state"] for s in state["study_list"]}


def node_studies(node: NodeProcess) -> set[str]:
    return {s["study_instance_uid"] for s in node.get("/series")}


def results_in(orthanc: OrthancProcess, study_uid: str) -> set[str]:
    """The SOP classes of our result series in the archive's copy of the study."""
    study_id = orthanc.study_id(study_uid)
    if study_id is None:
        return set()
    return {s["First"].get("SOPClassUID", "") for s in orthanc.series_of(study_id)
            if s["First"].get("Manufacturer") == "Vesalius"}


def instance_count(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "vesalius.sqlite") as db:
        return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


# --- the query model, the window, the job actions (no network) ---------------------------------

def test_query_checks_its_values_and_keeps_identifying_criteria_out_of_listings() -> None:
    with pytest.raises(FieldError, match="date_from"):
        PullQuery(date_from="2025-01-01")
    with pytest.raises(FieldError, match="date_to"):
        PullQuery(date_to="20250230")
    with pytest.raises(FieldError, match="date_to"):
        PullQuery(date_from="20250201", date_to="20250101")
    with pytest.raises(FieldError, match="study_uids"):
        PullQuery(study_uids=("1.2.x",))
    with pytest.raises(FieldError, match="patient_id"):
        PullQuery(level="patient")
    query = PullQuery(accession_number="ACC123", patient_id="P42", modality=("ct",))
    shown = json.dumps(query.shown())
    assert "ACC123" not in shown and "P42" not in shown and '"(given)"' in shown
    assert PullQuery.from_json(query.to_json()) == query and query.modality == ("CT",)


def test_query_selects_series_by_modality_and_description_and_studies_by_date() -> None:
    ct, mr = SeriesMatch("1.1", "CT", "CHEST", "Chest 2.0"), SeriesMatch("1.2", "MR", "", "T1 axial")
    found = StudyMatch("1", "20250310", "Thorax CT", (ct, mr))
    assert PullQuery(modality=("CT",)).select(found) == found  # study level: every series of it
    assert PullQuery(level="series", modality=("CT",)).select(found).series == (ct,)  # type: ignore[union-attr]
    assert PullQuery(level="series", series_description="t1*").select(found).series == (mr,)  # type: ignore[union-attr]
    assert PullQuery(modality=("PT",)).select(found) is None
    assert PullQuery(date_from="20250401").select(found) is None  # the source ignored the range
    assert PullQuery(study_description="thorax*").select(found) == found
    assert PullQuery(study_description="abd*").select(found) is None
    assert PullQuery(body_part=("chest",), level="series").select(found).series == (ct,)  # type: ignore[union-attr]


def test_window_wraps_past_midnight_and_refuses_nonsense() -> None:
    nights = parse_window("22:00-06:00")
    assert in_window(nights, clock(23, 30)) and in_window(nights, clock(5, 59))
    assert not in_window(nights, clock(6, 0)) and not in_window(nights, clock(12, 0))
    assert in_window(parse_window(""), clock(12, 0))
    with pytest.raises(FieldError, match="window"):
        parse_window("25:00-06:00")
    with pytest.raises(ConfigError, match=r"sources\[0\]\.window"):
        parse_config({"sources": [{"name": "a", "ae_title": "A", "host": "h", "window": "night"}]})
    with pytest.raises(ConfigError, match=r"sources\[0\]\.retrieve"):
        parse_config({"sources": [{"name": "a", "ae_title": "A", "host": "h", "retrieve": "push"}]})
    with pytest.raises(ConfigError, match="names must be unique"):
        parse_config({"sources": [{"name": "a", "ae_title": "A", "host": "h"},
                                  {"name": "a", "kind": "dicomweb", "url": "http://h/dicom-web"}]})


def test_pause_resume_cancel_move_a_job_between_states(database_url: str, tmp_path: Path) -> None:
    store = Store(tmp_path, database_url)
    job = jobs.create_job(store, "archive", PullQuery(), "tester")
    assert jobs.act(store, job, "resume")[0] == 409  # only a paused job resumes
    assert jobs.act(store, job, "pause") == (200, {"pull": job, "state": "paused"})
    assert jobs.act(store, job, "resume") == (200, {"pull": job, "state": "queued"})  # not queried yet
    with store.transaction() as db:
        db.execute("INSERT INTO pull_studies (job_id, study_instance_uid, updated_at) VALUES (?, '1.2', 0)",
                   (job,))
    assert jobs.act(store, job, "cancel") == (200, {"pull": job, "state": "cancelled"})
    assert jobs.job(store, job)["study_list"][0]["state"] == "cancelled"  # type: ignore[index]
    assert jobs.act(store, job, "pause")[0] == 409
    assert jobs.act(store, job, "retry")[0] == 409  # a cancelled job stays so
    assert jobs.act(store, 999, "cancel")[0] == 404
    failed = jobs.create_job(store, "archive", PullQuery(), "tester")
    with store.transaction() as db:
        db.execute("INSERT INTO pull_studies (job_id, study_instance_uid, state, reason, updated_at) "
                   "VALUES (?, '1.3', 'failed', 'C-MOVE refused', 0), (?, '1.4', 'processed', NULL, 0)",
                   (failed, failed))
        db.execute("UPDATE pull_jobs SET state='done', error='1 of 2 studies failed' WHERE id=?", (failed,))
    assert jobs.act(store, failed, "retry") == (200, {"pull": failed, "state": "running"})
    assert {s["study_instance_uid"]: s["state"] for s in jobs.studies(store, failed)} == {
        "1.3": "queried", "1.4": "processed"}


# --- Orthanc: C-FIND + C-MOVE, C-GET, QIDO-RS + WADO-RS ------------------------------------------

def release_records(node: NodeProcess) -> dict[str, tuple[int, int]]:
    """Each series' (associations, released_normally): what decides whether it completes at once."""
    with sqlite3.connect(node.data_dir / "vesalius.sqlite") as db:
        return {uid: (n, normally) for uid, n, normally in db.execute(
            "SELECT series_instance_uid, associations, released_normally FROM series")}


def test_a_query_pulls_exactly_the_matching_studies_processes_them_and_results_reach_the_archive(
        tmp_path: Path) -> None:
    node_port = free_port()
    with archive(tmp_path, node_port) as orthanc:
        wanted = [study(tmp_path / "a", "20250310", seed=1), study(tmp_path / "b", "20250620", seed=2)]
        others = [study(tmp_path / "c", "20240105", seed=3),  # before the range
                  study(tmp_path / "d", "20250415", "Brain", modality="MR", seed=4)]  # not CT
        for series in wanted + others:
            orthanc.upload(series.paths)
        config = sources_toml({"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                               "port": orthanc.dicom_port}) + f"""
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc.dicom_port}
preview = false
"""
        with vesalius_node(tmp_path, port=node_port, config=config) as node:
            dry = cli(node, "pacs", "--modality", "CT", "--from", "2025-01-01", "--to", "2025-12-31",
                      "--dry-run", "--json")
            assert dry.returncode == 0, dry.stderr
            assert {m["study_instance_uid"] for m in json.loads(dry.stdout)} == {s.study_uid for s in wanted}
            assert node.get("/pulls") == []  # a dry run starts nothing
            assert "PHANTOM1" not in dry.stdout + dry.stderr and "ACC0001" not in dry.stdout + dry.stderr

            status, answer = post_json(node, "/pulls", {"source": "pacs", "query": {
                "modality": ["CT"], "date_from": "20250101", "date_to": "20251231"}})
            assert status == 200, answer
            done = wait_for(lambda: finished(node, answer["pull"]), PULL_TIMEOUT, "the pull job to finish")
            assert done["state"] == "done" and done["error"] is None, done
            assert study_states(done) == {s.study_uid: "processed" for s in wanted}
            assert node_studies(node) == {s.study_uid for s in wanted}  # nothing else was fetched
            for series in wanted:
                wait_for(lambda s=series: SEG in results_in(orthanc, s.study_uid), PULL_TIMEOUT,
                         "the SEG back in the archive's study")
            assert all(not results_in(orthanc, s.study_uid) for s in others)
            # each pulled series came over one association of the archive's, released normally:
            # the runner does not count the C-MOVE a second time (its AE would then look like one
            # that spreads series over associations, and all its series wait the quiet period)
            assert release_records(node) == {s.series_uid: (1, 1) for s in wanted}
            status_json = subprocess.run(
                [sys.executable, "-m", "vesalius.node.cli", "status", "--json", "--data-dir",
                 str(node.data_dir)], capture_output=True, text=True, timeout=60)
            assert json.loads(status_json.stdout)["pulls"][0]["studies"]["processed"] == 2
            for identifying in ("PHANTOM1", "ACC0001", "Phantom^Test"):
                assert identifying not in node.log() and identifying not in json.dumps(node.get("/pulls"))


def test_c_get_and_dicomweb_sources_pull_through_the_same_checks(tmp_path: Path) -> None:
    node_port = free_port()
    with archive(tmp_path, node_port) as orthanc:
        by_get, by_web = study(tmp_path / "g", "20250101", seed=5), study(tmp_path / "w", "20250102", seed=6)
        orthanc.upload(by_get.paths + by_web.paths)
        config = sources_toml(
            {"name": "get", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port,
             "retrieve": "get"},
            {"name": "web", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web",
             "instances_per_second": 50})
        with vesalius_node(tmp_path, port=node_port, config=config) as node:
            for source, series in (("get", by_get), ("web", by_web)):
                result = cli(node, source, "--study-uid", series.study_uid)
                assert result.returncode == 0, result.stderr
            for job, series in ((1, by_get), (2, by_web)):
                done = wait_for(lambda j=job: finished(node, j), PULL_TIMEOUT, f"pull job {job}")
                assert study_states(done) == {series.study_uid: "processed"}, done
            rows = {s["study_instance_uid"]: s for s in node.get("/series")}
            assert rows[by_get.study_uid]["instances"] == len(by_get.paths)
            assert rows[by_web.study_uid]["instances"] == len(by_web.paths)
            assert rows[by_get.study_uid]["calling_ae"] == "ORTHANC"
            assert rows[by_web.study_uid]["calling_ae"] == "dicomweb:web"
            # every listed instance arrived: each retrieval ended like a normal release
            assert release_records(node) == {by_get.series_uid: (1, 1), by_web.series_uid: (1, 1)}
            assert {j["state"] for j in node.jobs()} == {"done"}


def test_c_get_and_wado_rs_refuse_an_instance_over_max_instance_mb(tmp_path: Path) -> None:
    node_port = free_port()
    with archive(tmp_path, node_port) as orthanc:
        big = write_phantom_series(tmp_path / "big", shape=(1, 800, 800), spacing=(5.0, 0.3, 0.3),
                                   objects=CHEST)  # 1.3 MB
        orthanc.upload(big.paths)
        config = "max_instance_mb = 1\n" + sources_toml(
            {"name": "get", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port,
             "retrieve": "get", "timeout": 5},
            {"name": "web", "kind": "dicomweb", "url": f"{orthanc.url}/dicom-web"})
        with vesalius_node(tmp_path, port=node_port, config=config) as node:
            for job, source in enumerate(("get", "web"), start=1):
                assert cli(node, source).returncode == 0
                done = wait_for(lambda j=job: finished(node, j), 120, f"pull job {job}")
                row = done["study_list"][0]
                assert row["state"] == "failed", done
            assert "larger than max_instance_mb" in row["reason"], row  # WADO-RS: by its Content-Length
            assert instance_count(node.data_dir) == 0
            assert not any((node.data_dir / "spool" / ".incoming").iterdir())


def test_an_archive_that_refuses_the_move_fails_the_study_with_its_reason_until_retried(
        tmp_path: Path) -> None:
    with archive(tmp_path, free_port()) as orthanc:
        series = study(tmp_path / "a", "20250310")
        orthanc.upload(series.paths)
        config = sources_toml({"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                               "port": orthanc.dicom_port, "move_destination": "NOBODY"})
        with vesalius_node(tmp_path, config=config) as node:
            assert cli(node, "pacs").returncode == 0
            done = wait_for(lambda: finished(node, 1), PULL_TIMEOUT, "the pull job to finish")
            study_row = done["study_list"][0]
            assert study_row["state"] == "failed" and "C-MOVE" in study_row["reason"], study_row
            assert done["state"] == "done" and done["error"] == "1 of 1 studies failed"
            shown = cli(node, "--show", "1")
            assert "failed" in shown.stdout and "C-MOVE" in shown.stdout
            # the archive learns where NOBODY is; a retry fetches the study and it is processed
            orthanc.request("PUT", "/modalities/nobody",
                            json.dumps(["NOBODY", "127.0.0.1", node.port]).encode())
            assert cli(node, "--retry", "1").returncode == 0
            done = wait_for(lambda: finished(node, 1), PULL_TIMEOUT, "the retried pull job to finish")
            assert study_states(done) == {series.study_uid: "processed"} and done["error"] is None, done


# --- dcmqrscp: restart without fetching twice, the rate, a source that times out ----------------

def test_kill_9_mid_pull_then_restart_fetches_nothing_twice_and_misses_nothing(tmp_path: Path) -> None:
    node_port = free_port()
    series = [study(tmp_path / f"s{i}", f"2025010{i + 1}", seed=i) for i in range(4)]
    files = [p for s in series for p in s.paths]
    with dcmqrscp(tmp_path / "qr", files, {"VESALIUS": ("127.0.0.1", node_port)}) as qr:
        config = sources_toml({**qr.table, "instances_per_second": 6})  # one 6-instance study a second
        data_dir = tmp_path / "node-data"
        with vesalius_node(tmp_path, port=node_port, config=config, data_dir=data_dir) as node:
            assert cli(node, "dcmqr").returncode == 0
            wait_for(lambda: qr.stores_acknowledged() >= 1, 60, "the first instance to arrive")
            os.killpg(node.proc.pid, signal.SIGKILL)  # the node and its workers, mid-pull
            node.proc.wait(timeout=10)
        before = instance_count(data_dir)  # on disk and recorded (acknowledged or not: the kill may
        assert 0 < before < len(files), f"the kill came after the pull ({before} instances)"  # fall between)
        restart = len(qr.log())
        with vesalius_node(tmp_path, port=node_port, config=config, data_dir=data_dir) as node:
            done = wait_for(lambda: finished(node, 1), PULL_TIMEOUT, "the pull job after the restart")
            assert study_states(done) == {s.study_uid: "processed" for s in series}, done
        assert instance_count(data_dir) == len(files)  # nothing missed
        assert qr.stores_sent(since=restart) == len(files) - before  # only what the spool lacked, once


def test_instances_per_second_spaces_the_c_move_requests(tmp_path: Path) -> None:
    node_port = free_port()
    series = [study(tmp_path / f"s{i}", "20250101", slices=3, seed=i) for i in range(4)]
    with dcmqrscp(tmp_path / "qr", [p for s in series for p in s.paths],
                  {"VESALIUS": ("127.0.0.1", node_port)}) as qr:
        config = sources_toml({**qr.table, "instances_per_second": 3})  # one 3-instance study a second
        with vesalius_node(tmp_path, port=node_port, config=config) as node:
            assert cli(node, "dcmqr").returncode == 0
            wait_for(lambda: finished(node, 1), PULL_TIMEOUT, "the pull job to finish")
        moves = sorted(qr.move_requests())
        assert len(moves) == 4
        most_in_a_second = max(sum(1 for t in moves if start <= t < start + 1.0) for start in moves)
        assert most_in_a_second <= 2, moves  # 1 at this rate; 4 without it would fit in a second
        assert qr.most_moves_at_once() == 1  # max_concurrent = 1


def test_a_source_that_does_not_answer_fails_the_job_with_the_reason(tmp_path: Path) -> None:
    with silent_listener() as port:
        config = sources_toml({"name": "mute", "ae_title": "MUTE", "host": "127.0.0.1", "port": port,
                               "timeout": 2})
        with vesalius_node(tmp_path, config=config) as node:
            assert cli(node, "mute", "--study-uid", "1.2.3").returncode == 0
            done = wait_for(lambda: finished(node, 1), 60, "the pull job to fail")
            assert done["state"] == "failed" and "did not answer within 2 s" in done["error"], done
            listed = cli(node, "--list")
            assert "failed" in listed.stdout and "did not answer within 2 s" in listed.stdout


def test_a_move_that_times_out_fails_each_study_with_the_reason(tmp_path: Path) -> None:
    """dcmqrscp answers the queries, but its C-STORE sub-operations go to a port that never
    answers: no C-MOVE answer comes within the source's timeout (and, dcmqrscp still busy with
    that, no C-FIND answer for the next study)."""
    series = [study(tmp_path / f"s{i}", "20250101", slices=2, seed=i) for i in range(2)]
    with silent_listener() as mute, dcmqrscp(tmp_path / "qr", [p for s in series for p in s.paths],
                                             {"VESALIUS": ("127.0.0.1", mute)}) as qr:
        with vesalius_node(tmp_path, config=sources_toml({**qr.table, "timeout": 2})) as node:
            assert cli(node, "dcmqr").returncode == 0
            done = wait_for(lambda: finished(node, 1), 120, "the pull job to finish")
            assert study_states(done) == {s.study_uid: "failed" for s in series}, done
            assert all("got no answer in 2 s" in s["reason"] for s in done["study_list"]), done
            assert any("C-MOVE got no answer" in s["reason"] for s in done["study_list"]), done
            assert done["error"] == "2 of 2 studies failed"


def test_unknown_sources_and_bad_queries_are_refused_over_http(tmp_path: Path) -> None:
    config = sources_toml({"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1})
    with vesalius_node(tmp_path, config=config) as node:
        assert post_json(node, "/pulls", {"source": "elsewhere"})[0] == 404
        assert post_json(node, "/pulls", {"source": "pacs", "query": {"date_from": "yesterday"}})[0] == 400
        assert post_json(node, "/pulls", {"source": "pacs"}, token=None)[0] == 401
        assert node.request("/pulls/7/pause", method="POST")[0] == 404


def pause_on_the_dashboard(node: NodeProcess) -> None:
    """The dashboard (Debian's Chromium, Playwright) lists the pull job with its study counts; its
    Pause button pauses it."""
    from playwright.sync_api import sync_playwright

    from tests.test_dashboard import CHROMIUM, CHROMIUM_FLAGS, WAIT_MS

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            tab = browser.new_page()
            tab.set_default_timeout(WAIT_MS)
            tab.goto(f"http://127.0.0.1:{node.http_port}/")
            tab.locator("#token").fill(node.token())
            tab.locator("#login-submit").click()
            row = tab.locator("#pulls tr[data-pull='1']")
            row.locator(".pull-studies").filter(has_text="queried 1").wait_for()
            row.get_by_role("button", name="Pause").click()
            tab.locator("#pulls tr.pull-paused").wait_for()
        finally:
            browser.close()


def test_retrieval_waits_for_its_window(tmp_path: Path) -> None:
    hour = datetime.now().hour
    closed = f"{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"  # two hours from now
    phantom = study(tmp_path / "s", "20250101")
    study_uid = phantom.study_uid
    with dcmqrscp(tmp_path / "qr", phantom.paths, {}) as qr:
        config = sources_toml({**qr.table, "window": closed})
        with vesalius_node(tmp_path, config=config) as node:
            assert cli(node, "dcmqr").returncode == 0
            queried = wait_for(lambda: (s := pull_state(node, 1))["studies"]["queried"] == 1 and s, 60,
                               "the query (which the window does not hold back)")
            assert queried["state"] == "running"
            pause_on_the_dashboard(node)
            assert pull_state(node, 1)["state"] == "paused"
            assert node.request("/pulls/1/resume", method="POST") == (200, {"pull": 1, "state": "running"})
            assert node.request("/pulls/1/cancel", method="POST") == (200, {"pull": 1, "state": "cancelled"})
            assert node.request("/pulls/1/resume", method="POST")[0] == 409
            assert study_states(pull_state(node, 1)) == {study_uid: "cancelled"}
            trail = [json.loads(line) for line in (node.data_dir / "audit.jsonl").read_text().splitlines()]
            actions = [(e["user"], e["details"]["command"], e["details"]["status"]) for e in trail
                       if e["event"] == "Operator Action"]
            assert actions == [(getpass.getuser(), "pull", 200), ("local", "pull pause", 200),
                                   ("local", "pull resume", 200), ("local", "pull cancel", 200),
                                   ("local", "pull resume", 409)], actions
        assert qr.move_requests() == []


def test_the_documented_sources_are_valid() -> None:
    """The commented [[sources]] examples of docs/vesalius.example.toml, uncommented, parse."""
    import tomllib

    from tests.conftest import ROOT

    text = (ROOT / "docs" / "vesalius.example.toml").read_text()
    block = text[text.index("# [[sources]]"):text.index("# Which completed series become jobs.")]
    lines = [line.removeprefix("# ") for line in block.splitlines() if line.startswith("# ")]
    config = parse_config(tomllib.loads("\n".join(lines)))
    assert [(s.kind, s.name) for s in config.sources] == [("dimse", "pacs"), ("dicomweb", "web")]


def test_the_command_names_what_is_wrong(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(sources_toml({"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}))

    def pull(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vesalius.node.cli", "pull", *args, "--config",
                               str(config), "--data-dir", str(tmp_path / "data")],
                              capture_output=True, text=True, timeout=60)

    missing = pull("pacs")
    assert missing.returncode == 2 and "no Vesalius database" in missing.stderr  # none made by mistake
    assert not (tmp_path / "data").exists()
    Store(tmp_path / "data")
    unknown = pull("elsewhere")
    assert unknown.returncode == 2 and "no source 'elsewhere'" in unknown.stderr and "pacs" in unknown.stderr
    bad = pull("pacs", "--from", "2025-13-01")
    assert bad.returncode == 2 and "--from: expected a date" in bad.stderr, bad.stderr
    assert pull("--show", "5").returncode == 1
    assert pull("pacs", "--json").returncode == 0 and pull("--list", "--json").stdout.count('"id"') == 1


def test_evaluate_against_scores_each_study_and_writes_the_cohort_report(tmp_path: Path) -> None:
    """The archive holds a CT study and its "radiologist's" SEG (here the same model's, made
    offline: every structure must score Dice 1); the pull scores the node's result against it."""
    from pydicom.uid import generate_uid

    from vesalius.node.pipeline import OUTPUT_FILES, run_pipeline

    node_port = free_port()
    series = study(tmp_path / "ct", "20250310", slices=8)
    run_pipeline(series.paths, tmp_path / "offline", "builtin_ct")
    reference = pydicom.dcmread(tmp_path / "offline" / OUTPUT_FILES["seg"])
    reference.SeriesDescription = "Radiologist contours"
    reference.SeriesInstanceUID, reference.SOPInstanceUID = generate_uid(), generate_uid()
    reference.file_meta.MediaStorageSOPInstanceUID = reference.SOPInstanceUID
    reference.save_as(tmp_path / "reference.dcm", enforce_file_format=True)
    with archive(tmp_path, node_port) as orthanc:
        orthanc.upload([*series.paths, tmp_path / "reference.dcm"])
        config = sources_toml({"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                               "port": orthanc.dicom_port})
        with vesalius_node(tmp_path, port=node_port, config=config) as node:
            result = cli(node, "pacs", "--modality", "CT", "--level", "series",
                         "--evaluate-against", "radiologist*")
            assert result.returncode == 0, result.stderr
            done = wait_for(lambda: finished(node, 1), PULL_TIMEOUT, "the pull job to finish")
            row = done["study_list"][0]
            assert row["state"] == "processed" and "evaluated" in row["reason"], row
            assert row["series"] == 2  # the CT series and its reference, which came along
            jobs_done = node.jobs()
            assert len(jobs_done) == 1 and jobs_done[0]["evaluation"]["reference"].startswith("series ")
            report = json.loads((node.data_dir / "pulls" / "1" / "cohort.json").read_text())
            assert len(report["cases"]) == 1 and report["structures"]
            scored = [s for s in report["structures"] if s["dice"] is not None]
            assert scored and all(s["dice"]["mean"] == pytest.approx(1.0) for s in scored), report

            assert done["report"] == str(node.data_dir.resolve() / "pulls" / "1" / "cohort.html")
            assert "<html" in Path(done["report"]).read_text()
