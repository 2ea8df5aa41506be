"""Configuration: TOML validated at start-up with messages naming the key; flags override."""

from pathlib import Path

import pytest

from vesalius.node.config import Config, ConfigError, load_config, parse_config, with_overrides
from vesalius.node.destinations.dicom import DicomDestination as Destination
from vesalius.node.destinations.dicomweb import DicomwebDestination


def test_no_file_gives_the_embedded_default() -> None:
    config = load_config(None)
    assert (config.ae_title, config.port, config.http_port) == ("VESALIUS", 11112, 8080)
    assert config.data_dir == Path("./vesalius-data")
    assert [r.model for r in config.rules] == ["builtin_ct"]
    assert config.rules[0].modality == ("CT",)


def test_full_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "v.toml"
    path.write_text(
        """
ae_title = "AI_NODE"
port = 11113
quiet_period = 2
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "10.1.2.3"
port = 104
[[rules]]
name = "chest"
modality = ["CT"]
series_description = "thorax|chest"
destinations = ["pacs"]
[retry]
base_delay = 1
max_attempts = 3
"""
    )
    config = load_config(path)
    assert config.ae_title == "AI_NODE" and config.port == 11113 and config.quiet_period == 2.0
    assert config.destinations == (Destination("pacs", "PACS", "10.1.2.3", 104),)
    assert config.rules[0].series_description == "thorax|chest"
    assert config.retry.max_attempts == 3 and config.retry.base_delay == 1.0


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("colour = 1", "colour: unknown key"),
        ("port = 'x'", "port: expected int"),
        ("port = 70000", "port: port must be 0-65535"),
        ("ae_title = 'MUCH_TOO_LONG_AE_TITLE'", "ae_title: an AE title is 1-16"),
        ("quiet_period = -1", "quiet_period: must be > 0"),
        ("[[destinations]]\nae_title = 'P'\nhost = 'h'", "destinations[0].port: required"),
        ("[[rules]]\nseries_description = '(('", "rules[0].series_description: not a valid regular"),
        ("[[rules]]\ndestinations = ['nowhere']", "rules[0].destinations: unknown destination 'nowhere'"),
        ("[[rules]]\nmodel = 3", "rules[0].model: expected str"),
        ("[retry]\nmax_attempts = true", "retry.max_attempts: expected a number"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(path)


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "broken.toml").write_text("port = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml")


def test_flags_override_the_file() -> None:
    config = parse_config({"port": 2000, "rules": [{"name": "a"}, {"name": "b", "model": "onnx:/m.onnx"}]})
    updated = with_overrides(config, port=3000, ae_title=None, model="builtin_ct",
                             destinations=["PACS@127.0.0.1:4242"])
    assert updated.port == 3000
    assert {r.model for r in updated.rules} == {"builtin_ct"}
    assert updated.destinations == (Destination("PACS", "PACS", "127.0.0.1", 4242),)
    assert updated.destination_names(updated.rules[0]) == ("PACS",)
    assert with_overrides(Config(), port=None).port == 11112


@pytest.mark.parametrize("text", ["PACS", "PACS@host", "@h:1", "PACS@h:port", "TOO_LONG_AE_TITLE_X@h:1"])
def test_bad_destination_flag(text: str) -> None:
    with pytest.raises(ConfigError, match="expected AE@HOST:PORT"):
        Destination.parse(text)


def test_documented_example_is_valid() -> None:
    from tests.conftest import ROOT

    config = load_config(ROOT / "docs" / "vesalius.example.toml")
    assert config == with_overrides(Config(destinations=config.destinations), ae_title=None)
    assert config.destinations[0].ae_title == "PACS"


def test_destination_kinds() -> None:
    config = parse_config({"destinations": [
        {"ae_title": "PACS", "host": "10.0.0.5", "port": 104},
        {"name": "web", "kind": "dicomweb", "url": "https://pacs.example.org/dicom-web/", "timeout": 60},
        {"name": "pacs2", "kind": "dicom", "ae_title": "PACS2", "host": "h", "port": 11112},
    ]})
    dimse, web, dimse2 = config.destinations
    assert isinstance(dimse, Destination) and dimse.kind == dimse2.kind == "dicom"
    assert web == DicomwebDestination("web", "https://pacs.example.org/dicom-web", timeout=60.0)
    assert web.kind == "dicomweb"
    assert Destination.parse("PACS@h:104").kind == "dicom"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"name": "w", "kind": "stow", "url": "http://h/x"},
         "destinations[0].kind: expected one of dicom, dicomweb"),
        ({"name": "w", "kind": "dicomweb"}, 'destinations[0].url: required for kind = "dicomweb"'),
        ({"kind": "dicomweb", "url": "http://h/x"}, 'destinations[0].name: required for kind = "dicomweb"'),
        ({"name": "w", "kind": "dicomweb", "url": "ftp://h/x"},
         "destinations[0].url: expected the DICOMweb root"),
        ({"name": "w", "kind": "dicomweb", "url": 5}, "destinations[0].url: expected str"),
        ({"name": "w", "kind": "dicomweb", "url": "http://h/x", "port": 104},
         'destinations[0].port: only for kind = "dicom"'),
        ({"ae_title": "P", "host": "h", "port": 1, "url": "http://h/x"},
         'destinations[0].url: only for kind = "dicomweb"'),
        ({"kind": "dicom", "host": "h", "port": 1}, "destinations[0].ae_title: required"),
    ],
)
def test_destination_kind_errors_name_the_key(table: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"destinations": [table]})
    assert message in str(err.value)


def test_output_switches_per_destination() -> None:
    config = parse_config({"destinations": [
        {"ae_title": "PACS", "host": "h", "port": 104, "labelmap": True, "encapsulated_stl": ["bone"]},
        {"ae_title": "LAB", "host": "h", "port": 105, "encapsulated_stl": True, "sr": False},
    ]})
    pacs, lab = config.destinations
    assert (pacs.labelmap, pacs.encapsulated_stl, pacs.surfaces, pacs.sr) == (True, ("bone",), True, True)
    assert (lab.labelmap, lab.encapsulated_stl, lab.sr) == (False, True, False)
    with pytest.raises(ConfigError, match=r"destinations\[0\].labelmap: expected bool"):
        parse_config({"destinations": [{"ae_title": "P", "host": "h", "port": 1, "labelmap": "yes"}]})
    with pytest.raises(ConfigError, match=r"destinations\[0\].encapsulated_stl\[0\]: expected str"):
        parse_config({"destinations": [{"ae_title": "P", "host": "h", "port": 1, "encapsulated_stl": [1]}]})


def test_destination_max_attempts() -> None:
    config = parse_config({"destinations": [{"ae_title": "P", "host": "h", "port": 1, "max_attempts": 3}]})
    assert config.destinations[0].max_attempts == 3
    with pytest.raises(ConfigError, match=r"destinations\[0\].max_attempts: must be > 0"):
        parse_config({"destinations": [{"ae_title": "P", "host": "h", "port": 1, "max_attempts": 0}]})


def test_models_section_and_default_rule_model(tmp_path: Path) -> None:
    weights = tmp_path / "net.onnx"
    weights.write_bytes(b"not really a network")
    (tmp_path / "v.toml").write_text(
        'model = "lungs"\ngpu_jobs_per_device = 2\n'
        '[[models]]\nname = "lungs"\nkind = "onnx"\npath = "net.onnx"\n'
        'labels = {1 = "lung_left", 2 = "lung_right"}\n')
    config = load_config(tmp_path / "v.toml")
    assert config.rules[0].model == "lungs" and config.gpu_jobs_per_device == 2
    assert Path(config.models["lungs"].path) == weights  # relative to the config file
    (tmp_path / "bad.toml").write_text('[[rules]]\nmodel = "nowhere"\n')
    with pytest.raises(ConfigError, match=r"rules\[0\].model: .*nowhere"):
        load_config(tmp_path / "bad.toml")
