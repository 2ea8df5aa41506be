"""Study-level routing in process: rules and preferences on series facts, facts read from real
headers, and series/study completion with an injected clock over a real Store (SQLite + spool)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pydicom
import pytest

from tests.earlier_schema import EARLIER_SQLITE_SCHEMA
from tests.study_phantoms import ct_study, reconstruction
from tests.test_volume import write_enhanced
from vesalius.dicom_out.identity import Algorithm, derived_uid
from vesalius.node.config import ConfigError, Rule, parse_config
from vesalius.node.routing import SeriesFacts, rule_matches, select_series, why_not
from vesalius.node.series import complete_due_series, read_facts, result_key, select_due_studies
from vesalius.node.store import SeriesInfo, Store

CT = "1.2.840.10008.5.1.4.1.1.2"
DEFAULT = Rule(name="ct")


def facts(uid: str, **values) -> SeriesFacts:
    base = dict(modality="CT", sop_class_uid=CT, image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                orientation="axial", slice_thickness=1.0, pixel_spacing=0.7, slices=300,
                coverage_mm=299.0, kernel="B30f", calling_ae="SCANNER", manufacturer="SIEMENS")
    return SeriesFacts(series_instance_uid=uid, **{**base, **values})


EXAM = [
    facts("1.1", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientation="coronal", slices=1,
          coverage_mm=0, kernel="T20f"),
    facts("1.2", slice_thickness=5.0, slices=60, kernel="B30f"),
    facts("1.3", slice_thickness=1.0, slices=300, kernel="B30f"),
    facts("1.4", slice_thickness=1.0, slices=300, kernel="B70f"),
    facts("1.5", image_type=("DERIVED", "SECONDARY", "REFORMATTED"), orientation="coronal"),
    facts("1.6", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.67", image_type=()),  # dose SR
    facts("1.7", manufacturer="Vesalius", image_type=("DERIVED", "PRIMARY")),
]


def reasons(selection) -> dict[str, str]:
    return {d.series_instance_uid: d.reason for d in selection.decisions}


def test_default_rule_chooses_the_thin_soft_tissue_axial_and_says_why() -> None:
    selection = select_series(DEFAULT, EXAM)
    assert selection.chosen == ("1.3",)
    why = reasons(selection)
    assert why["1.3"] == "chosen: 1 mm axial, 300 slices, 299 mm, kernel B30f"
    assert why["1.1"] == "skipped: ImageType ORIGINAL\\PRIMARY\\LOCALIZER"
    assert why["1.5"] == "skipped: ImageType DERIVED\\SECONDARY\\REFORMATTED"
    assert why["1.4"].startswith("skipped: 1 mm axial") and why["1.4"].endswith("higher on soft_kernel")
    assert why["1.2"].endswith("ranks higher on thinnest")
    assert why["1.6"].startswith("skipped: not an image series")
    assert why["1.7"] == "skipped: our own output"


def test_select_all_takes_every_matching_series() -> None:
    selection = select_series(Rule(name="ct", select="all"), EXAM)
    assert selection.chosen == ("1.2", "1.3", "1.4")


def test_preferences_and_conditions_are_the_rules() -> None:
    lung = Rule(name="lung", prefer=("thinnest",), kernel="B7", exclude_image_type=())
    assert select_series(lung, EXAM).chosen == ("1.4",)
    thick = Rule(name="thick", prefer=("thickest",))
    assert select_series(thick, EXAM).chosen == ("1.2",)
    enough = Rule(name="n", min_slices=400)
    assert select_series(enough, EXAM).chosen == ()
    assert why_not(enough, EXAM[2]) == "300 slices < min_slices 400"
    assert why_not(Rule(name="c", min_coverage_mm=350), EXAM[2]) == "299 mm covered < min_coverage_mm 350"
    assert why_not(Rule(name="t", max_slice_thickness=3), EXAM[1]) == \
        "5 mm slices > max_slice_thickness 3"
    assert why_not(Rule(name="c", contrast="with"), EXAM[2]) == "without contrast"
    assert rule_matches(Rule(name="c", contrast="with"), facts("2", contrast=True))
    assert why_not(Rule(name="o", orientation=("axial",)), EXAM[4]).startswith("ImageType")
    assert why_not(Rule(name="o", orientation=("axial",), exclude_image_type=()), EXAM[4]) == \
        "coronal orientation"
    assert why_not(Rule(name="mr", modality=("MR",)), EXAM[2]) == "modality CT"
    # only a coronal original: the preference for axial does not exclude it
    assert select_series(DEFAULT, [facts("3.1", orientation="coronal")]).chosen == ("3.1",)


def test_rule_keys_are_validated() -> None:
    rule = parse_config({"rules": [{"name": "mr", "modality": "MR", "select": "all", "trigger": "series",
                                    "orientation": ["axial"], "min_slices": 20, "kernel": "B3",
                                    "prefer": ["newest"], "image_type": ["original"]}]}).rules[0]
    assert (rule.select, rule.trigger, rule.image_type, rule.prefer) == ("all", "series", ("ORIGINAL",),
                                                                        ("newest",))
    for table, message in (({"select": "some"}, "rules[0].select: expected one of best, all"),
                           ({"trigger": "series"}, "rules[0].select: a rule with trigger = \"series\""),
                           ({"orientation": ["up"]}, "rules[0].orientation[0]: expected one of axial"),
                           ({"prefer": ["fastest"]}, "rules[0].prefer[0]: expected one of axial"),
                           ({"min_slices": -1}, "rules[0].min_slices: must be >= 0"),
                           ({"kernel": "(("}, "rules[0].kernel: not a valid regular expression"),
                           ({"contrast": "maybe"}, "rules[0].contrast: expected one of any")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            parse_config({"rules": [table]})
    with pytest.raises(ConfigError, match="study_quiet_period: must be > 0"):
        parse_config({"study_quiet_period": 0})


@pytest.fixture(scope="module")
def exam(tmp_path_factory: pytest.TempPathFactory):
    return ct_study(tmp_path_factory.mktemp("exam"))


def row_of(phantom) -> dict:
    ds = pydicom.dcmread(phantom.paths[0], stop_before_pixels=True)
    return {"series_instance_uid": phantom.series_uid, "modality": "CT", "sop_class_uid": CT,
            "series_description": str(ds.SeriesDescription), "body_part": "CHEST",
            "manufacturer": str(ds.Manufacturer), "calling_ae": "SCANNER"}


def test_facts_are_read_from_the_headers(exam, tmp_path: Path) -> None:
    thin = read_facts(exam.series["thin"].paths, row_of(exam.series["thin"]))
    assert (thin.orientation, thin.slice_thickness, thin.slices, thin.kernel) == ("axial", 2.0, 65, "B30f")
    assert thin.coverage_mm == pytest.approx(128.0) and thin.pixel_spacing == pytest.approx(3.2)
    assert thin.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
    coronal = read_facts(exam.series["coronal"].paths, row_of(exam.series["coronal"]))
    assert coronal.orientation == "coronal" and coronal.image_type[0] == "DERIVED"
    sagittal = read_facts(exam.series["sagittal"].paths, row_of(exam.series["sagittal"]))
    assert sagittal.orientation == "sagittal"
    # a localizer inside an axial series does not count as a slice or decide the orientation
    with_scout = read_facts([*exam.series["localizer"].paths, *exam.series["thick"].paths],
                            row_of(exam.series["thick"]))
    assert (with_scout.orientation, with_scout.slices) == ("axial", 26)
    enhanced = write_enhanced(exam.series["thick"].paths, tmp_path / "enhanced.dcm")
    one = read_facts([enhanced], row_of(exam.series["thick"]))
    assert (one.orientation, one.slices, one.slice_thickness) == ("axial", 26, 5.0)


def receive(store: Store, phantom, at_time: float) -> None:
    """Store a phantom series as the listener does, then say its association ended."""
    for path in phantom.paths:
        ds = pydicom.dcmread(path)
        info = SeriesInfo(phantom.series_uid, phantom.study_uid, "CT", CT, str(ds.SeriesDescription),
                          "CHEST", str(ds.Manufacturer))
        store.store_instance(info, str(ds.SOPInstanceUID), path.read_bytes(), "SCANNER")
    with store.transaction() as db:  # received and released at the test's clock
        db.execute("UPDATE series SET first_received=?, last_received=?, released_at=? "
                   "WHERE series_instance_uid=?", (at_time, at_time, at_time, phantom.series_uid))


def jobs(store: Store) -> list[dict]:
    return [dict(r) for r in store.query("SELECT * FROM jobs ORDER BY id")]


def test_one_job_per_study_after_the_study_is_quiet_and_late_series_replace(
        database_url: str, exam, tmp_path: Path) -> None:
    store = Store(tmp_path / "data", database_url)
    config = parse_config({"quiet_period": 1, "study_quiet_period": 5,
                           "rules": [{"name": "ct"}, {"name": "each", "select": "all", "trigger": "series",
                                                      "exclude_image_type": []}]})
    t0 = time.time()
    for role in ("localizer", "thick", "thin", "lung", "coronal", "sagittal"):
        receive(store, exam.series[role], t0)
    assert complete_due_series(store, config, now=t0 + 0.5) == []
    assert len(complete_due_series(store, config, now=t0 + 1.5)) == 6
    # the series-level rule fired per series at once; the study rule waits for the quiet study
    assert [j["rule"] for j in jobs(store)] == ["each"] * 6
    assert select_due_studies(store, config, now=t0 + 4.0) == []
    assert select_due_studies(store, config, now=t0 + 5.5) == [exam.uid]
    study_jobs = [j for j in jobs(store) if j["rule"] == "ct"]
    assert [j["series_instance_uid"] for j in study_jobs] == [exam.series["thin"].series_uid]
    assert study_jobs[0]["result_key"] == result_key(exam.uid, "ct")
    assert select_due_studies(store, config, now=t0 + 9) == []  # selected once
    [listed] = store.listing("studies")
    chosen = {i["series_instance_uid"]: i["reason"] for i in listed["selection"] if i["rule"] == "ct"}
    assert chosen[exam.series["thin"].series_uid] == "chosen: 2 mm axial, 65 slices, 128 mm, kernel B30f"
    assert chosen[exam.series["coronal"].series_uid] == "skipped: ImageType DERIVED\\SECONDARY\\REFORMATTED"
    assert store.listing("studies", study="1.2.3") == []

    # a late, thicker series: selection runs again, chooses the same series, queues nothing
    thicker = reconstruction(tmp_path / "late-thick", exam.uid, 7, 10.0, "B30f", "Chest 10 B30f")
    receive(store, thicker, t0 + 20)
    complete_due_series(store, config, now=t0 + 22)
    assert select_due_studies(store, config, now=t0 + 26) == [exam.uid]
    assert len([j for j in jobs(store) if j["rule"] == "ct"]) == 1
    # a late, thinner one is chosen: a new job with the same result key replaces the results
    thinner = reconstruction(tmp_path / "late-thin", exam.uid, 8, 1.0, "B31f", "Chest 1.0 B31f")
    receive(store, thinner, t0 + 40)
    complete_due_series(store, config, now=t0 + 42)
    assert select_due_studies(store, config, now=t0 + 46) == [exam.uid]
    study_jobs = [j for j in jobs(store) if j["rule"] == "ct"]
    assert [j["series_instance_uid"] for j in study_jobs] == [exam.series["thin"].series_uid,
                                                              thinner.series_uid]
    assert {j["result_key"] for j in study_jobs} == {result_key(exam.uid, "ct")}
    reasons = {r["series_instance_uid"]: r["reason"] for r in store.selections(exam.uid) if r["rule"] == "ct"}
    assert reasons[exam.series["thin"].series_uid].endswith("ranks higher on thinnest")


def test_a_study_with_a_series_still_receiving_waits(database_url: str, exam, tmp_path: Path) -> None:
    store = Store(tmp_path / "data", database_url)
    config = parse_config({"quiet_period": 1, "study_quiet_period": 2})
    t0 = time.time()
    receive(store, exam.series["thin"], t0)
    receive(store, exam.series["thick"], t0 + 10)
    with store.transaction() as db:  # the thick series' association has not ended yet
        db.execute("UPDATE series SET released_at=NULL WHERE series_instance_uid=?",
                   (exam.series["thick"].series_uid,))
    assert complete_due_series(store, config, now=t0 + 11) == [exam.series["thin"].series_uid]
    assert select_due_studies(store, config, now=t0 + 15) == []
    # the stability timeout (10 s) completes it anyway; then the study is quiet and selected
    assert complete_due_series(store, config, now=t0 + 20.5) == [exam.series["thick"].series_uid]
    assert select_due_studies(store, config, now=t0 + 21) == [exam.uid]
    assert [j["series_instance_uid"] for j in jobs(store)] == [exam.series["thin"].series_uid]


def test_an_earlier_database_is_migrated_without_redoing_its_studies(exam, tmp_path: Path) -> None:
    data = tmp_path / "old"
    data.mkdir()
    old = sqlite3.connect(data / "vesalius.sqlite")
    old.executescript(EARLIER_SQLITE_SCHEMA)  # jobs without result_key
    old.execute("INSERT INTO series VALUES ('9.1','9','CT',?,'','','','SCANNER','complete',1,1,1,2)", (CT,))
    old.execute("INSERT INTO jobs (series_instance_uid, rule, model, destinations, state, created_at, "
                "updated_at) VALUES ('9.1','ct','builtin_ct','[]','done',2,2)")
    old.commit()
    old.close()
    store = Store(data)
    assert jobs(store)[0]["result_key"] is None
    assert select_due_studies(store, parse_config({}), now=time.time()) == []
    Store(data)  # a second start migrates nothing twice


def test_study_results_have_one_set_of_uids_whichever_series() -> None:
    per_study = Algorithm("builtin_ct", "1", result_key="study/1.2/ct")
    assert derived_uid("1.2.3", per_study, "seg/instance") == derived_uid("1.2.4", per_study, "seg/instance")
    assert derived_uid("1.2.3", per_study, "seg/instance") != derived_uid(
        "1.2.3", Algorithm("builtin_ct", "1"), "seg/instance")
    assert derived_uid("1.2.3", per_study, "seg/instance") != derived_uid(
        "1.2.3", Algorithm("builtin_ct", "1", result_key="study/1.2/other"), "seg/instance")


def test_select_all_processes_a_late_matching_series_only(database_url: str, exam, tmp_path: Path) -> None:
    store = Store(tmp_path / "data", database_url)
    config = parse_config({"quiet_period": 1, "study_quiet_period": 2,
                           "rules": [{"name": "ct", "select": "all"}]})
    t0 = time.time()
    for role in ("localizer", "thin", "coronal"):
        receive(store, exam.series[role], t0)
    complete_due_series(store, config, now=t0 + 2)
    assert select_due_studies(store, config, now=t0 + 3) == [exam.uid]
    assert [(j["series_instance_uid"], j["result_key"]) for j in jobs(store)] == \
        [(exam.series["thin"].series_uid, None)]  # results per series, as before study rules
    receive(store, exam.series["lung"], t0 + 10)
    complete_due_series(store, config, now=t0 + 12)
    assert select_due_studies(store, config, now=t0 + 13) == [exam.uid]
    assert [j["series_instance_uid"] for j in jobs(store)] == [exam.series["thin"].series_uid,
                                                               exam.series["lung"].series_uid]


def test_a_series_removed_by_retention_still_outranks_a_worse_late_one(
        database_url: str, exam, tmp_path: Path) -> None:
    store = Store(tmp_path / "data", database_url)
    config = parse_config({"quiet_period": 1, "study_quiet_period": 2})
    t0 = time.time()
    receive(store, exam.series["thin"], t0)
    complete_due_series(store, config, now=t0 + 2)
    select_due_studies(store, config, now=t0 + 3)
    with store.transaction() as db:  # what retention does once the results are delivered
        db.execute("DELETE FROM instances WHERE series_instance_uid=?", (exam.series["thin"].series_uid,))
        db.execute("DELETE FROM series WHERE series_instance_uid=?", (exam.series["thin"].series_uid,))
    receive(store, exam.series["thick"], t0 + 10)
    complete_due_series(store, config, now=t0 + 12)
    assert select_due_studies(store, config, now=t0 + 13) == [exam.uid]
    assert [j["series_instance_uid"] for j in jobs(store)] == [exam.series["thin"].series_uid]
    reasons = {r["series_instance_uid"]: r["reason"] for r in store.selections(exam.uid)}
    assert reasons[exam.series["thin"].series_uid].endswith("removed by retention")
    assert reasons[exam.series["thick"].series_uid].endswith("ranks higher on thinnest")
