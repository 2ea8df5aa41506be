"""``vesalius evaluate`` on the command line: one case (table, JSON, CSV, the HTML report) and a cohort
(cases paired by Series Instance UID and by file name; mean, median and quartiles per structure)."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.phantoms import write_phantom_series
from tests.test_evaluate_inputs import CHEST, NAMES, _label_map, _nifti, _seg
from vesalius.inference.series import load_series
from vesalius.node.cli import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["evaluate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def _moved(label_map: np.ndarray, rows: int) -> np.ndarray:
    """The labels shifted ``rows`` rows down: a prediction that is off by a known amount."""
    return np.roll(label_map, rows, axis=1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two SEG cases (named differently on each side: paired by their source series), two NIfTI
    cases paired by file name, and one unpaired case on each side."""
    root = tmp_path_factory.mktemp("cohort")
    pred, ref = root / "pred", root / "ref"
    pred.mkdir()
    ref.mkdir()
    labels = root / "labels.json"
    labels.write_text(json.dumps(NAMES))
    for i, (ours, theirs) in enumerate((("a.dcm", "reference-2.dcm"), ("b.dcm", "reference-1.dcm"))):
        series = write_phantom_series(root / f"ct{i}", shape=(20, 40, 40), spacing=(2.5, 1.5, 1.5),
                                      objects=CHEST, seed=i)
        volume = load_series(series.paths)
        label_map = _label_map(volume)
        _seg(volume, _moved(label_map, i + 1), pred / ours)
        _seg(volume, label_map, ref / theirs)
    for i, name in enumerate(("case1", "case2")):
        label_map = _label_map(volume)
        _nifti(_moved(label_map, 2 * i), volume.affine, pred / f"{name}.nii.gz")
        _nifti(label_map, volume.affine, ref / f"{name}.nii.gz")
    _nifti(label_map, volume.affine, pred / "only-ours.nii.gz")
    _nifti(label_map, volume.affine, ref / "only-theirs.nii.gz")
    for extra in (*pred.glob("*-labels.json"), *ref.glob("*-labels.json")):
        extra.unlink()  # the cohort's one labels file is given on the command line
    (ref / "ct-slice.dcm").write_bytes(series.paths[0].read_bytes())  # DICOM, but not a segmentation
    return pred, ref, labels


def test_a_cohort_pairs_cases_and_summarises_each_structure(cohort, capsys, tmp_path: Path) -> None:
    pred, ref, labels = cohort
    code, out, err = _run(capsys, pred, ref, "--pred-labels", labels, "--ref-labels", labels, "--json",
                          "--report", tmp_path / "report.html")
    assert code == 0, err
    result = json.loads(out)
    pairs = {(c["pred_path"], c["ref_path"]) for c in result["cases"]}
    assert pairs == {("a.dcm", "reference-2.dcm"), ("b.dcm", "reference-1.dcm"),
                     ("case1.nii.gz", "case1.nii.gz"), ("case2.nii.gz", "case2.nii.gz")}
    assert (result["unpaired_pred"], result["unpaired_ref"]) == (["only-ours.nii.gz"], ["only-theirs.nii.gz"])
    assert result["resampled"] is False
    by_case = {c["pred_path"]: {r["reference_name"].lower(): r for r in c["structures"]}
               for c in result["cases"]}
    left = {case: rows.get("lung_left") or rows["left lung"] for case, rows in by_case.items()}
    assert left["case1.nii.gz"]["dice"] == 1.0  # not moved
    assert all(left[case]["dice"] < 1.0 for case in ("a.dcm", "b.dcm", "case2.nii.gz"))
    # the SEGs call it "Left lung", the NIfTI labels "lung_left": one structure by its code
    summary = {s["name"]: s for s in result["structures"]}
    assert set(summary) == {"Body", "Left lung", "Right lung"}
    values = [row["dice"] for row in left.values()]
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    dice = summary["Left lung"]["dice"]
    assert summary["Left lung"]["cases"] == 4 and dice["n"] == 4
    assert dice["mean"] == pytest.approx(np.mean(values)) and dice["median"] == pytest.approx(median)
    assert (dice["q1"], dice["q3"], dice["iqr"]) == pytest.approx((q1, q3, q3 - q1))
    page = (tmp_path / "report.html").read_text()
    assert page.count("<svg") == 2 and "Bland-Altman" in page and "only-theirs.nii.gz" in page
    assert not re.findall(r"""(?:src|href)=["'](?!#)""", page)  # nothing fetched: plots are inline SVG
    assert "<script" not in page


def test_one_case_as_table_csv_and_json(cohort, capsys) -> None:
    pred, ref, labels = cohort
    code, out, _ = _run(capsys, pred / "case2.nii.gz", ref / "case2.nii.gz", "--pred-labels", labels,
                        "--ref-labels", labels)
    assert code == 0
    header = out.splitlines()[1].split()
    assert header[:3] == ["structure", "Dice", "IoU"] and "HD95" in header
    assert re.search(r"^\s+lung_left\s+0\.\d{3}\s", out, re.M)
    code, out, _ = _run(capsys, pred / "case2.nii.gz", ref / "case2.nii.gz", "--pred-labels", labels,
                        "--ref-labels", labels, "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["name"] for r in rows] == ["body", "lung_left", "lung_right"]
    code, out, _ = _run(capsys, pred / "case2.nii.gz", ref / "case2.nii.gz", "--pred-labels", labels,
                        "--ref-labels", labels, "--json")
    result = json.loads(out)
    assert {row["name"]: row["dice"] for row in result["structures"]} == {
        r["name"]: pytest.approx(float(r["dice"])) for r in rows}
    assert set(result["structures"][0]) >= {"name", "dice", "iou", "hd95_mm", "hausdorff_mm", "assd_mm",
                                            "volume_pred_ml", "volume_ref_ml", "volume_diff_ml"}


def test_a_map_file_and_refusals_on_the_command_line(cohort, capsys, tmp_path: Path) -> None:
    pred, ref, labels = cohort
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"lungs": ["lung_*"]}))
    code, out, _ = _run(capsys, pred / "case1.nii.gz", ref / "case1.nii.gz", "--pred-labels", labels,
                        "--ref-labels", labels, "--map", mapping, "--json")
    assert code == 0
    assert [r["name"] for r in json.loads(out)["structures"]] == ["body", "lungs"]
    other = load_series(write_phantom_series(tmp_path / "other", shape=(20, 40, 40), spacing=(2.5, 1.5, 1.5),
                                             objects=CHEST).paths)
    theirs = _seg(other, _label_map(other), tmp_path / "theirs.dcm")
    code, _, err = _run(capsys, pred / "a.dcm", theirs)
    assert code == 1 and "different frames of reference" in err
    code, _, err = _run(capsys, pred / "a.dcm", tmp_path / "missing.dcm")
    assert code == 2 and "does not exist" in err
    code, _, err = _run(capsys, pred, ref / "case1.nii.gz")
    assert code == 2 and "both be cohorts" in err
