"""docker/compose.yaml (and the KubeRay example) checked without a Docker daemon: valid against the
Compose specification's JSON schema (the copy check-jsonschema ships: nothing downloaded), and every
path, port and setting in it the same as what the tests run: the Orthanc and OHIF configuration
files are the ones tests/orthanc_peer.py and tests/ohif_peer.py use, the node's AE title and ports
agree with Orthanc's entry for it and with the published ports, OHIF reads the compose Orthanc's
DICOMweb root, and the scale-out configuration loads with the node's own loader."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from tests.conftest import ROOT
from tests.ohif_peer import APP_CONFIG_JS, OHIF_VERSION
from tests.orthanc_peer import COMPOSE_CONFIG, PLUGIN, TEST_OVERRIDES, orthanc_config, read_commented_json
from vesalius.node.cli import build_parser
from vesalius.node.config import load_config, with_overrides

DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
PROFILES = {"embedded": {"embedded"}, "scale-out": {"scale-out"}}  # what each documented command enables
NODE_ALIAS = "vesalius"  # the host of Orthanc's DicomModalities entry for the node


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def orthanc() -> dict[str, Any]:
    return read_commented_json(COMPOSE_CONFIG)


def enabled(compose: dict[str, Any], profile: str) -> dict[str, dict[str, Any]]:
    """The services `docker compose --profile <profile> up` starts (docker/.env gives the default)."""
    return {name: s for name, s in compose["services"].items()
            if not s.get("profiles") or set(s["profiles"]) & PROFILES[profile]}


def binds(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a repository path for bind mounts, else the volume's name)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        found[target] = str((DOCKER / source).resolve()) if source.startswith(".") else source
    return found


def published(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port, each published on 127.0.0.1 only."""
    ports = {}
    for spec in service.get("ports", []):
        address, host, container = spec.split(":")
        assert address == "127.0.0.1", f"{spec}: a demo publishes on the loopback interface only"
        ports[int(container)] = int(host)
    return ports


def dockerfile_of(service: dict[str, Any]) -> DockerfileParser:
    build = service["build"]
    assert (DOCKER / build["context"]).resolve() == ROOT
    return DockerfileParser(fileobj=(ROOT / build["dockerfile"]).open("rb"))


def entrypoint_config(service: dict[str, Any]) -> tuple[str, str]:
    """(--config, --data-dir) of the image's `vesalius serve` entrypoint."""
    entrypoint = json.loads([i["value"] for i in dockerfile_of(service).structure
                             if i["instruction"] == "ENTRYPOINT"][-1])
    args = build_parser().parse_args(entrypoint[3:])
    return args.config, args.data_dir


def node_services(compose: dict[str, Any], profile: str) -> dict[str, dict[str, Any]]:
    """The listeners: services running the node's `vesalius serve` entrypoint."""
    return {n: s for n, s in enabled(compose, profile).items() if "build" in s and "entrypoint" not in s
            and "Dockerfile.ohif" not in s["build"]["dockerfile"]}


def test_compose_file_is_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    schema_file = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    assert schema["title"] == "Compose Specification"
    jsonschema.validators.validator_for(schema).check_schema(schema)
    errors = [f"{e.json_path}: {e.message}" for e in
              jsonschema.validators.validator_for(schema)(schema).iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_profiles_never_run_both_set_ups_and_every_dependency_is_enabled(compose: dict[str, Any]) -> None:
    assert re.search(r"(?m)^COMPOSE_PROFILES=embedded$", (DOCKER / ".env").read_text())
    for profile in PROFILES:
        services = enabled(compose, profile)
        for name, service in services.items():
            for dependency in service.get("depends_on", []):  # one disabled by the profile: invalid project
                assert dependency in services, f"{profile}: {name} depends on {dependency}"
        hosts = [p for s in services.values() for p in published(s).values()]
        assert len(hosts) == len(set(hosts)), f"{profile}: a host port published twice"
        # exactly the node's listeners answer to the name Orthanc sends to
        answering = [n for n, s in services.items() if n == NODE_ALIAS
                     or NODE_ALIAS in s.get("networks", {}).get("default", {}).get("aliases", [])]
        assert answering and set(answering) == set(node_services(compose, profile)), profile
    assert set(enabled(compose, "embedded")) == {"orthanc", "ohif", "vesalius"}
    scale_out = set(enabled(compose, "scale-out"))
    assert {"postgres", "ray-head", "ray-gpu-worker", "vesalius-1", "vesalius-2"} <= scale_out


def test_every_mounted_and_built_file_is_in_the_repository(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for target, source in binds(service).items():
            if source.startswith("/"):
                assert Path(source).is_file(), f"{name}: {source} mounted at {target}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]).is_file()


def test_orthanc_runs_the_files_the_tests_run(compose: dict[str, Any], orthanc: dict[str, Any],
                                             tmp_path: Path) -> None:
    service = compose["services"]["orthanc"]
    mounts = binds(service)
    assert mounts["/etc/orthanc/orthanc.json"] == str(COMPOSE_CONFIG)
    assert mounts[orthanc["PythonScript"]] == str(PLUGIN)
    assert mounts[orthanc["StorageDirectory"]] == "orthanc-db"
    # a test Orthanc differs from compose's only in the keys a test run must set for itself
    test_config = orthanc_config(tmp_path, 1, 2, vesalius=None, modalities={})
    assert TEST_OVERRIDES <= set(orthanc)
    for key, value in orthanc.items():
        if key not in TEST_OVERRIDES:
            assert test_config[key] == value, key
    assert set(test_config) - set(orthanc) == set()
    assert published(service) == {orthanc["HttpPort"]: 8042, orthanc["DicomPort"]: 4242}
    # the orthancteam image enables the DICOMweb plugin by its section, the Python one by PythonScript
    assert orthanc["DicomWeb"]["Enable"] is True and orthanc["Plugins"] == ["/usr/share/orthanc/plugins/"]


@pytest.mark.parametrize("profile", PROFILES)
def test_the_node_and_orthanc_agree_on_each_other(compose: dict[str, Any], orthanc: dict[str, Any],
                                                  profile: str) -> None:
    services = compose["services"]
    ae, host, dicom_port = orthanc["DicomModalities"][orthanc["Vesalius"]["Modality"]]
    assert host == NODE_ALIAS
    orthanc_mounts = binds(services["orthanc"])
    token_dir = str(PurePosixPath(orthanc["Vesalius"]["NodeHttpTokenFile"]).parent)
    for name, service in node_services(compose, profile).items():
        config_path, data_dir = entrypoint_config(service)
        mounts = binds(service)
        config = load_config(Path(mounts[config_path]))
        assert (config.ae_title, config.port) == (ae, dicom_port), name
        assert orthanc["Vesalius"]["NodeHttpUrl"] == f"http://{NODE_ALIAS}:{config.http_port}"
        assert config.port in published(service) and config.http_port in published(service)
        # the plugin reads the node's own token from the node's data volume
        assert mounts[data_dir] == orthanc_mounts[token_dir], name
        assert orthanc["Vesalius"]["NodeHttpTokenFile"] == f"{token_dir}/http.token"
        # results go to the compose Orthanc, by its AE title and DICOM port
        args = build_parser().parse_args(["serve", *service["command"]])
        (destination,) = with_overrides(config, destinations=args.destination).destinations[-1:]
        assert (destination.ae_title, destination.host, destination.port) == (
            orthanc["DicomAet"], "orthanc", orthanc["DicomPort"])
    first = next(iter(node_services(compose, profile).values()))
    http_port = load_config(Path(binds(first)[entrypoint_config(first)[0]])).http_port
    assert orthanc["Vesalius"]["NodeDashboardUrl"] == f"http://127.0.0.1:{published(first)[http_port]}"


def test_ohif_reads_the_compose_orthancs_dicomweb_root(compose: dict[str, Any],
                                                       orthanc: dict[str, Any]) -> None:
    service = compose["services"]["ohif"]
    dockerfile = dockerfile_of(service)
    copies = {shlex.split(i["value"])[-1]: shlex.split(i["value"])[-2] for i in dockerfile.structure
              if i["instruction"] == "COPY"}
    html = copies["/usr/share/nginx/html"].split("/dist")[0]  # --from=ohif /ohif/node_modules/@ohif/app
    assert html.endswith("node_modules/@ohif/app")
    assert ROOT / copies["/usr/share/nginx/html/app-config.js"] == APP_CONFIG_JS  # the tests' own file
    assert copies["./"] == "tests/ohif/package-lock.json"  # the tests' pinned, integrity-checked viewer
    lock = json.loads((ROOT / "tests" / "ohif" / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/@ohif/app"]["version"] == OHIF_VERSION
    # the viewer asks its own origin; nginx forwards that path to Orthanc's DICOMweb root
    app_config = APP_CONFIG_JS.read_text()
    roots = set(re.findall(r"(?:wadoUriRoot|qidoRoot|wadoRoot): '([^']*)'", app_config))
    assert roots == {"/dicom-web"}
    nginx = (ROOT / copies["/etc/nginx/conf.d/default.conf"]).read_text()
    forward = re.search(r"location (\S+) \{[^}]*?\}?[^}]*proxy_pass (\S+);", nginx)
    assert forward and forward[1] == "/dicom-web/"
    assert forward[2] == f"http://orthanc:{orthanc['HttpPort']}{orthanc['DicomWeb']['Root']}"
    listening = re.search(r"listen (\d+);", nginx)
    assert listening
    listen = int(listening[1])
    assert listen in published(service)
    assert f"127.0.0.1:{listen}/" in next(i["value"] for i in dockerfile.structure
                                         if i["instruction"] == "HEALTHCHECK")


def test_scale_out_state_workers_and_volume(compose: dict[str, Any]) -> None:
    services = enabled(compose, "scale-out")
    listeners = node_services(compose, "scale-out")
    assert len(listeners) >= 2
    path = Path(binds(next(iter(listeners.values())))["/etc/vesalius/vesalius.toml"])
    assert path == DOCKER / "vesalius-scale.toml"
    config = load_config(path)
    assert load_config(DOCKER / "vesalius.toml").host == config.host == "0.0.0.0"
    data = tomllib.loads(path.read_text())
    postgres = services["postgres"]
    assert postgres["image"].split(":")[0] == "postgres"
    env = postgres["environment"]
    assert data["database"]["url"] == f"postgresql://{env['POSTGRES_USER']}@postgres:5432/{env['POSTGRES_DB']}"
    head = services["ray-head"]["entrypoint"]
    head_port = next(a.split("=")[1] for a in head if a.startswith("--port="))
    assert data["ray"]["address"] == f"ray-head:{head_port}"
    assert "--head" in head and "--num-gpus=0" in head
    worker = services["ray-gpu-worker"]
    assert f"--address=ray-head:{head_port}" in worker["entrypoint"]
    # every GPU of the machine in one worker node, counted by Ray (one GPU actor each)
    assert not any(a.startswith("--num-gpus") for a in worker["entrypoint"])
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == "all" and device["capabilities"] == ["gpu"]
    # one image for listeners, head and workers (a Ray driver and its cluster must match), built
    # from the CUDA Dockerfile with the scale-out extras
    nodes = {**listeners, "ray-head": services["ray-head"], "ray-gpu-worker": worker}
    assert {s["image"] for s in nodes.values()} == {"vesalius-cuda"}
    for name, service in nodes.items():
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.cuda",
                                    "args": {"EXTRAS": "ai,postgres,ray"}}, name
        _, data_dir = entrypoint_config(service)
        assert binds(service)[data_dir] == "vesalius-data", f"{name}: the shared spool and results"
    for name, service in listeners.items():
        assert service["environment"]["PGPASSWORD"] == env["POSTGRES_PASSWORD"], name
        assert service["hostname"] == name
    assert config.database.url == data["database"]["url"]
    assert config.ray.address == data["ray"]["address"]
    assert config.lease_seconds == data["lease_seconds"]


def test_kuberay_example_uses_composes_image_ports_and_paths(compose: dict[str, Any]) -> None:
    documents = list(yaml.safe_load_all((DOCKER / "kuberay.yaml").read_text()))
    claim = next(d for d in documents if d["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod mounts the shared spool
    cluster = next(d for d in documents if d["kind"] == "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    services = compose["services"]
    head_port = next(a.split("=")[1] for a in services["ray-head"]["entrypoint"] if a.startswith("--port="))
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["port"] == head_port and head["rayStartParams"]["num-gpus"] == "0"
    groups = cluster["spec"]["workerGroupSpecs"]
    gpu = next(g for g in groups if g["rayStartParams"].get("num-gpus") == "1")
    image_user = next(i["value"] for i in dockerfile_of(services["ray-head"]).structure
                      if i["instruction"] == "USER").split(":")
    _, data_dir = entrypoint_config(services["ray-head"])
    for pod in (head["template"]["spec"], gpu["template"]["spec"]):
        (container,) = pod["containers"]
        assert container["image"] == services["ray-head"]["image"]
        security = pod["securityContext"]
        assert [str(security["runAsUser"]), str(security["runAsGroup"])] == image_user
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts[data_dir]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        probe = container["readinessProbe"]["exec"]["command"]
        assert probe[:3] == ["ray", "health-check", "--address"] and probe[3].endswith(f":{head_port}")
    (gcs,) = head["template"]["spec"]["containers"][0]["ports"]
    assert gcs["containerPort"] == int(head_port)
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert f"{cluster['metadata']['name']}-head-svc:{head_port}" in (DOCKER / "kuberay.yaml").read_text()
