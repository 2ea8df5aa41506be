"""The container images, checked without a Docker daemon: hadolint on every Dockerfile, and what the
node images (CPU, CUDA) would run (entrypoint, configuration, health check, user) against the code
they package."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from tests.conftest import ROOT
from vesalius.node.cli import build_parser
from vesalius.node.config import DEFAULT_HTTP_PORT, DEFAULT_PORT, load_config

DOCKER = ROOT / "docker"
NODE_DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
DOCKERFILES = [*NODE_DOCKERFILES, DOCKER / "Dockerfile.ohif"]


def parse(path: Path) -> DockerfileParser:
    return DockerfileParser(fileobj=path.open("rb"))


@pytest.fixture(scope="module", params=NODE_DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request: pytest.FixtureRequest) -> DockerfileParser:
    return parse(request.param)


def instructions(dockerfile: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in dockerfile.structure if i["instruction"] == name]


def runs(dockerfile: DockerfileParser) -> str:
    return " ".join(instructions(dockerfile, "RUN"))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(path: Path) -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    # DL3008/DL3013: unpinned apt/pip versions are a choice here (security updates at each build)
    result = subprocess.run([str(hadolint), "--ignore", "DL3008", "--ignore", "DL3013",
                             "--failure-threshold", "info", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_image_runs_as_an_unprivileged_user_with_a_health_check(path: Path) -> None:
    dockerfile = parse(path)
    users = instructions(dockerfile, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    last = {i["instruction"]: i["startline"] for i in dockerfile.structure}
    assert last["USER"] > max(i["startline"] for i in dockerfile.structure if i["instruction"] == "RUN")
    assert len(instructions(dockerfile, "HEALTHCHECK")) == 1


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists(path: Path) -> None:
    for value in instructions(parse(path), "COPY"):
        *sources, _ = shlex.split(value)
        if sources[0].startswith("--from="):  # from an earlier build stage, not the source tree
            continue
        for source in sources:
            assert (ROOT / source).exists(), source


def test_the_node_runs_as_an_unprivileged_user(dockerfile: DockerfileParser) -> None:
    users = instructions(dockerfile, "USER")
    assert users and users[-1] not in ("root", "0")
    entrypoint_line = max(i["startline"] for i in dockerfile.structure if i["instruction"] == "ENTRYPOINT")
    user_line = max(i["startline"] for i in dockerfile.structure if i["instruction"] == "USER")
    assert user_line < entrypoint_line


def test_entrypoint_is_a_valid_serve_command_with_a_valid_config(dockerfile: DockerfileParser) -> None:
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


def test_health_check_asks_healthz_on_the_http_port(dockerfile: DockerfileParser) -> None:
    (check,) = instructions(dockerfile, "HEALTHCHECK")
    assert f"127.0.0.1:{DEFAULT_HTTP_PORT}/healthz" in check


def test_extras_are_a_build_argument_and_dcmtk_is_not_installed(dockerfile: DockerfileParser) -> None:
    assert dockerfile.args.get("EXTRAS") == "ai"
    assert '".${EXTRAS:+[$EXTRAS]}"' in runs(dockerfile)
    assert "dcmtk" not in runs(dockerfile)


def test_cuda_image_keeps_the_base_images_torch() -> None:
    cuda = parse(DOCKER / "Dockerfile.cuda")
    base = cuda.baseimage
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", base), base
    install = runs(cuda)
    assert not re.search(r"pip install[^&;]*\btorch\b", install), "torch comes from the base image"
    # every pip install of the build and of later layers is held to the base image's torch
    assert "torch.__version__" in install and "> /etc/pip-constraints.txt" in install
    assert "PIP_CONSTRAINT=/etc/pip-constraints.txt pip install" in install
    assert cuda.envs.get("PIP_CONSTRAINT") == "/etc/pip-constraints.txt"
    # the scale-out extras go in by the same argument: EXTRAS="ai,postgres,ray"
    assert "--build-arg EXTRAS=ai,postgres,ray" in (DOCKER / "Dockerfile.cuda").read_text()


def dockerignored(path: str) -> bool:
    """Whether the repository's .dockerignore keeps ``path`` (or a folder above it) out of the build
    context: its patterns in order, the last match deciding (``!`` re-includes)."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        exclude, pattern = not line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = Path(path).parts
        if any(fnmatch.fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            ignored = exclude
    return ignored


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_build_context_holds_what_the_image_copies_and_not_the_venv(path: Path) -> None:
    for value in instructions(parse(path), "COPY"):
        *sources, _ = shlex.split(value)
        if not sources[0].startswith("--from="):
            for source in sources:
                assert not dockerignored(source), f"{source} is in .dockerignore"
    assert dockerignored(".venv") and dockerignored("node/api/web/node_modules/three")
    assert dockerignored("tests/ohif/node_modules/@ohif/app/dist/index.html")
