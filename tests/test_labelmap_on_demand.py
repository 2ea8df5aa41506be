"""The node writes the Label Map SEG only for a job with a destination that takes it
(``labelmap = true``): it is the slowest object to write and nobody else receives it."""

from __future__ import annotations

from pathlib import Path

from tests.peers import storescp, storescu, vesalius_node, wait_for
from tests.phantoms import write_phantom_series
from tests.test_e2e import CHEST


def _result_files(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "results").rglob("*.dcm")}


def test_label_map_seg_only_for_a_destination_that_takes_it(tmp_path: Path) -> None:
    series = write_phantom_series(tmp_path / "ct", shape=(24, 64, 64), spacing=(4.0, 3.0, 3.0),
                                  objects=CHEST)
    with storescp(tmp_path / "plain") as plain, storescp(tmp_path / "full") as full:
        for name, pacs, extra in (("plain", plain, ""), ("full", full, "labelmap = true\n")):
            config = (f'[[destinations]]\nae_title = "{pacs.ae_title}"\nhost = "127.0.0.1"\n'
                      f"port = {pacs.port}\n{extra}")
            with vesalius_node(tmp_path / name, config=config) as node:
                storescu(series.paths, node.port)
                wait_for(lambda: node.delivered(1), 300, f"the results at the {name} PACS")  # noqa: B023
                files = _result_files(node.data_dir)
            assert "seg.dcm" in files and "sr.dcm" in files
            assert ("seg_labelmap.dcm" in files) == (name == "full")
