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
        ("port = 'x'", "port: expected an integer"),
        ("port = 70000", "port: port must be 0-65535"),
        ("ae_title = 'MUCH_TOO_LONG_AE_TITLE'", "ae_title: an AE title is 1-16"),
        ("quiet_period = -1", "quiet_period: must be > 0"),
        ("[[destinations]]\nae_title = 'P'\nhost = 'h'", "destinations[0].port: required"),
        ("[[rules]]\nseries_description = '(('", "rules[0].series_description: not a valid regular"),
        ("[[rules]]\ndestinations = ['nowhere']", "rules[0].destinations: unknown destination 'nowhere'"),
        ("[[rules]]\nmodel = 3", "rules[0].model: expected a string"),
        ("[retry]\nmax_attempts = true", "retry.max_attempts: expected an integer, got True"),
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
        ({"name": "w", "kind": "dicomweb", "url": 5}, "destinations[0].url: expected a string"),
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
        {"ae_title": "LAB", "host": "h", "port": 105, "encapsulated_stl": True, "sr": False,
         "preview": False},
    ]})
    pacs, lab = config.destinations
    assert (pacs.labelmap, pacs.encapsulated_stl, pacs.surfaces, pacs.sr) == (True, ("bone",), True, True)
    assert (lab.labelmap, lab.encapsulated_stl, lab.sr) == (False, True, False)
    assert (pacs.preview, lab.preview) == (True, False)  # the 3D preview: on unless switched off
    with pytest.raises(ConfigError, match=r"destinations\[0\].labelmap: expected true or false"):
        parse_config({"destinations": [{"ae_title": "P", "host": "h", "port": 1, "labelmap": "yes"}]})
    with pytest.raises(ConfigError, match=r"destinations\[0\].encapsulated_stl: expected true or false or"):
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


# --- configuration that refuses what cannot work (issue 13) --------------------------------------------


@pytest.mark.parametrize("value", ["yes", 1, ["bone", 2], {"bone": True}])
def test_encapsulated_stl_is_true_false_or_names(value: object) -> None:
    """A string was once iterated as structure names: no STL was ever sent."""
    with pytest.raises(ConfigError) as err:
        parse_config({"destinations": [{"ae_title": "P", "host": "h", "port": 1, "encapsulated_stl": value}]})
    assert str(err.value).startswith(
        "destinations[0].encapsulated_stl: expected true or false or a list of strings, got ")


def test_selected_structures_must_be_produced_by_the_routed_models() -> None:
    from vesalius.inference.models.builtin_ct import BuiltinCT
    from vesalius.node.cli import check_models

    produced = sorted(label.name for label in BuiltinCT.structures)
    check_models(parse_config({"destinations": [
        {"ae_title": "P", "host": "h", "port": 1, "encapsulated_stl": ["bone"]}]}))
    unrouted = {"ae_title": "Q", "host": "h", "port": 2, "encapsulated_stl": ["bones"]}
    for data in ({"destinations": [unrouted]},  # routed by the default rule (all destinations)
                 {"destinations": [{"ae_title": "P", "host": "h", "port": 1}, unrouted],
                  "rules": [{"name": "ct", "destinations": ["P"]}]}):  # routed by no rule: all models
        with pytest.raises(ConfigError) as err:
            check_models(parse_config(data))
        which = "the routed models" if "rules" in data else "models builtin_ct"
        assert str(err.value) == (f"destinations[{len(data['destinations']) - 1}].encapsulated_stl: 'bones' "
                                  f"is not a structure {which} produce (known: {', '.join(produced)})")


# One wrong type per section: every section is checked by its fields' annotations.
@pytest.mark.parametrize(("data", "message"), [
    ({"host": 1}, "host: expected a string, got 1"),
    ({"data_dir": 5}, "data_dir: expected a path, got 5"),
    ({"allowed_calling_aes": [1]}, "allowed_calling_aes: expected a list of strings, got (1,)"),
    ({"idle_timeout": "1"}, "idle_timeout: expected a number, got '1'"),
    ({"rules": [{"modality": 1}]}, "rules[0].modality: expected a list of strings, got 1"),
    ({"rules": [{"min_slices": 1.5}]}, "rules[0].min_slices: expected an integer, got 1.5"),
    ({"rules": [{"prefer": ["thinnest", 3]}]}, "rules[0].prefer: expected a list of strings"),
    ({"rules": [{"trigger": True}]}, "rules[0].trigger: expected a string, got True"),
    ({"rules": ["ct"]}, "rules[0]: expected a table, got str"),
    ({"retry": {"base_delay": "5s"}}, "retry.base_delay: expected a number, got '5s'"),
    ({"retry": 3}, "retry: expected a table, got int"),
    ({"retention": {"spool_days": [7]}}, "retention.spool_days: expected a number, got (7,)"),
    ({"tls": {"certificate": 1, "private_key": "k", "require_client_certificate": False}, "tls_port": 2762},
     "tls.certificate: expected a path, got 1"),
    ({"tls": {"certificate": "c", "private_key": "k", "require_client_certificate": "no"}, "tls_port": 2762},
     "tls.require_client_certificate: expected true or false, got 'no'"),
    ({"http_tokens": [{"name": "a", "token": 12345678901234567}]},
     "http_tokens[0].token: expected a string, got 12345678901234567"),
    ({"destinations": [{"ae_title": "P", "host": "h", "port": "104"}]},
     "destinations[0].port: expected an integer, got '104'"),
    ({"destinations": [{"ae_title": "P", "host": "h", "port": 1, "sr": "no"}]},
     "destinations[0].sr: expected true or false, got 'no'"),
    ({"destinations": [{"name": "w", "kind": "dicomweb", "url": "http://h/x", "timeout": "30"}]},
     "destinations[0].timeout: expected a number, got '30'"),
    ({"destinations": [{"name": "f", "kind": "folder", "path": "out", "deidentify": True}]},
     "destinations[0].deidentify: expected a string, got True"),
    ({"destinations": [{"ae_title": "P", "host": "h", "port": 1, "tls": True, "tls_verify_hostname": 1}]},
     "destinations[0].tls_verify_hostname: expected true or false, got 1"),
    ({"models": [{"name": "m", "kind": "onnx", "path": "m.onnx", "fast": "yes"}]},
     "models[0].fast: expected true or false, got 'yes'"),
])
def test_a_wrong_type_in_any_section_names_its_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert str(err.value).startswith(message), str(err.value)


def test_sections_validate_however_they_are_built() -> None:
    """The dataclasses check themselves: code building a section gets the same checks as TOML."""
    from vesalius.inference.fields import FieldError
    from vesalius.node.config import Retry, Rule

    with pytest.raises(FieldError, match=r"^max_delay: must be > 0, got 0"):
        Retry(max_delay=0)
    with pytest.raises(FieldError, match=r"^kernel: not a valid regular expression"):
        Rule(name="r", kernel="((")
    with pytest.raises(FieldError, match=r"^ae_title: an AE title is 1-16"):
        Destination("p", "", "h", 1)


# A launcher that makes torch and MONAI unimportable, as on a node installed without the `ai` extra.
WITHOUT_AI = ("import sys; sys.modules.update(torch=None, monai=None)\n"
              "from vesalius.node.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")


@pytest.mark.parametrize("command", ["models", "serve", "process"])
def test_a_model_whose_runtime_is_missing_names_the_extra(tmp_path: Path, command: str) -> None:
    import subprocess
    import sys

    from tests.phantoms import Sphere, write_phantom_series
    from tests.test_models_registry import write_bundle_skeleton

    bundle = write_bundle_skeleton(tmp_path / "m")  # weights present: only the runtime is missing
    write_phantom_series(tmp_path / "series", shape=(2, 8, 8), objects=[Sphere((0, 0, 0), 2, 100)])
    reference = f"bundle:{bundle}"
    args = {"models": ["models", "--model", reference],
            "serve": ["serve", "--model", reference, "--port", "0", "--http-port", "0",
                      "--data-dir", str(tmp_path / "data")],
            "process": ["process", str(tmp_path / "series"), "--out", str(tmp_path / "out"),
                        "--model", reference]}[command]
    result = subprocess.run([sys.executable, "-c", WITHOUT_AI, *args], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "needs MONAI and torch: pip install 'vesalius[ai]'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    if command == "models":
        assert "RUNTIME MISSING" in result.stdout


def test_each_runtime_kind_names_its_extra() -> None:
    from vesalius.inference.models.backend import backend_for
    from vesalius.inference.models.kinds import BACKEND_MODULES

    extras = {kind: backend_for(kind).extra for kind in BACKEND_MODULES}
    assert extras == {"builtin": "", "bundle": "ai", "torchscript": "ai", "onnx": "ai", "nnunet": "nnunet",
                      "totalsegmentator": "totalsegmentator"}
    assert backend_for("builtin").runtime_problems() == []
    assert backend_for("bundle").runtime_problems() == []  # the test environment has the ai extra
