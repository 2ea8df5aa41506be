"""Longitudinal volumes: a live node keeps each structure's volume per pseudonymous patient, the SR
of a later study carries the prior value, its date and the change, and /jobs/{id} the history.

Three phantom studies go in over DICOM (DCMTK storescu) one after the other: patient A on
2025-01-01, patient A again on 2026-01-01 with a bigger spine, and patient B on 2026-01-01.
"""

from __future__ import annotations

import io
import json
import re
import sqlite3
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests.dicom_checks import assert_dciodvfy_clean
from tests.object_checks import sr_problems
from tests.peers import NodeProcess, storescu, vesalius_node, wait_for
from tests.phantoms import Cylinder, PhantomSeries, write_phantom_series
from vesalius.dicom_out.sr import PRIOR_VOLUME, PRIVATE_SCHEME, STUDY_DATE, VOLUME, VOLUME_CHANGE

BODY = Cylinder((0, 0, 0), (0, 0, 1), 40, 60, 40)
PATIENT_A, PATIENT_B = "LONGPAT-A", "LONGPAT-B"
FIRST_DATE, LATER_DATE = "20250101", "20260101"


def spine(radius: float) -> Cylinder:
    return Cylinder((0, 20, 0), (0, 0, 1), radius, 50, 700)


def phantom(folder: Path, patient_id: str, study_date: str, spine_radius: float) -> PhantomSeries:
    series = write_phantom_series(folder, objects=[BODY, spine(spine_radius)], patient_id=patient_id,
                                  series_description="Longitudinal phantom")
    for path in series.paths:  # the phantom writer dates every study 2026-01-01
        ds = pydicom.dcmread(path)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
        ds.save_as(path, enforce_file_format=True)
    return series


@dataclass
class Run:
    node: NodeProcess
    jobs: dict[str, dict]  # first | later | other -> /jobs/{id}
    srs: dict[str, pydicom.Dataset]
    sr_paths: dict[str, Path]
    history_rows: list[dict]


def _file(node: NodeProcess, job_id: int, name: str) -> bytes:
    request = urllib.request.Request(f"http://127.0.0.1:{node.http_port}/jobs/{job_id}/files/{name}",
                                     headers={"Authorization": f"Bearer {node.token()}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return bytes(response.read())


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("longitudinal")
    studies = {"first": phantom(tmp / "first", PATIENT_A, FIRST_DATE, 8),
               "later": phantom(tmp / "later", PATIENT_A, LATER_DATE, 12),
               "other": phantom(tmp / "other", PATIENT_B, LATER_DATE, 12)}
    with vesalius_node(tmp) as node:
        jobs, srs, sr_paths = {}, {}, {}
        for name, series in studies.items():  # in turn: a prior must be recorded before the next job
            storescu(series.paths, node.port)

            def done(uid: str = series.series_uid) -> dict | None:
                found = [j for j in node.jobs() if j["series_instance_uid"] == uid]
                if found and found[0]["state"] == "failed":
                    raise AssertionError(f"job failed: {found[0]}\n{node.log()[-3000:]}")
                return found[0] if found and found[0]["state"] == "done" else None

            job = wait_for(done, 180, f"the {name} study's job")
            jobs[name] = node.get(f"/jobs/{job['id']}")
            sr_paths[name] = tmp / f"{name}-sr.dcm"
            sr_paths[name].write_bytes(_file(node, job["id"], "sr.dcm"))
            srs[name] = pydicom.dcmread(io.BytesIO(sr_paths[name].read_bytes()))
        jobs = {name: node.get(f"/jobs/{job['id']}") for name, job in jobs.items()}  # histories now
        with sqlite3.connect(node.data_dir / "vesalius.sqlite") as db:
            db.row_factory = sqlite3.Row
            rows = [dict(r) for r in db.execute("SELECT * FROM volume_history")]
        yield Run(node, jobs, srs, sr_paths, rows)


def _code(item: pydicom.Dataset) -> tuple[str, str]:
    concept = item.ConceptNameCodeSequence[0]
    return str(concept.CodingSchemeDesignator), str(concept.CodeValue)


def _key(code: object) -> tuple[str, str]:
    return str(code.scheme_designator), str(code.value)  # type: ignore[attr-defined]


def numbers_by_finding(sr: pydicom.Dataset) -> dict[str, dict[tuple[str, str], pydicom.Dataset]]:
    """Per measurement group (by its Tracking Identifier text), its NUM items by concept."""
    found: dict[str, dict[tuple[str, str], pydicom.Dataset]] = {}
    for container in sr.ContentSequence:
        for group in getattr(container, "ContentSequence", []):
            items = getattr(group, "ContentSequence", [])
            names = [str(i.TextValue) for i in items if i.ValueType == "TEXT"]
            nums = {_code(i): i for i in items if i.ValueType == "NUM"}
            if names and nums:
                found.setdefault(names[0], {}).update(nums)
    return found


def _value(item: pydicom.Dataset) -> float:
    return float(item.MeasuredValueSequence[0].NumericValue)


def test_later_sr_carries_the_prior_volume_its_date_and_the_change(run: Run) -> None:
    first = {s["name"]: s for s in run.jobs["first"]["summary"]["structures"]}
    later = {s["name"]: s for s in run.jobs["later"]["summary"]["structures"]}
    assert later["bone"]["volume_ml"] > first["bone"]["volume_ml"]  # the spine grew
    groups = numbers_by_finding(run.srs["later"])
    assert "Bone" in groups and "Body" in groups
    for label, name in (("Bone", "bone"), ("Body", "body")):
        items = groups[label]
        prior = items[_key(PRIOR_VOLUME)]
        assert _value(prior) == pytest.approx(first[name]["volume_ml"], abs=0.05)
        [date] = [i for i in prior.ContentSequence if i.ValueType == "DATE"]
        assert _code(date) == _key(STUDY_DATE) and str(date.Date) == FIRST_DATE
        assert date.RelationshipType == "HAS PROPERTIES"
        assert _value(items[_key(VOLUME)]) == pytest.approx(later[name]["volume_ml"], abs=0.05)
        change = _value(items[_key(VOLUME_CHANGE)])
        assert change == pytest.approx(later[name]["volume_ml"] - first[name]["volume_ml"], abs=0.11)
    assert _value(groups["Bone"][_key(VOLUME_CHANGE)]) > 0
    [scheme] = run.srs["later"].CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == PRIVATE_SCHEME


def test_the_sr_with_priors_passes_dciodvfy_and_our_tree_checks(run: Run) -> None:
    assert_dciodvfy_clean(run.sr_paths["later"])
    seg = pydicom.dcmread(io.BytesIO(_file(run.node, run.jobs["later"]["id"], "seg.dcm")))
    assert sr_problems(run.srs["later"], seg) == []


def test_no_prior_for_a_first_study_or_another_patient(run: Run) -> None:
    for name in ("first", "other"):
        groups = numbers_by_finding(run.srs[name])
        assert groups and all(_key(PRIOR_VOLUME) not in items and _key(VOLUME_CHANGE) not in items
                              for items in groups.values()), name
        assert "CodingSchemeIdentificationSequence" not in run.srs[name]


def test_job_page_returns_the_patients_history(run: Run) -> None:
    first, later, other = (run.jobs[n] for n in ("first", "later", "other"))
    history = {h["structure"]: h for h in later["history"]}
    bone = history["bone"]["points"]
    assert [p["study_date"] for p in bone] == [FIRST_DATE, LATER_DATE]
    assert [p["job_id"] for p in bone] == [first["id"], later["id"]]
    volumes = {s["name"]: s["volume_ml"] for s in first["summary"]["structures"]}
    assert bone[0]["volume_ml"] == volumes["bone"]
    # the first study's page shows the same (whole) history; the other patient's only its own
    assert first["history"] == later["history"]
    assert all(len(h["points"]) == 1 and h["points"][0]["job_id"] == other["id"] for h in other["history"])


def test_no_patient_identifier_is_stored_or_answered(run: Run) -> None:
    assert run.history_rows
    stored = json.dumps(run.history_rows)
    answered = json.dumps([job["history"] for job in run.jobs.values()])
    for identifier in (PATIENT_A, PATIENT_B, "Phantom^Test", "Phantom", "ACC0001"):
        assert identifier not in stored and identifier not in answered
    patients = {row["job_id"]: row["patient"] for row in run.history_rows}
    first, later, other = (patients[run.jobs[n]["id"]] for n in ("first", "later", "other"))
    assert first == later != other and first.startswith("VES")
    with sqlite3.connect(run.node.data_dir / "vesalius.sqlite") as db:  # the de-identification pseudonym
        mapped = dict(db.execute("SELECT original, pseudonym FROM deid_map WHERE kind='patient_id'"))
    assert mapped[PATIENT_A] == first and mapped[PATIENT_B] == other


def test_job_page_plots_the_history_in_the_browser(run: Run) -> None:
    from playwright.sync_api import sync_playwright

    from tests.test_dashboard import CHROMIUM, CHROMIUM_FLAGS, WAIT_MS

    url = f"http://127.0.0.1:{run.node.http_port}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            tab = browser.new_page()
            tab.set_default_timeout(WAIT_MS)
            errors: list[str] = []
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.goto(url + "/")
            tab.locator("#token").fill(run.node.token())
            tab.locator("#login-submit").click()
            tab.goto(f"{url}/#/job/{run.jobs['later']['id']}")
            tab.locator("#history svg.history-plot").first.wait_for()
            plots = tab.locator("#history figure")
            structures = {h["structure"] for h in run.jobs["later"]["history"]}
            assert plots.count() == len(structures)
            for i in range(plots.count()):  # two studies: two points, this job's filled
                assert plots.nth(i).locator("circle").count() == 2
            bone = tab.locator("#history figcaption", has_text="bone").inner_text()
            first_bone = next(s for s in run.jobs["first"]["summary"]["structures"] if s["name"] == "bone")
            shown = re.search(rf"{FIRST_DATE} ([0-9.]+) ml", bone)
            assert shown is not None and float(shown[1]) == first_bone["volume_ml"], bone
            # the other patient has one study: no plot
            tab.goto(f"{url}/#/job/{run.jobs['other']['id']}")
            tab.locator("#measurements").wait_for()
            assert tab.locator("#history").count() == 0
            assert not errors, errors
        finally:
            browser.close()


def test_switched_off_the_node_records_nothing_and_the_sr_has_no_prior(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("longitudinal-off")
    studies = [phantom(tmp / "first", PATIENT_A, FIRST_DATE, 8),
               phantom(tmp / "later", PATIENT_A, LATER_DATE, 12)]
    with vesalius_node(tmp, config="[learning]\nlongitudinal = false\n") as node:
        for series in studies:
            storescu(series.paths, node.port)
            uid = series.series_uid
            wait_for(lambda uid=uid: any(j["series_instance_uid"] == uid and j["state"] == "done"
                                         for j in node.jobs()), 180, "the job")
        later = next(j for j in node.jobs() if j["series_instance_uid"] == studies[1].series_uid)
        sr = pydicom.dcmread(io.BytesIO(_file(node, later["id"], "sr.dcm")))
        assert node.get(f"/jobs/{later['id']}")["history"] == []
    groups = numbers_by_finding(sr)
    assert groups and all(_key(PRIOR_VOLUME) not in items for items in groups.values())
    with sqlite3.connect(node.data_dir / "vesalius.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM volume_history").fetchone() == (0,)
