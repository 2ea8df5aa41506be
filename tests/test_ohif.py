"""What a radiologist sees: our objects opened in OHIF Viewer 3.13.2 in a real browser.

Debian's Chromium, driven by Playwright, opens OHIF's prebuilt viewer (npm @ohif/app, installed
by scripts/setup.sh into tests/ohif) on a chest phantom processed by the pipeline and stored in a
real Orthanc, read over DICOMweb from the same origin. Each test opens the study as a user does
(``/viewer?StudyInstanceUIDs=...``, double-click a series, answer the prompt) and fails on any
console error or uncaught page error.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import BrowserContext, Page, sync_playwright

from tests.ohif_peer import ohif_server, orthanc_dicomweb
from tests.peers import wait_for
from tests.phantoms import write_phantom_series
from tests.test_e2e import CHEST
from vesalius.dicom_out.sr import concept_key
from vesalius.inference.terminology import term_for
from vesalius.node.pipeline import run_pipeline

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 30_000  # for one thing to appear on a loaded, shared 2-core machine


@dataclass
class Viewer:
    url: str
    study_uid: str
    structures: list[dict[str, Any]]  # the pipeline's summary: name, volume_ml, ...
    browser: BrowserContext


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Viewer]:
    tmp = tmp_path_factory.mktemp("ohif")
    series = write_phantom_series(tmp / "ct", shape=(40, 100, 100), spacing=(3.0, 2.0, 2.0),
                                  objects=CHEST)
    # with a prior study's volumes (node.longitudinal): the report carries them and still opens
    priors = {concept_key(name): {"volume_ml": 1.0, "study_date": "20250101"}
              for name in ("body", "lung_left", "lung_right", "bone")}
    summary = run_pipeline(series.paths, tmp / "out", "builtin_ct", priors=priors)
    ours = [tmp / "out" / name for name in ("seg.dcm", "seg_labelmap.dcm", "sr.dcm")]
    with orthanc_dicomweb(tmp) as orthanc, ohif_server(orthanc.url) as url, sync_playwright() as pw:
        orthanc.upload([*series.paths, *ours])
        browser = pw.chromium.launch_persistent_context(
            str(tmp / "chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900})
        # as if the user had seen OHIF's first-visit guided tour (its overlay takes every click)
        browser.add_init_script("localStorage.setItem('shownTours', '[\"basicViewerTour\"]')")
        try:
            yield Viewer(url, series.study_uid, summary["structures"], browser)
        finally:
            browser.close()


@pytest.fixture
def page(viewer: Viewer) -> Iterator[Page]:
    """The study open in a new tab; after the test, no console error and no page error."""
    tab = viewer.browser.new_page()
    errors: list[str] = []
    tab.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    tab.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    tab.set_default_timeout(WAIT_MS)
    tab.goto(f"{viewer.url}/viewer?StudyInstanceUIDs={viewer.study_uid}")
    tab.locator('[data-cy="study-browser-thumbnail"]').first.wait_for()  # the CT's thumbnail
    yield tab
    found = list(errors)  # before closing: closing aborts image loads, which OHIF logs as errors
    tab.close()
    assert not found, "\n".join(found)


def open_series(page: Page, description_suffix: str) -> None:
    """Double-click the series whose description ends so, and answer Yes to OHIF's prompt."""
    page.locator('[data-cy="study-browser-thumbnail-no-image"]',
                 has_text=f"- {description_suffix}").dblclick()


def rgb(style: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", style.split("rgb", 1)[1])[:3])


def segment_rows(page: Page, labels: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    """(title, swatch colour) of every row of the segmentation panel, once it lists ``labels``."""
    rows = page.locator('[data-cy="data-row"]')
    wait_for(lambda: rows.count() >= len(labels), WAIT_MS / 1000, "the segment list")
    return [(row.locator('[data-cy="data-row-title"]').inner_text().strip(),
             rgb(row.locator('[data-cy="data-row-colorhex"]').get_attribute("style") or ""))
            for row in rows.all()]


def viewport_pixels(page: Page) -> np.ndarray:
    box = page.locator("canvas.cornerstone-canvas").first.bounding_box()
    assert box is not None, "no viewport canvas"
    png = page.screenshot(clip=box, animations="disabled", caret="hide")
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def drawn_colour_fit(shown: np.ndarray, hidden: np.ndarray, colour: np.ndarray) -> tuple[int, float]:
    """How well ``shown`` is ``hidden`` blended with ``colour``: (pixels changed, residual).

    A segment drawn with opacity a turns a pixel b into b + a (c - b) (a differs between fill
    and outline); fitted pixel by pixel, the colour that was drawn leaves a small median relative
    residual, a neighbour's colour a large one.
    """
    change = shown - hidden
    changed = np.abs(change).sum(axis=-1) > 12
    d, towards = change[changed], colour - hidden[changed]
    alpha = (d * towards).sum(axis=-1) / np.maximum((towards * towards).sum(axis=-1), 1e-9)
    misfit = np.linalg.norm(d - alpha[:, None] * towards, axis=-1) / np.linalg.norm(d, axis=-1)
    return int(changed.sum()), float(np.median(misfit)) if misfit.size else 1.0


def expected_segments(viewer: Viewer) -> list[tuple[str, tuple[int, int, int]]]:
    return [(term_for(s["name"]).label, term_for(s["name"]).rgb) for s in viewer.structures]


def check_segment_list(page: Page, viewer: Viewer) -> None:
    """Every segment listed, in order, with its recommended colour (and nothing else)."""
    expected = expected_segments(viewer)
    rows = segment_rows(page, [label for label, _ in expected])
    assert [title for title, _ in rows] == [label for label, _ in expected]  # no "Background"
    for (title, shown), (_, wanted) in zip(rows, expected, strict=True):
        assert np.abs(np.subtract(shown, wanted)).max() <= 2, f"{title}: listed as {shown}, not {wanted}"


def check_segments_drawn(page: Page, viewer: Viewer) -> None:
    """Each segment, shown alone on its centre slice, drawn over the CT in its own colour."""
    expected = expected_segments(viewer)
    toggles = page.locator('[data-cy="data-row-visibility-toggle"]')
    for toggle in toggles.all():  # hide all, then show one at a time
        toggle.click()
    colours = [np.array(colour, dtype=np.float64) for _, colour in expected]
    for number, (title, _) in enumerate(expected):
        # a click on a row (its toggle included) takes OHIF to that segment's centre slice
        page.locator('[data-cy="data-row"]').nth(number).click()
        hidden = _settled(page)
        toggles.nth(number).click()
        shown = _settled(page, unlike=hidden)
        toggles.nth(number).click()
        fits = [drawn_colour_fit(shown, hidden, colour) for colour in colours]
        changed, residual = fits[number]
        assert changed > 200, f"{title}: only {changed} pixels drawn"
        assert residual < 0.15, f"{title}: drawn colour is not its own (residual {residual:.2f})"
        others = [fit[1] for other, fit in enumerate(fits) if other != number
                  and np.abs(colours[other] - colours[number]).max() > 10]
        assert all(residual < other for other in others), f"{title}: {fits}"


def _settled(page: Page, unlike: np.ndarray | None = None) -> np.ndarray:
    """The viewport once two screenshots in a row agree (and differ from ``unlike``, if given)."""
    previous = viewport_pixels(page)

    def stable() -> list[np.ndarray]:
        nonlocal previous
        current = viewport_pixels(page)
        same = np.array_equal(current, previous)
        previous = current
        if same and (unlike is None or not np.array_equal(current, unlike)):
            return [current]
        return []

    return wait_for(stable, WAIT_MS / 1000, "the viewport to settle", interval=0.2)[0]


def test_binary_seg_lists_and_draws_every_segment_in_its_colour(page: Page, viewer: Viewer) -> None:
    page.locator('[data-cy="panelSegmentation-btn"]').click()
    open_series(page, "Segmentation")
    page.get_by_role("button", name="Yes").click()  # "Do you want to open this Segmentation?"
    check_segment_list(page, viewer)
    check_segments_drawn(page, viewer)


def test_label_map_seg_lists_no_background_and_each_segment_in_its_own_colour(
        page: Page, viewer: Viewer) -> None:
    page.locator('[data-cy="panelSegmentation-btn"]').click()
    open_series(page, "Label map segmentation")
    page.get_by_role("button", name="Yes").click()
    check_segment_list(page, viewer)  # the colours OHIF took by list position, with "Background"
    hidden = _settled(page)  # drawn at all: all segments hidden, then all shown
    page.locator('[data-cy="all-segments-visibility-toggle"]').click()
    shown = _settled(page, unlike=hidden)
    page.locator('[data-cy="all-segments-visibility-toggle"]').click()
    _settled(page, unlike=shown)
    drawn = np.abs(shown - hidden).sum(axis=-1) > 12
    assert drawn.sum() > 1000, f"the label map is drawn on {drawn.sum()} pixels only"


def test_sr_opens_and_shows_the_volume_of_each_structure(page: Page, viewer: Viewer) -> None:
    open_series(page, "Measurements")
    page.get_by_role("button", name="No").click()  # "continue tracking measurements?": just read
    wanted = {s["name"]: s["volume_ml"] for s in viewer.structures}
    seen: set[float] = set()  # every volume OHIF drew, as "Volume: 3060.48 ml"
    volume_text = page.locator("svg text", has_text="Volume:")

    def volumes_shown() -> set[float]:
        texts = volume_text.all_text_contents()
        return {float(v) for text in texts for v in re.findall(r"Volume: ([\d.]+) ml", text)}

    right = page.locator('[data-cy="viewport-action-arrows-right"]')

    def step_through_the_report() -> bool:
        """Collect the volumes on screen, then go to the next measurement (its slice)."""
        shown = volumes_shown()
        seen.update(shown)
        if all(any(abs(v - volume) < 0.006 for v in seen) for volume in wanted.values()):
            return True
        if shown:  # the current measurement is drawn: on to the next one (the arrows wrap around)
            right.click()
        return False

    wait_for(step_through_the_report, 2 * WAIT_MS / 1000, "every structure's volume", interval=0.5)
    for name, volume in wanted.items():
        assert any(abs(shown - volume) < 0.006 for shown in seen), f"{name}: {volume} ml not in {seen}"
    assert len(seen) == len(wanted)
