"""The dashboard in a real browser: Debian's Chromium, driven by Playwright, on a real node.

One node (``vesalius serve``, a DCMTK storescp as its PACS) and one browser serve every test of
this module. The node processes a chest phantom and a real CT (TotalSegmentator's example, as a
DICOM series) with builtin_ct, and, in the progress test, a series routed to a slow MONAI
bundle whose pre-processing sleeps, so the page can be seen following its stages live.
Every request the browser makes is recorded (and any outside the node refused): the page must
make none outside the node. Set VESALIUS_SCREENSHOTS=docs/images to refresh the README's
screenshots from the tests.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import shared_data_dir
from tests.peers import NodeProcess, StoreSCP, storescp, storescu, vesalius_node, wait_for
from tests.phantoms import write_phantom_series
from tests.realdata import write_nifti_as_dicom_series
from tests.test_e2e import CHEST
from tests.tiny_bundle import NETWORK, inference_config, write_bundle_configs
from vesalius.inference.terminology import term_for

CHROMIUM = "/usr/bin/chromium"
# WebGL on the CPU: ANGLE's SwiftShader (the 3D view needs WebGL; there is no GPU here)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                  "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
WAIT_MS = 60_000  # for one thing to appear on a loaded, shared 2-core machine
BACKGROUND = (0x1B, 0x1F, 0x24)  # the 3D view's clear colour (web/viewer.js)
SLOW_SECONDS = 8  # the slow bundle's pre-processing sleeps this long (inside the "model" stage)


def slow_bundle(folder: Path) -> Path:
    """A real MONAI bundle (untrained UNet, TorchScript) whose pre-processing sleeps: a test model
    that stays in one stage long enough to watch."""
    import torch
    from monai.networks.nets import UNet

    write_bundle_configs(folder)
    config = inference_config()
    config["preprocessing"]["transforms"].append(
        {"_target_": "Lambdad", "keys": "image",
         "func": f"$lambda x: __import__('time').sleep({SLOW_SECONDS}) or x"})
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    network = UNet(**{k: v for k, v in NETWORK.items() if k != "_target_"}).eval()
    torch.jit.script(network).save(str(folder / "models" / "model.ts"))
    return folder


@dataclass
class Dashboard:
    node: NodeProcess
    pacs: StoreSCP
    browser: Browser
    tmp: Path
    jobs: dict[str, int]  # phantom, real_ct -> job id
    requests: list[str] = field(default_factory=list)  # every URL the browser asked for

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.node.http_port}"

    def page(self, token: bool = True) -> Page:
        """A new tab (its own context: its own sessionStorage), the token typed in when asked."""
        context = self.browser.new_context(viewport={"width": 1400, "height": 1000})
        context.route("**/*", self._only_the_node)
        tab = context.new_page()
        tab.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(self.url + "/")
        if token:
            tab.locator("#token").fill(self.node.token())
            tab.locator("#login-submit").click()
        tab.errors = errors  # type: ignore[attr-defined]
        return tab

    def _only_the_node(self, route, request) -> None:  # noqa: ANN001 - Playwright's callback types
        self.requests.append(request.url)
        if request.url.startswith(self.url + "/") or request.url.startswith(("blob:", "data:")):
            route.continue_()
        else:
            route.abort()


def screenshot(tab: Page, name: str, tmp: Path) -> bytes:
    """A screenshot of the page, also written where VESALIUS_SCREENSHOTS says (the README's)."""
    png = tab.screenshot(full_page=True)
    folder = Path(os.environ.get("VESALIUS_SCREENSHOTS") or tmp)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(png)
    return png


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    tmp = tmp_path_factory.mktemp("dashboard")
    bundle = slow_bundle(tmp / "slow_bundle")
    config = (f'workers = 1\nstudy_quiet_period = 0.5\n[[models]]\nname = "slow"\nkind = "bundle"\n'
              f'path = "{bundle}"\ndevice = "cpu"\n'
              '[[rules]]\nname = "ct"\ncalling_ae = ["SCANNER"]\nmodel = "builtin_ct"\n'
              '[[rules]]\nname = "slow"\ncalling_ae = ["SLOWSCANNER"]\nmodel = "slow"\n')
    phantom = write_phantom_series(tmp / "phantom", shape=(40, 100, 100), spacing=(3.0, 2.0, 2.0),
                                   objects=CHEST)
    real = write_nifti_as_dicom_series(shared_data_dir() / "totalseg-examples" / "example_ct_sm.nii.gz",
                                       tmp / "real")
    with storescp(tmp / "pacs") as pacs, \
            vesalius_node(tmp, destinations=[pacs.address], config=config) as node, sync_playwright() as pw:
        storescu(phantom.paths, node.port)
        storescu(real, node.port)
        def both_done() -> list[dict] | None:
            jobs = node.jobs()
            return jobs if len(jobs) == 2 and all(j["state"] == "done" for j in jobs) else None

        done = wait_for(both_done, 600, "the phantom's and the real CT's jobs")
        by_series = {j["series_instance_uid"]: j["id"] for j in done}
        jobs = {"phantom": by_series[phantom.series_uid],
                "real_ct": next(i for uid, i in by_series.items() if uid != phantom.series_uid)}
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield Dashboard(node, pacs, browser, tmp, jobs)
        finally:
            browser.close()


def _linear(srgb: np.ndarray) -> np.ndarray:
    return np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)


def colour_counts(png: bytes, colours: dict[str, tuple[int, int, int]]) -> dict[str, int]:
    """Pixels shaded from each structure's colour, each lit pixel given to the nearest colour: in
    linear light a lit diffuse surface is its base colour times a brightness, so its direction
    (chromaticity) is the colour's. Pixels near no colour (background, blends) count for none."""
    pixels = _linear(np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float64) / 255).reshape(-1, 3)
    norm = np.linalg.norm(pixels, axis=1)
    unit = pixels[norm > 0.05] / norm[norm > 0.05, None]
    names = list(colours)
    bases = _linear(np.asarray([colours[n] for n in names], np.float64) / 255)
    similarity = unit @ (bases / np.linalg.norm(bases, axis=1, keepdims=True)).T
    nearest = np.where(similarity.max(axis=1) > 0.998, similarity.argmax(axis=1), -1)
    return {name: int((nearest == i).sum()) for i, name in enumerate(names)}


def lit_fraction(png: bytes) -> float:
    """The share of the canvas that is not its background colour."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.int16)
    return float((np.abs(pixels - BACKGROUND).sum(axis=2) > 30).mean())


def canvas_png(tab: Page) -> bytes:
    return tab.locator("#canvas3d").screenshot()


def open_job(dashboard: Dashboard, job: int) -> Page:
    tab = dashboard.page()
    tab.goto(f"{dashboard.url}/#/job/{job}")
    tab.locator("#viewer[data-loaded]").wait_for()
    assert tab.locator("#viewer").get_attribute("data-loaded") != "error"
    return tab


def test_without_a_token_the_page_asks_for_one_and_the_api_refuses(dashboard: Dashboard) -> None:
    tab = dashboard.page(token=False)
    tab.locator("#login").wait_for(state="visible")
    assert tab.locator("#jobs").count() == 0  # nothing listed without a token
    status = tab.evaluate("fetch('/jobs').then(r => r.status)")
    assert status == 401
    tab.locator("#token").fill("not-the-token-but-long-enough")
    tab.locator("#login-submit").click()
    tab.locator("#login-error").filter(has_text="refused").wait_for()
    tab.context.close()


def test_dashboard_lists_the_jobs_with_their_states_in_plain_words(dashboard: Dashboard) -> None:
    tab = dashboard.page()
    for job in dashboard.jobs.values():
        tab.locator(f'#jobs tr[data-job="{job}"] .job-state').filter(has_text="done").wait_for()
    wait_for(lambda: dashboard.node.delivered(), 300, "the deliveries")
    tab.locator("#deliveries td").filter(has_text="delivered").first.wait_for()
    assert tab.locator("#series td").filter(has_text="SCANNER").count() >= 2
    tab.locator("#filter-state").select_option("failed")
    tab.locator("#filters button").click()
    tab.locator("#jobs td.muted").filter(has_text="none").wait_for()  # no failed job
    tab.locator("#filter-state").select_option("")
    tab.locator("#filters button").click()
    tab.locator(f'#jobs tr[data-job="{dashboard.jobs["phantom"]}"]').wait_for()
    assert not tab.errors  # type: ignore[attr-defined]
    tab.context.close()


def test_job_page_shows_every_structure_in_its_colour_and_hiding_one_removes_it(dashboard: Dashboard) -> None:
    tab = open_job(dashboard, dashboard.jobs["phantom"])
    summary = dashboard.node.get(f"/jobs/{dashboard.jobs['phantom']}")["summary"]
    names = [s["name"] for s in summary["structures"]]
    colours = {n: term_for(n).rgb for n in names}
    assert {"body", "lung_left", "lung_right", "bone"} <= set(colours)
    tab.locator('#view-anterior').click()
    everything = canvas_png(tab)
    screenshot(tab, "job.png", dashboard.tmp)
    assert lit_fraction(everything) > 0.1  # not blank
    # seen from the front: the patient's right on the viewer's left, head up, A and P end-on (hidden)
    where = {axis: tab.locator(f'.orientation[data-axis="{axis}"]').bounding_box() for axis in "LRSIAP"}
    assert where["R"]["x"] < where["L"]["x"] and where["S"]["y"] < where["I"]["y"], where
    assert not tab.locator('.orientation[data-axis="A"]').is_visible()
    tab.locator("#view-left").click()  # from the patient's left: anterior on the viewer's left
    where = {axis: tab.locator(f'.orientation[data-axis="{axis}"]').bounding_box() for axis in "AP"}
    assert where["A"]["x"] < where["P"]["x"], where
    tab.locator('#view-anterior').click()
    tab.locator('input[data-structure="body"]').uncheck()  # the see-through body tints what it holds
    before = colour_counts(canvas_png(tab), colours)
    assert all(before[n] > 200 for n in ("lung_left", "lung_right", "bone")), before
    tab.locator('input[data-structure="lung_left"]').uncheck()
    after = colour_counts(canvas_png(tab), colours)
    assert after["lung_left"] < before["lung_left"] * 0.05, (before, after)
    assert after["lung_right"] > before["lung_right"] * 0.8, (before, after)
    assert after["bone"] > before["bone"] * 0.8, (before, after)
    # the body alone, made opaque with its opacity control, in its own colour
    for name in ("lung_right", "bone"):
        tab.locator(f'input[data-structure="{name}"]').uncheck()
    tab.locator('input[data-structure="body"]').check()
    tab.locator('input[data-opacity="body"]').fill("1")
    body = colour_counts(canvas_png(tab), colours)
    assert body["body"] > 2000 and body["body"] > 10 * max(body["lung_left"], body["bone"]), body
    # the measurement table, the model, the stages, the key slices, the downloads
    assert tab.locator("#measurements tbody tr").count() == len(names)
    assert "builtin_ct" in tab.locator("#job-model").inner_text()
    assert tab.locator("#stages tbody tr").count() == len(summary["stages_s"])
    wait_for(lambda: tab.evaluate("[...document.querySelectorAll('#thumbnails img')]"
                                  ".map(i => i.naturalWidth > 0)") == [True] * 3, 30, "the key slices")
    files = {a.get_attribute("data-file") for a in tab.locator("#downloads a.download").all()}
    assert {"seg.dcm", "sr.dcm", "meshes/structures.glb", "meshes/lung_left.stl"} <= files
    with tab.expect_download() as download:
        tab.locator('a[data-file="meshes/lung_left.stl"]').click()
    [folder] = [f.parent for f in (Path(dashboard.node.data_dir) / "results").rglob("summary.json")
                if json.loads(f.read_text())["series_instance_uid"] == summary["series_instance_uid"]]
    on_disk = folder / "meshes" / "lung_left.stl"
    assert Path(download.value.path()).read_bytes() == on_disk.read_bytes()
    assert not tab.errors  # type: ignore[attr-defined]
    tab.context.close()


def test_real_ct_job_page_shows_its_structures(dashboard: Dashboard) -> None:
    tab = open_job(dashboard, dashboard.jobs["real_ct"])
    summary = dashboard.node.get(f"/jobs/{dashboard.jobs['real_ct']}")["summary"]
    colours = {s["name"]: term_for(s["name"]).rgb for s in summary["structures"]}
    tab.locator('#view-anterior').click()
    tab.locator('input[data-structure="body"]').uncheck()
    counts = colour_counts(canvas_png(tab), colours)
    assert counts["lung_left"] > 200 and counts["lung_right"] > 200 and counts["bone"] > 200, counts
    assert tab.locator("#measurements tbody tr").count() == len(summary["structures"])
    tab.context.close()


def test_the_page_shows_a_running_job_stage_by_stage_without_reloading(dashboard: Dashboard) -> None:
    tab = dashboard.page()
    tab.locator("#jobs").wait_for()
    tab.evaluate("window.notReloaded = true")
    series = write_phantom_series(dashboard.tmp / "slow", shape=(24, 48, 48), spacing=(3.0, 3.0, 3.0),
                                  objects=CHEST)
    storescu(series.paths, dashboard.node.port, calling="SLOWSCANNER")
    tab.locator("#jobs .job-state").filter(has_text="running: stage 2 of 6 (model)").wait_for()
    screenshot(tab, "dashboard.png", dashboard.tmp)  # the README's: a job running, two done
    [job] = [j["id"] for j in dashboard.node.jobs() if j["model"] == "slow"]
    tab.locator(f'#jobs tr[data-job="{job}"] .job-state').filter(has_text="done").wait_for(timeout=240_000)
    assert tab.evaluate("window.notReloaded") is True
    tab.context.close()


def test_no_request_leaves_the_node(dashboard: Dashboard) -> None:
    open_job(dashboard, dashboard.jobs["phantom"]).context.close()
    assert dashboard.requests
    outside = [u for u in dashboard.requests if not u.startswith((dashboard.url + "/", "blob:", "data:"))]
    assert not outside, outside
    assert any("/static/three/" in u for u in dashboard.requests)  # three.js came from the node
