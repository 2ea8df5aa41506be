"""Orthanc integration against a real Orthanc (Debian orthanc + orthanc-python + orthanc-dicomweb)
running our plugin, and a real `vesalius serve`, both on free loopback ports.

Orthanc REST upload -> stable series -> plugin filter -> C-STORE to the node -> SEG, Surface
Segmentation and SR back into the same Orthanc study, by C-STORE or by STOW-RS (Orthanc's DICOMweb
plugin). A study the filter does not match goes by the "Send to Vesalius" route instead; results
stored in Orthanc are never forwarded again. Plus the STOW-RS client's error mapping, the node's
?study= listings, the plugin's settings validation and its type check.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest

from tests.conftest import ROOT, free_port
from tests.orthanc_peer import HttpError, OrthancProcess, orthanc_server, read_commented_json
from tests.peers import NodeProcess, vesalius_node, wait_for
from tests.phantoms import PhantomSeries, write_phantom_series
from tests.test_e2e import CHEST, COMPREHENSIVE_3D_SR, SEG, SURFACE
from vesalius.node.destinations import DeliveryError
from vesalius.node.destinations.dicomweb import DicomwebDestination, multipart_related
from vesalius.node.store import SeriesInfo, Store

RESULT_CLASSES = {SEG, SURFACE, COMPREHENSIVE_3D_SR}
RESULT_TIMEOUT = 150  # s: two small series through the pipeline on 2 shared cores


@dataclass
class Stack:
    orthanc: OrthancProcess
    node: NodeProcess
    auto: PhantomSeries    # matches the filter; results come back by C-STORE
    button: PhantomSeries  # does not match the filter ("Abdomen"); sent by the button; back by STOW-RS
    scout: PhantomSeries   # "Chest" but too few instances

    def study(self, phantom: PhantomSeries) -> str:
        study = self.orthanc.study_id(phantom.study_uid)
        assert study, f"study {phantom.study_uid} not in Orthanc"
        return study

    def results(self, phantom: PhantomSeries) -> dict[str, dict]:
        """The result series Orthanc holds in the phantom's study, by SOP class."""
        series = self.orthanc.series_of(self.study(phantom))
        return {s["First"].get("SOPClassUID"): s for s in series
                if s["First"].get("SOPClassUID") in RESULT_CLASSES}

    def status(self, phantom: PhantomSeries) -> dict:
        return self.orthanc.get(f"/vesalius/status/{self.study(phantom)}")

    def decision(self, phantom: PhantomSeries, series_id: str) -> dict | None:
        return next((d for d in self.status(phantom)["forwarding"] if d["series"] == series_id), None)


def node_config(orthanc_dicom_port: int, orthanc_http_port: int) -> str:
    return f"""
[[destinations]]
name = "orthanc"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc_dicom_port}
timeout = 10.0

[[destinations]]
name = "orthanc-web"
kind = "dicomweb"
url = "http://127.0.0.1:{orthanc_http_port}/dicom-web/"
timeout = 30.0

[[rules]]
name = "dimse"
series_description = "^(?!.*stow)"
destinations = ["orthanc"]

[[rules]]
name = "stow"
series_description = "stow"
destinations = ["orthanc-web"]

[retry]
base_delay = 1.0
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("orthanc")
    node_port, node_http = free_port(), free_port()
    orthanc_http, orthanc_dicom = free_port(), free_port()
    vesalius = {"Modality": "vesalius", "NodeHttpUrl": f"http://127.0.0.1:{node_http}",
                "NodeHttpTokenFile": str(tmp / "node-data" / "http.token"), "AutoForward": True,
                "Filter": {"Modalities": ["CT"], "SeriesDescription": "chest", "MinInstances": 10}}
    phantoms = {
        "auto": dict(series_description="Chest auto", shape=(30, 96, 96), seed=1),
        "button": dict(series_description="Abdomen stow", shape=(30, 96, 96), seed=2),
        "scout": dict(series_description="Chest scout", shape=(4, 48, 48), seed=3),
    }
    series = {name: write_phantom_series(tmp / name, spacing=(3.0, 2.0, 2.0), objects=CHEST, **kwargs)
              for name, kwargs in phantoms.items()}
    with orthanc_server(tmp, vesalius=vesalius, http_port=orthanc_http, dicom_port=orthanc_dicom,
                        modalities={"vesalius": ["VESALIUS", "127.0.0.1", node_port]}) as orthanc, \
            vesalius_node(tmp, port=node_port, http_port=node_http,
                          config=node_config(orthanc_dicom, orthanc_http)) as node:
        for phantom in series.values():
            orthanc.upload(phantom.paths)
        yield Stack(orthanc, node, series["auto"], series["button"], series["scout"])


def test_matching_series_is_forwarded_and_results_come_back_into_the_study(stack: Stack) -> None:
    results = wait_for(lambda: (r := stack.results(stack.auto)) and set(r) == RESULT_CLASSES and r,
                       RESULT_TIMEOUT, "SEG, Surface Segmentation and SR in the auto-forwarded study")
    source = next(s for s in stack.orthanc.series_of(stack.study(stack.auto))
                  if s["MainDicomTags"]["SeriesInstanceUID"] == stack.auto.series_uid)
    for sop_class, series in results.items():
        first = series["First"]
        assert first["Manufacturer"] == "Vesalius", sop_class
        assert first["StudyInstanceUID"] == stack.auto.study_uid
        assert series["ParentStudy"] == source["ParentStudy"]
        assert series["MainDicomTags"]["SeriesInstanceUID"] != stack.auto.series_uid
    # it went by the plugin's auto-forward (an Orthanc job to the node's modality), from Orthanc's AE
    decision = stack.decision(stack.auto, source["ID"])
    assert decision is not None and decision["decision"] == "sent" and decision["via"] == "auto"
    assert stack.orthanc.get(f"/jobs/{decision['job']}")["Type"] == "DicomModalityStore"
    received = stack.node.get(f"/series?study={stack.auto.study_uid}")
    assert [(s["series_instance_uid"], s["calling_ae"], s["instances"]) for s in received] == \
        [(stack.auto.series_uid, "ORTHANC", 30)]
    # the SEG in Orthanc is the node's object, byte for byte readable and referencing the source
    seg_instance = results[SEG]["Instances"][0]
    seg = pydicom.dcmread(io.BytesIO(stack.orthanc.request("GET", f"/instances/{seg_instance}/file",
                                                            raw=True)))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == stack.auto.series_uid


def test_series_outside_the_filter_are_not_forwarded(stack: Stack) -> None:
    for phantom, reason in ((stack.button, "series description 'Abdomen stow' does not match 'chest'"),
                            (stack.scout, "4 instances, fewer than 10")):
        series_id = stack.orthanc.series_of(stack.study(phantom))[0]["ID"]
        decision = wait_for(lambda p=phantom, s=series_id: stack.decision(p, s), 30,
                            f"the plugin's decision on {phantom.series_uid}")
        assert (decision["decision"], decision["via"], decision["reason"]) == ("skipped", "auto", reason)
    assert stack.node.get(f"/series?study={stack.scout.study_uid}") == []


def test_button_route_sends_an_unmatched_study_and_results_come_back_by_stow(stack: Stack) -> None:
    study = stack.study(stack.button)
    series_id = stack.orthanc.series_of(study)[0]["ID"]
    wait_for(lambda: stack.decision(stack.button, series_id), 30, "the auto-forward decision (skipped)")
    assert stack.node.get(f"/series?study={stack.button.study_uid}") == []
    answer = stack.orthanc.post(f"/vesalius/send/{study}")
    assert answer["sent"] == [series_id] and answer["skipped"] == {} and answer["modality"] == "vesalius"
    results = wait_for(lambda: (r := stack.results(stack.button)) and set(r) == RESULT_CLASSES and r,
                       RESULT_TIMEOUT, "SEG, Surface Segmentation and SR in the study sent by the button")
    assert all(s["First"]["Manufacturer"] == "Vesalius" for s in results.values())
    deliveries = wait_for(lambda: [d for d in stack.node.get(f"/deliveries?study={stack.button.study_uid}")
                                   if d["state"] == "done"], 30, "the STOW-RS delivery to be done")
    assert [d["destination"] for d in deliveries] == ["orthanc-web"]
    # and by STOW-RS indeed: Orthanc records the origin of each instance
    seg_instance = results[SEG]["Instances"][0]
    assert stack.orthanc.get(f"/instances/{seg_instance}/metadata/Origin") in ("RestApi", "Plugins")


def test_results_in_orthanc_are_never_forwarded_again(stack: Stack) -> None:
    for phantom in (stack.auto, stack.button):
        results = wait_for(lambda p=phantom: (r := stack.results(p)) and set(r) == RESULT_CLASSES and r,
                           RESULT_TIMEOUT, "the results in Orthanc")
        for series in results.values():
            decision = wait_for(lambda p=phantom, s=series["ID"]: stack.decision(p, s), 30,
                                "the plugin's decision on a result series")
            assert decision["decision"] == "skipped"
            assert decision["reason"] == "a Vesalius result (Manufacturer Vesalius)"
        # the node has still seen only the source series of that study
        assert [s["series_instance_uid"] for s in stack.node.get(f"/series?study={phantom.study_uid}")] \
            == [phantom.series_uid]
    # the button refuses a result series too
    seg_series = stack.results(stack.auto)[SEG]["ID"]
    with pytest.raises(HttpError) as refused:
        stack.orthanc.post(f"/vesalius/send/{seg_series}")
    assert refused.value.code == 409
    assert "Vesalius result" in json.loads(refused.value.body)["skipped"][seg_series]


def test_status_route_shows_what_the_node_received_and_did(stack: Stack) -> None:
    def finished() -> dict | None:
        status = stack.status(stack.auto)
        node = status["node"]
        done = node["reachable"] and [j["state"] for j in node["jobs"]] == ["done"] and \
            [d["state"] for d in node["deliveries"]] == ["done"]
        return status if done else None

    status = wait_for(finished, RESULT_TIMEOUT, "the node's job and delivery for the auto study")
    assert status["study_instance_uid"] == stack.auto.study_uid
    assert [s["series_instance_uid"] for s in status["node"]["series"]] == [stack.auto.series_uid]
    assert status["node"]["jobs"][0]["series_instance_uid"] == stack.auto.series_uid
    assert status["node"]["deliveries"][0]["destination"] == "orthanc"
    job = status["node"]["jobs"][0]
    assert job["words"] == "done" and job["page"] == f"http://127.0.0.1:{stack.node.http_port}/#/job/{job['id']}"
    assert {d["decision"] for d in status["forwarding"]} == {"sent", "skipped"}
    # a series id gives its study's status
    series_id = stack.orthanc.series_of(stack.study(stack.auto))[0]["ID"]
    assert stack.orthanc.get(f"/vesalius/status/{series_id}")["study"] == status["study"]


def test_routes_answer_errors_clearly(stack: Stack) -> None:
    with pytest.raises(HttpError) as missing:
        stack.orthanc.post("/vesalius/send/0123abcd-0123abcd-0123abcd-0123abcd-0123abcd")
    assert missing.value.code == 404 and "no study or series" in json.loads(missing.value.body)["error"]
    with pytest.raises(HttpError) as wrong_method:
        stack.orthanc.get(f"/vesalius/send/{stack.study(stack.auto)}")
    assert wrong_method.value.code == 405
    with pytest.raises(HttpError) as missing_status:
        stack.orthanc.get("/vesalius/status/0123abcd-0123abcd-0123abcd-0123abcd-0123abcd")
    assert missing_status.value.code == 404


def test_explorer_has_the_send_button(stack: Stack) -> None:
    script = stack.orthanc.request("GET", "/plugins/explorer.js")
    assert "Send to Vesalius" in script and "../vesalius/send/" in script


def test_study_page_shows_the_nodes_jobs_linked_to_the_dashboard(stack: Stack) -> None:
    from playwright.sync_api import sync_playwright

    from tests.test_dashboard import CHROMIUM, CHROMIUM_FLAGS

    study = stack.study(stack.auto)
    job = wait_for(lambda: next((j for j in stack.status(stack.auto)["node"].get("jobs", [])
                                 if j["state"] == "done"), None), RESULT_TIMEOUT, "the auto study's job")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{stack.orthanc.url}/app/explorer.html#study?uuid={study}")
            link = page.locator("#vesalius-study-status .vesalius-job a")
            link.wait_for()
            assert link.get_attribute("href") == job["page"] and link.inner_text() == f"job #{job['id']}"
            assert "done" in page.locator("#vesalius-study-status").inner_text()
        finally:
            browser.close()


def test_bad_settings_stop_orthanc_with_a_message_naming_the_key(tmp_path: Path) -> None:
    bad = {"Modality": "vesalius", "Filter": {"Modalities": ["CT"], "Colour": "red"}}
    with pytest.raises(AssertionError) as stopped:
        with orthanc_server(tmp_path, vesalius=bad, modalities={"vesalius": ["VESALIUS", "127.0.0.1", 1]}):
            pass
    assert "Vesalius.Filter.Colour: unknown key" in str(stopped.value)
    with pytest.raises(AssertionError) as stopped:
        with orthanc_server(tmp_path, vesalius={"Modality": "nowhere"},
                            modalities={"vesalius": ["VESALIUS", "127.0.0.1", 1]}):
            pass
    assert "Vesalius.Modality: 'nowhere' is not in DicomModalities" in str(stopped.value)


def test_documented_example_configuration_loads_the_plugin(tmp_path: Path) -> None:
    example = read_commented_json(ROOT / "orthanc" / "orthanc.json")
    node_port, node_http = free_port(), free_port()
    vesalius = {**example["Vesalius"], "NodeHttpUrl": f"http://127.0.0.1:{node_http}"}
    with orthanc_server(tmp_path, base=example, vesalius=vesalius,
                        modalities={"vesalius": ["VESALIUS", "127.0.0.1", node_port]}) as orthanc:
        wait_for(lambda: "Vesalius plugin: modality 'vesalius', auto-forward on" in orthanc.log(), 10,
                 "the plugin's start-up line")
        assert "MinInstances=20" not in orthanc.log()  # the filter is shown as parsed
        assert "min_instances=20" in orthanc.log()
        status = wait_for(lambda: orthanc.get("/plugins/python"), 10, "the Python plugin")
        assert status["ID"] == "python"


def test_plugin_type_checks_against_the_sdk_stub() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--python-version", "3.11", "--no-incremental",
         str(ROOT / "orthanc" / "vesalius_plugin.py")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "MYPYPATH": str(ROOT / "orthanc" / "stubs")})
    assert result.returncode == 0, result.stdout + result.stderr


# --- the STOW-RS client against a scripted HTTP server ------------------------------------------------


class Scripted:
    """An HTTP server answering every POST with the next (status, body) and keeping the requests."""

    def __init__(self, answers: list[tuple[int, bytes]]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                scripted.requests.append((self.path, dict(self.headers), body))
                status, answer = scripted.answers.pop(0)
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def destination(self, path: str = "/dicom-web", userinfo: str = "") -> DicomwebDestination:
        url = f"http://{userinfo}127.0.0.1:{self.server.server_port}{path}"
        return DicomwebDestination("web", url, timeout=5.0)


@pytest.fixture
def dicom_files(tmp_path: Path) -> list[Path]:
    return write_phantom_series(tmp_path / "ct", shape=(2, 16, 16)).paths


def test_stow_posts_multipart_related_to_studies(dicom_files: list[Path]) -> None:
    server = Scripted([(200, b'{"00081199": {"vr": "SQ", "Value": [{}, {}]}}')])
    try:
        server.destination(userinfo="user:s%40cret@").send(dicom_files)
    finally:
        server.server.shutdown()
    path, headers, body = server.requests[0]
    assert path == "/dicom-web/studies"
    assert headers["Content-Type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert headers["Authorization"] == "Basic dXNlcjpzQGNyZXQ="  # user:s@cret
    boundary = headers["Content-Type"].rsplit("boundary=", 1)[1]
    parts = body.split(f"--{boundary}".encode())
    assert len(parts) == 4 and parts[-1] == b"--\r\n"
    for part, path_ in zip(parts[1:3], dicom_files, strict=True):
        head, _, content = part.partition(b"\r\n\r\n")
        assert b"Content-Type: application/dicom" in head
        assert content[:-2] == path_.read_bytes()


@pytest.mark.parametrize(("status", "body", "permanent"), [
    (400, b"bad request", True),
    (404, b"", True),
    (409, b'{"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [49442]}}]}}', True),
    (408, b"", False),
    (429, b"", False),
    (500, b"", False),
    (503, b"", False),
    (200, b'{"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [272]}}]}}', True),
    (202, b'{"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [42752]}}]}}', False),
])
def test_stow_failures_map_to_retry_or_give_up(dicom_files: list[Path], status: int, body: bytes,
                                               permanent: bool) -> None:
    server = Scripted([(status, body)])
    try:
        with pytest.raises(DeliveryError) as failed:
            server.destination().send(dicom_files)
    finally:
        server.server.shutdown()
    assert failed.value.permanent is permanent
    assert "s%40cret" not in str(failed.value)


def test_stow_to_a_closed_port_is_transient(dicom_files: list[Path]) -> None:
    destination = DicomwebDestination("web", f"http://127.0.0.1:{free_port()}/dicom-web", timeout=5.0)
    with pytest.raises(DeliveryError) as failed:
        destination.send(dicom_files)
    assert failed.value.permanent is False


def test_multipart_related_ends_with_the_closing_boundary() -> None:
    body, content_type = multipart_related([b"A", b"B"])
    boundary = content_type.rsplit("=", 1)[1]
    assert body.endswith(f"\r\n--{boundary}--\r\n".encode()) and body.count(boundary.encode()) == 3


# --- the node's ?study= listings --------------------------------------------------------------------


def test_listings_filter_by_study(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for study, series in (("1.2.1", "1.2.1.1"), ("1.2.1", "1.2.1.2"), ("1.2.2", "1.2.2.1")):
        info = SeriesInfo(series, study, "CT", "1.2.840.10008.5.1.4.1.1.2", "", "", "")
        store.store_instance(info, f"{series}.1", b"DICM", "ORTHANC")
        with store.transaction() as db:
            job = store.add_job(db, series, "ct", "builtin_ct", ["pacs"])
        store.finish_job(job, tmp_path, {}, ["pacs"])
    one_study = store.listing("series", study="1.2.1")
    assert {s["series_instance_uid"] for s in one_study} == {"1.2.1.1", "1.2.1.2"}
    assert [j["series_instance_uid"] for j in store.listing("jobs", study="1.2.2")] == ["1.2.2.1"]
    assert len(store.listing("deliveries", study="1.2.1")) == 2
    assert store.listing("series", study="9.9") == [] and len(store.listing("series")) == 3
