"""Destination kinds: the registry, each kind's own table parsing, the folder kind end to end."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pydicom
import pytest

from tests.peers import wait_for
from tests.phantoms import Sphere, write_phantom_series
from tests.test_send import delivery, queued_delivery, result_dir, sender_for  # noqa: F401  (fixture)
from vesalius.node.config import Config, ConfigError, Retry, parse_config
from vesalius.node.destinations import KINDS, DeliveryError, Destination, parse_destination
from vesalius.node.destinations.dicom import DicomDestination
from vesalius.node.destinations.dicomweb import DicomwebDestination
from vesalius.node.destinations.folder import FolderDestination
from vesalius.node.send import files_for
from vesalius.node.store import Store


def test_registry_knows_the_built_in_kinds() -> None:
    assert {"dicom": DicomDestination, "dicomweb": DicomwebDestination, "folder": FolderDestination} == KINDS
    assert all(issubclass(cls, Destination) for cls in KINDS.values())


def test_unknown_kind_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        parse_destination("destinations[2]", {"name": "x", "kind": "s3", "bucket": "b"})
    assert str(err.value) == "destinations[2].kind: expected one of dicom, dicomweb, folder, got 's3'"


@pytest.mark.parametrize(("table", "message"), [
    ({"kind": "folder", "path": "out"}, 'destinations[0].name: required for kind = "folder"'),
    ({"kind": "folder", "name": "f"}, 'destinations[0].path: required for kind = "folder"'),
    ({"kind": "folder", "name": "f", "path": 3}, "destinations[0].path: expected a path"),
    ({"kind": "folder", "name": "f", "path": " "}, "destinations[0].path: must not be empty"),
    ({"kind": "folder", "name": "f", "path": "out", "host": "h"},
     'destinations[0].host: only for kind = "dicom"'),
    ({"kind": "folder", "name": "f", "path": "out", "timeout": 3},
     'destinations[0].timeout: only for kind = "dicom" or kind = "dicomweb"'),
    ({"kind": "folder", "name": "f", "path": "out", "colour": "red"}, "destinations[0].colour: unknown key"),
    ({"kind": "dicom", "ae_title": "P", "host": "h", "port": 1, "path": "out"},
     'destinations[0].path: only for kind = "folder"'),
])
def test_each_kind_checks_its_own_table(table: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"destinations": [table]})
    assert message in str(err.value)


def test_labels_name_the_kind_without_credentials() -> None:
    config = parse_config({"destinations": [
        {"ae_title": "PACS", "host": "10.0.0.5", "port": 104},
        {"name": "cloud", "kind": "dicomweb", "url": "https://user:s3cret@dicom.example.org/web/"},
        {"name": "usb", "kind": "folder", "path": "/media/usb/results", "sr": False},
    ]})
    assert [d.label for d in config.destinations] == [
        "PACS (dicom PACS@10.0.0.5:104)", "cloud (dicomweb https://dicom.example.org/web)",
        "usb (folder /media/usb/results)"]
    assert config.destinations[2].sr is False  # the common output switches apply to every kind


def test_folder_delivery_writes_every_object_by_uid(tmp_path: Path, result_dir: Path) -> None:  # noqa: F811
    out = tmp_path / "outbox"
    config = Config(destinations=(FolderDestination("usb", out, labelmap=True, encapsulated_stl=True),),
                    retry=Retry(base_delay=0.2, max_delay=0.2))
    store = Store(tmp_path / "data")
    delivery_id = queued_delivery(store, result_dir, "usb")
    with sender_for(store, config):
        wait_for(lambda: delivery(store, delivery_id)["state"] == "done", 20, "the folder delivery")
    sent = files_for(config.destinations[0], result_dir)
    written = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(written) == len(sent) == 7  # 5 objects (the preview among them) and 2 STLs
    for path in sent:
        ds = pydicom.dcmread(path)
        target = out / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert target.read_bytes() == path.read_bytes()  # byte for byte, no re-encoding
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind


def test_folder_resend_replaces_and_keeps_one_copy(tmp_path: Path, result_dir: Path) -> None:  # noqa: F811
    destination = FolderDestination("f", tmp_path / "out")
    files = files_for(destination, result_dir)
    destination.send(files)
    destination.send(files)
    assert len([p for p in (tmp_path / "out").rglob("*") if p.is_file()]) == len(files) == 4


@pytest.mark.parametrize(("keyword", "value"), [
    ("SOPInstanceUID", "../../etc/passwd"),
    ("SOPInstanceUID", ".."),
    ("StudyInstanceUID", "1.2/../../x"),
    ("StudyInstanceUID", "/abs"),
    ("SOPInstanceUID", "1." * 40 + "1"),  # longer than 64 characters
])
def test_folder_refuses_names_that_are_not_uids(tmp_path: Path, keyword: str, value: str) -> None:
    series = write_phantom_series(tmp_path / "src", shape=(1, 8, 8), objects=[Sphere((0, 0, 0), 2, 100)])
    ds = pydicom.dcmread(series.paths[0])
    with warnings.catch_warnings():  # pydicom warns about the invalid UI value we mean to write
        warnings.simplefilter("ignore")
        setattr(ds, keyword, value)
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    out = tmp_path / "outbox" / "inner"
    with pytest.raises(DeliveryError) as err:
        FolderDestination("f", out).send([bad])
    assert err.value.permanent and value not in str(err.value)
    assert not any(p.is_file() for p in tmp_path.rglob("*") if p.suffix == ".dcm" and "src" not in p.parts
                   and p != bad)


def test_folder_refuses_a_link_that_leaves_it(tmp_path: Path, result_dir: Path) -> None:  # noqa: F811
    """A study folder that is a symbolic link to elsewhere is not followed out of the destination."""
    files = files_for(FolderDestination("f", tmp_path / "out"), result_dir)
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / study).symlink_to(elsewhere)
    with pytest.raises(DeliveryError, match="would leave the destination folder"):
        FolderDestination("f", tmp_path / "out").send(files)
    assert not list(elsewhere.iterdir())


def test_a_transform_changes_what_leaves(tmp_path: Path, result_dir: Path) -> None:  # noqa: F811
    """The one hook for outgoing datasets: what a kind sends is the transformed, re-encoded dataset."""

    class Renaming(FolderDestination):
        def transform(self, dataset: pydicom.Dataset) -> pydicom.Dataset:
            changed = copy.deepcopy(dataset)
            changed.SeriesDescription = "changed on the way out"
            return changed

    out = tmp_path / "out"
    destination = Renaming("f", out)
    destination.send(files_for(destination, result_dir))
    written = [pydicom.dcmread(p) for p in out.rglob("*.dcm")]
    assert len(written) == 4 and {ds.SeriesDescription for ds in written} == {"changed on the way out"}
    assert {pydicom.dcmread(p).SeriesDescription for p in files_for(destination, result_dir)} != {
        "changed on the way out"}  # the results themselves stay as they were


def test_folder_kind_from_toml(tmp_path: Path) -> None:
    (tmp_path / "v.toml").write_text('[[destinations]]\nname = "air-gap"\nkind = "folder"\n'
                                     'path = "/srv/outbox"\nencapsulated_stl = ["bone"]\n')
    from vesalius.node.config import load_config

    (destination,) = load_config(tmp_path / "v.toml").destinations
    assert destination == FolderDestination("air-gap", Path("/srv/outbox"), encapsulated_stl=("bone",))


def test_folder_check_refuses_a_file_in_its_place(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("")
    with pytest.raises(ConfigError, match="not a folder"):
        FolderDestination("f", tmp_path / "taken").check()
    FolderDestination("f", tmp_path / "new").check()
