"""The container image, checked without a Docker daemon: hadolint on the Dockerfile, and what the
image would run (entrypoint, configuration, health check, user) against the code it packages."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from tests.conftest import ROOT
from vesalius.node.cli import build_parser
from vesalius.node.config import DEFAULT_HTTP_PORT, DEFAULT_PORT, load_config

DOCKERFILE = ROOT / "docker" / "Dockerfile"


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(fileobj=DOCKERFILE.open("rb"))
    return parser


def instructions(dockerfile: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in dockerfile.structure if i["instruction"] == name]


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    # DL3008/DL3013: unpinned apt/pip versions are a choice here (security updates at each build)
    result = subprocess.run([str(hadolint), "--ignore", "DL3008", "--ignore", "DL3013",
                             "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_node_runs_as_an_unprivileged_user(dockerfile: DockerfileParser) -> None:
    users = instructions(dockerfile, "USER")
    assert users and users[-1] not in ("root", "0")
    entrypoint_line = max(i["startline"] for i in dockerfile.structure if i["instruction"] == "ENTRYPOINT")
    user_line = max(i["startline"] for i in dockerfile.structure if i["instruction"] == "USER")
    assert user_line < entrypoint_line


def test_entrypoint_is_a_valid_serve_command_with_a_valid_config(dockerfile: DockerfileParser) -> None:
    import json

    entrypoint = json.loads(instructions(dockerfile, "ENTRYPOINT")[-1])
    assert entrypoint[:2] == ["tini", "--"], "PID 1 must forward SIGTERM and reap the workers"
    args = build_parser().parse_args(entrypoint[3:])
    assert entrypoint[2] == "vesalius" and args.command == "serve"
    copies = [shlex.split(v) for v in instructions(dockerfile, "COPY")]
    copied = {parts[-1]: parts[0] for parts in copies if len(parts) == 2}  # destination: source
    config = load_config(ROOT / copied[args.config])
    assert config.host == config.http_host == "0.0.0.0"  # inside the container: reachable through -p
    assert sorted(int(p) for v in instructions(dockerfile, "EXPOSE") for p in v.split()) == sorted(
        [config.port, config.http_port]) == sorted([DEFAULT_PORT, DEFAULT_HTTP_PORT])


def test_every_copied_path_exists(dockerfile: DockerfileParser) -> None:
    for value in instructions(dockerfile, "COPY"):
        *sources, _ = shlex.split(value)
        if sources[0].startswith("--from="):  # from an earlier build stage, not the source tree
            continue
        for source in sources:
            assert (ROOT / source).exists(), source


def test_health_check_asks_healthz_on_the_http_port(dockerfile: DockerfileParser) -> None:
    (check,) = instructions(dockerfile, "HEALTHCHECK")
    assert f"127.0.0.1:{DEFAULT_HTTP_PORT}/healthz" in check


def test_extras_are_a_build_argument_and_dcmtk_is_not_installed(dockerfile: DockerfileParser) -> None:
    assert dockerfile.args.get("EXTRAS") == "ai"
    runs = " ".join(instructions(dockerfile, "RUN"))
    assert '".${EXTRAS:+[$EXTRAS]}"' in runs
    assert "dcmtk" not in runs
