"""The HTTP API of a running node: local by default, bearer tokens, listings, actions, metrics."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.peers import NodeProcess, vesalius_node, wait_for
from vesalius.node.config import Config, ConfigError, parse_config
from vesalius.node.store import SeriesInfo, Store

OPS_TOKEN = "ops-token-0123456789abcdef"
NO_JOBS = '[[rules]]\nname = "none"\nmodality = ["NO_SUCH_MODALITY"]\n'


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    tmp = tmp_path_factory.mktemp("http")
    token_file = tmp / "ops.token"
    token_file.write_text(OPS_TOKEN + "\n")
    token_file.chmod(0o600)
    config = f'[[http_tokens]]\nname = "ops"\ntoken_file = "{token_file}"\n' + NO_JOBS
    with vesalius_node(tmp, config=config) as running:
        yield running


def local_addresses() -> set[str]:
    """This machine's IPv4 addresses besides loopback (from `hostname -I`)."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return {a for a in out if "." in a and not a.startswith("127.")}


def listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_listings_and_actions_need_a_token(node: NodeProcess) -> None:
    for path, method in (("/series", "GET"), ("/jobs", "GET"), ("/deliveries", "GET"),
                         ("/jobs/1/retry", "POST"), ("/jobs/1/resend", "POST"), ("/no-such-page", "GET")):
        status, body = node.request(path, method, token=None)
        assert status == 401, (path, status, body)
    wait_for(lambda: "GET /series from 127.0.0.1:" in node.log() and "missing bearer token" in node.log(),
             5, "the log line for a missing token")


def test_wrong_token_is_refused_and_logged_with_the_address_not_the_token(node: NodeProcess) -> None:
    wrong = "not-the-token-but-long-enough"
    request = urllib.request.Request(f"http://127.0.0.1:{node.http_port}/jobs",
                                     headers={"Authorization": f"Bearer {wrong}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 401
    assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")
    line = wait_for(lambda: next((ln for ln in node.log().splitlines()
                                  if "GET /jobs from 127.0.0.1:" in ln and "wrong bearer token" in ln), None),
                    5, "the log line for a wrong token")
    assert "refused" in line
    assert wrong not in node.log() and node.token() not in node.log() and OPS_TOKEN not in node.log()
    assert node.request("/jobs", token="Bearer")[0] == 401


def test_the_local_and_the_configured_tokens_are_accepted(node: NodeProcess) -> None:
    assert node.request("/series")[0] == 200
    status, jobs = node.request("/jobs", token=OPS_TOKEN)
    assert status == 200 and isinstance(jobs, list)


def test_healthz_and_metrics_are_public_by_default(node: NodeProcess) -> None:
    assert node.request("/healthz", token=None) == (200, {"status": "ok"})
    status, text = node.request("/metrics", token=None)
    assert status == 200 and "vesalius_instances_received_total" in text


def test_metrics_need_a_token_when_not_public(tmp_path: Path) -> None:
    with vesalius_node(tmp_path, config="metrics_public = false\n" + NO_JOBS) as closed:
        assert closed.request("/metrics", token=None)[0] == 401
        status, text = closed.request("/metrics")
        assert status == 200 and "vesalius_series_completed_total" in text
        assert closed.request("/healthz", token=None)[0] == 200


def test_http_answers_only_on_loopback_by_default(node: NodeProcess) -> None:
    assert Config().http_host == "127.0.0.1" and Config().host == "0.0.0.0"
    assert listening_addresses(node.http_port) == {"127.0.0.1"}
    for address in local_addresses():  # the machine's other addresses get no answer
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((address, node.http_port)) != 0, address
    assert f"http=127.0.0.1:{node.http_port}" in node.log()


def test_http_host_can_open_it_to_the_network(tmp_path: Path) -> None:
    http_port = free_port()
    with vesalius_node(tmp_path, config='http_host = "0.0.0.0"\n' + NO_JOBS, http_port=http_port) as exposed:
        assert listening_addresses(http_port) == {"0.0.0.0"}
        assert exposed.request("/series", token=None)[0] == 401  # exposed, still behind the token


def test_token_file_is_created_0600_at_first_start_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with vesalius_node(tmp_path, data_dir=data_dir, config=NO_JOBS) as first:
        token_path = data_dir / "http.token"
        assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
        token = first.token()
        assert len(token) >= 32
        assert str(token_path) in first.log() and token not in first.log()
    with vesalius_node(tmp_path, data_dir=data_dir, config=NO_JOBS) as second:
        assert second.token() == token and second.request("/jobs", token=token)[0] == 200
        assert "created the HTTP API token" not in second.log()
    token_path.chmod(0o644)  # readable by others: the node refuses to start
    result = subprocess.run([sys.executable, "-m", "vesalius.node.cli", "serve", "--data-dir", str(data_dir),
                             "--port", "0", "--http-port", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "chmod 600" in result.stderr
    assert token not in result.stderr


def test_token_configuration_is_checked() -> None:
    config = parse_config({"http_tokens": [{"name": "orthanc", "token": "x" * 20}], "http_host": "0.0.0.0",
                           "metrics_public": False})
    assert config.http_tokens[0].name == "orthanc" and "x" * 20 not in repr(config)
    bad = [({"http_tokens": [{"name": "a", "token": "short"}]}, "at least 16"),
           ({"http_tokens": [{"token": "x" * 20}]}, "http_tokens[0].name: required"),
           ({"http_tokens": [{"name": "a b", "token": "x" * 20}]}, "http_tokens[0].name"),
           ({"http_tokens": [{"name": "a"}]}, "exactly one of token_file"),
           ({"http_tokens": [{"name": "a", "token": "x" * 20}, {"name": "a", "token": "y" * 20}]}, "unique"),
           ({"http_tokens": [{"name": "local", "token": "x" * 20}]}, "not 'local'"),
           ({"http_tokens": [{"name": "a", "secret": "x"}]}, "unknown key"),
           ({"metrics_public": "no"}, "metrics_public: expected true or false"),
           ({"http_host": 1}, "http_host: expected a string")]
    for table, message in bad:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_config(table)


def test_a_world_readable_configured_token_file_stops_the_node(tmp_path: Path) -> None:
    token_file = tmp_path / "open.token"
    token_file.write_text(OPS_TOKEN)
    token_file.chmod(0o644)
    config = tmp_path / "node.toml"
    config.write_text(f'[[http_tokens]]\nname = "ops"\ntoken_file = "{token_file}"\n')
    result = subprocess.run([sys.executable, "-m", "vesalius.node.cli", "serve", "--config", str(config),
                             "--data-dir", str(tmp_path / "d"), "--port", "0", "--http-port", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "http_tokens[0].token_file" in result.stderr
    assert "readable by other users" in result.stderr and OPS_TOKEN not in result.stderr


def is_utc_iso(text: str) -> bool:
    return datetime.fromisoformat(text).utcoffset() == timedelta(0) and "+00:00" in text


def test_listings_are_objects_with_iso_times(node: NodeProcess) -> None:
    store = Store(node.data_dir)
    info = SeriesInfo("1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1", "OT", "1.2.3", "listing",
                      "", "")
    store.store_instance(info, "1.2.826.0.1.3680043.10.1.1.1", b"not parsed by the API", "LISTER")
    store.mark_released([info.series_instance_uid])
    with store.transaction() as db:
        job_id = store.add_job(db, info.series_instance_uid, "ct", "builtin_ct", ["pacs", "archive"])
    with store.transaction() as db:  # a finished job, as if it had run (the runner takes only 'queued')
        db.execute("UPDATE jobs SET state='done', stages=? WHERE id=?", (json.dumps({"model": 1.5}), job_id))
        db.execute("INSERT INTO deliveries (job_id, destination, state, next_try_at, updated_at) "
                   "VALUES (?, 'pacs', 'done', 0, 1700000000.25)", (job_id,))
    series = wait_for(lambda: next((s for s in node.get("/series?study=1.2.826.0.1.3680043.10.1")
                                    if s["state"] == "complete"), None), 15, "the listed series")
    assert series["instances"] == 1
    assert is_utc_iso(series["last_received"]) and is_utc_iso(series["completed_at"])
    job = next(j for j in node.get("/jobs") if j["id"] == job_id)
    assert job["destinations"] == ["pacs", "archive"] and job["stages"] == {"model": 1.5}
    assert is_utc_iso(job["created_at"]) and is_utc_iso(job["updated_at"])
    delivery = next(d for d in node.get("/deliveries") if d["job_id"] == job_id)
    assert delivery["updated_at"] == "2023-11-14T22:13:20.250000+00:00"
    assert node.get("/jobs?study=1.2.826.0.1.3680043.10.999") == []


def test_retry_and_resend_answer_404_409_200(node: NodeProcess) -> None:
    store = Store(node.data_dir)
    with store.transaction() as db:
        running = store.add_job(db, "1.2.826.0.1.3680043.10.2.1", "ct", "builtin_ct", ["pacs"])
        db.execute("UPDATE jobs SET state='running' WHERE id=?", (running,))  # the runner leaves it alone
        finished = store.add_job(db, "1.2.826.0.1.3680043.10.2.2", "ct", "builtin_ct", ["pacs"])
        db.execute("UPDATE jobs SET state='done' WHERE id=?", (finished,))
    assert node.request("/jobs/999999/retry", "POST")[0] == 404
    assert node.request("/jobs/999999/resend", "POST")[0] == 404
    assert node.request(f"/jobs/{running}/retry", "POST")[0] == 409
    assert node.request(f"/jobs/{finished}/resend", "POST")[0] == 409  # no deliveries yet
    assert node.request(f"/jobs/{running}/retry", "GET")[0] == 405
    with store.transaction() as db:
        db.execute("INSERT INTO deliveries (job_id, destination, state, attempts, error, next_try_at, "
                   "updated_at) VALUES (?, 'nowhere', 'failed', 3, 'refused', 0, 0)", (finished,))
    status, body = node.request(f"/jobs/{finished}/resend", "POST", token=OPS_TOKEN)
    assert (status, body) == (200, {"job": finished, "deliveries": 1})
    status, body = node.request(f"/jobs/{finished}/retry", "POST", token=OPS_TOKEN)
    assert (status, body) == (200, {"job": finished, "state": "queued"})
    actions = [e for e in map(json.loads, (node.data_dir / "audit.jsonl").read_text().splitlines())
               if e["event"] == "Operator Action" and e["details"]["job"] in (running, finished)]
    assert [(e["user"], e["details"]["command"], e["details"]["status"], e["outcome"]) for e in actions] == [
        ("local", "retry", 409, 4), ("local", "resend", 409, 4), ("ops", "resend", 200, 0),
        ("ops", "retry", 200, 0)]
    assert all(e["address"].startswith("127.0.0.1:") and e["details"]["via"] == "http" for e in actions)


def metric(node: NodeProcess, name: str) -> float:
    text = node.request("/metrics", token=None)[1]
    return float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith(name + " ")))


def test_series_completed_counter_never_goes_down(node: NodeProcess) -> None:
    store = Store(node.data_dir)
    info = SeriesInfo("1.2.826.0.1.3680043.10.3.1", "1.2.826.0.1.3680043.10.3", "OT", "1.2.3", "late", "", "")
    before = metric(node, "vesalius_series_completed_total")

    def state() -> str:
        return next(s["state"] for s in node.get("/series?study=1.2.826.0.1.3680043.10.3"))

    store.store_instance(info, "1.2.826.0.1.3680043.10.3.1.1", b"first", "LATE")
    store.mark_released([info.series_instance_uid])
    wait_for(lambda: state() in ("complete", "stored"), 15, "the first completion")  # stored: no rule
    assert metric(node, "vesalius_series_completed_total") == before + 1
    store.store_instance(info, "1.2.826.0.1.3680043.10.3.1.2", b"late instance", "LATE")  # reopens it
    assert state() == "receiving"
    assert metric(node, "vesalius_series_completed_total") == before + 1  # not back to before
    store.mark_released([info.series_instance_uid])
    wait_for(lambda: state() in ("complete", "stored"), 15, "the second completion")
    assert metric(node, "vesalius_series_completed_total") == before + 2


def test_token_file_is_not_readable_by_others_even_under_a_loose_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        from vesalius.node.api.auth import local_token

        path = local_token(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert local_token(tmp_path).read_text() == path.read_text()  # reused, not regenerated
