"""Retention: delivered data goes after its days, undelivered data never does, the high-water mark
removes the oldest first, a dry run removes nothing, and the node keeps receiving meanwhile.

The clock is injected (``now``); the free-space test runs the real node on a small tmpfs of its
own (a private mount namespace, as the full-disk test in test_receive.py does).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom

from tests.peers import storescu, vesalius_node, wait_for
from tests.phantoms import Sphere, write_phantom_series
from vesalius.node.config import Retention
from vesalius.node.retention import DAY, cleanup, plan
from vesalius.node.store import SeriesInfo, Store, removal_of_results

NO_JOBS = '[[rules]]\nname = "none"\nmodality = ["NO_SUCH_MODALITY"]\n'
RULES = Retention(spool_days=7, results_days=30, unrouted_days=2, free_space_high_water_mb=0)
PLENTY = 10**15  # free bytes: far above any high-water mark


def add_series(store: Store, uid: str, instances: int = 3, size: int = 20_000) -> None:
    info = SeriesInfo(uid, f"{uid}.study", "CT", "1.2.840.10008.5.1.4.1.1.2", "", "", "")
    for n in range(instances):
        store.store_instance(info, f"{uid}.{n}", b"\0" * size, "SCANNER")
    with store.transaction() as db:
        db.execute("UPDATE series SET state='complete', completed_at=? WHERE series_instance_uid=?",
                   (time.time(), uid))


def add_job(store: Store, series_uid: str, deliveries: dict[str, str]) -> int:
    """A finished job with results on disk and deliveries in the given states."""
    with store.transaction() as db:
        job_id = store.add_job(db, series_uid, "ct", "builtin_ct", list(deliveries))
    assert store.claim_job()["id"] == job_id
    out = store.results_dir / series_uid / "builtin_ct"
    out.mkdir(parents=True, exist_ok=True)
    (out / "seg.dcm").write_bytes(b"\0" * 50_000)
    store.finish_job(job_id, out, {}, list(deliveries))
    for row in store.query("SELECT id, destination FROM deliveries WHERE job_id=?", (job_id,)):
        if deliveries[row["destination"]] != "pending":
            store.record_delivery(row["id"], deliveries[row["destination"]], None, time.time())
    return job_id


def removed(report: dict) -> set[tuple[str, str]]:
    return {(r["kind"], r["series_instance_uid"]) for r in report["removed"]}


def test_delivered_data_goes_after_its_days_undelivered_never(database_url: str, tmp_path: Path) -> None:
    store = Store(tmp_path / "data", database_url)
    for uid in ("1.1", "1.2", "1.3", "1.4", "1.5", "1.6"):
        add_series(store, uid)
    done = add_job(store, "1.1", {"pacs": "done", "cloud": "done"})
    add_job(store, "1.2", {"pacs": "done", "cloud": "pending"})
    add_job(store, "1.3", {"pacs": "failed"})
    with store.transaction() as db:  # 1.4: a job still running
        store.add_job(db, "1.4", "ct", "builtin_ct", ["pacs"])
    store.claim_job()
    # 1.5: no rule routed it (unrouted_days); 1.6: still receiving
    with store.transaction() as db:
        db.execute("UPDATE series SET state='receiving' WHERE series_instance_uid='1.6'")

    soon = cleanup(store, RULES, now=time.time() + 1 * DAY, free=PLENTY)
    assert soon["removed"] == []
    week = cleanup(store, RULES, now=time.time() + 8 * DAY, free=PLENTY)
    assert removed(week) == {("spool", "1.1"), ("spool", "1.5")}
    assert week["bytes_freed"] == sum(r["bytes"] for r in week["removed"]) >= 6 * 20_000
    for uid in ("1.1", "1.5"):  # files and rows go together
        assert not (store.spool_dir / f"{uid}.study" / uid).exists()
        assert not store.query("SELECT 1 FROM instances WHERE series_instance_uid=?", (uid,))
        assert not store.query("SELECT 1 FROM series WHERE series_instance_uid=?", (uid,))
    assert not (store.spool_dir / "1.1.study").exists()  # the emptied study folder too
    for uid in ("1.2", "1.3", "1.4", "1.6"):
        assert len(store.series_paths(uid)) == 3 and all(p.exists() for p in store.series_paths(uid))
    assert (store.results_dir / "1.1" / "builtin_ct" / "seg.dcm").exists()  # results: 30 days

    month = cleanup(store, RULES, now=time.time() + 31 * DAY, free=PLENTY)
    assert removed(month) == {("results", "1.1")}
    assert not (store.results_dir / "1.1").exists()
    mark = removal_of_results(store, done)
    assert mark is not None and mark["reason"] == "age"
    for uid in ("1.2", "1.3", "1.4"):  # pending, failed, running: kept however old
        assert (store.results_dir / uid).exists() or uid == "1.4"
        assert len(store.series_paths(uid)) == 3
    assert cleanup(store, RULES, now=time.time() + 400 * DAY, free=PLENTY)["removed"] == []


def test_resend_of_removed_results_says_why(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    add_series(store, "2.1")
    job = add_job(store, "2.1", {"pacs": "done"})
    cleanup(store, RULES, now=time.time() + 31 * DAY, free=PLENTY)
    result = subprocess.run([sys.executable, "-m", "vesalius.node.cli", "resend", str(job), "--data-dir",
                             str(store.data_dir)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "removed by retention" in result.stderr
    assert store.query("SELECT state FROM deliveries WHERE job_id=?", (job,))[0]["state"] == "done"


def test_high_water_removes_oldest_first_until_above(database_url: str, tmp_path: Path) -> None:
    store = Store(tmp_path / "data", database_url)
    for uid in ("3.1", "3.2", "3.3", "3.4"):  # oldest first
        add_series(store, uid)
        add_job(store, uid, {"pacs": "done"})
    add_series(store, "3.5")
    add_job(store, "3.5", {"pacs": "pending"})  # the oldest would be this one, were it delivered
    mark_mb = 1
    rules = Retention(spool_days=0, results_days=0, unrouted_days=0, free_space_high_water_mb=mark_mb)
    free = 2**20 - 100_000  # 100 kB short of the mark
    chosen = plan(store, rules, time.time(), free)
    assert chosen.removals, "nothing chosen although free space is below the mark"
    assert [r.done_at for r in chosen.removals] == sorted(r.done_at for r in chosen.removals)
    assert free + chosen.bytes >= 2**20
    assert free + chosen.bytes - chosen.removals[-1].bytes < 2**20  # and not one more than needed
    assert all(r.series_instance_uid in ("3.1", "3.2") for r in chosen.removals)
    assert all(r.reason == "free_space" for r in chosen.removals)
    assert plan(store, rules, time.time(), 2**20).removals == ()  # at the mark: nothing


def test_dry_run_removes_nothing_and_lists_the_same(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    for uid in ("4.1", "4.2"):
        add_series(store, uid)
        add_job(store, uid, {"pacs": "done"})
    before = sorted(p for p in store.data_dir.rglob("*") if p.is_file() and "sqlite" not in p.name)
    command = [sys.executable, "-m", "vesalius.node.cli", "cleanup", "--json", "--data-dir",
               str(store.data_dir)]
    config = tmp_path / "c.toml"
    config.write_text("[retention]\nspool_days = 0\nresults_days = 0\nunrouted_days = 0\n"
                      f"free_space_high_water_mb = {10**9}\n")  # far above any disk: everything
    dry = json.loads(subprocess.run([*command, "--dry-run", "--config", str(config)], capture_output=True,
                                    text=True, timeout=60, check=True).stdout)
    assert dry["dry_run"] and len(dry["removed"]) == 4
    assert sorted(p for p in store.data_dir.rglob("*") if p.is_file() and "sqlite" not in p.name) == before
    real = json.loads(subprocess.run([*command, "--config", str(config)], capture_output=True, text=True,
                                     timeout=60, check=True).stdout)
    key = [(r["kind"], r["series_instance_uid"], r["path"], r["bytes"]) for r in dry["removed"]]
    assert [(r["kind"], r["series_instance_uid"], r["path"], r["bytes"]) for r in real["removed"]] == key
    assert real["bytes_freed"] == dry["bytes_freed"] > 0
    assert not [p for p in store.data_dir.rglob("*") if p.is_file() and "sqlite" not in p.name]


def test_node_on_a_small_disk_frees_oldest_and_keeps_receiving(tmp_path: Path) -> None:
    """The real node on a 48 MB tmpfs with a 16 MB high-water mark: ballast pushes free space
    below it; the node's cleanup removes the oldest stored series until free space is back above
    the mark, keeps the newest, and stores what arrives afterwards."""
    series = [write_phantom_series(tmp_path / f"s{n}", shape=(8, 256, 256), spacing=(2, 1, 1),
                                   objects=[Sphere((0, 0, 0), 20, 300)]) for n in range(4)]
    data = tmp_path / "data"
    data.mkdir()
    mount = f'mount -t tmpfs -o size=48m tmpfs "{data}" && exec "$@"'
    config = ("min_free_disk_mb = 1\n[retention]\nspool_days = 0\nunrouted_days = 0\n"
              "free_space_high_water_mb = 16\ninterval = 0.5\n" + NO_JOBS)
    with vesalius_node(tmp_path, data_dir=data, config=config,
                       wrap=["unshare", "-rm", "sh", "-c", mount, "sh"]) as node:
        inside = Path(f"/proc/{node.proc.pid}/root") / data.relative_to("/")
        for s in series[:3]:
            storescu(s.paths, node.port)
            wait_for(lambda s=s: any(r["series_instance_uid"] == s.series_uid and r["state"] == "stored"
                                     for r in node.get("/series")), 30, "the series to complete")
        assert len(node.get("/series")) == 3  # free space is above the mark: nothing removed
        ballast = inside / "ballast"
        with open(ballast, "wb", buffering=0) as f:  # free space to 14.5 MB: 1.5 MB below the mark
            while shutil.disk_usage(inside).free > 14.5 * 2**20:
                f.write(b"\0" * 2**16)
        # 2 series of ~1 MB each must go, oldest first; each goes in its own transaction, its files
        # after the commit: wait for the end state, not for the first removal
        wait_for(lambda: {r["series_instance_uid"] for r in node.get("/series")} == {series[2].series_uid},
                 30, "the cleanup to keep only the newest series")
        spool = inside / "spool"
        wait_for(lambda: not any((spool / s.study_uid / s.series_uid).exists() for s in series[:2]),
                 30, "the removed series' files to go")
        assert shutil.disk_usage(inside).free >= 16 * 2**20
        assert "cleanup removed spool" in node.log()
        storescu(series[3].paths, node.port)  # and the node still receives
        wait_for(lambda: any(r["series_instance_uid"] == series[3].series_uid
                             for r in node.get("/series")), 30, "the new series")
        assert all(pydicom.dcmread(p).SOPInstanceUID for p in (inside / "spool").rglob("*.dcm"))


def test_retention_config_is_validated() -> None:
    from vesalius.node.config import ConfigError, parse_config

    config = parse_config({"retention": {"spool_days": 3, "free_space_high_water_mb": 2000}})
    assert config.retention == Retention(spool_days=3.0, free_space_high_water_mb=2000)
    for bad, words in (({"spool_day": 3}, "retention.spool_day: unknown key"),
                       ({"results_days": -1}, "retention.results_days: must be >= 0"),
                       ({"free_space_high_water_mb": 1.5}, "expected an integer"),
                       ({"interval": "often"}, "retention.interval: expected")):
        try:
            parse_config({"retention": bad})
        except ConfigError as err:
            assert words in str(err)
        else:
            raise AssertionError(f"{bad} was accepted")


def test_retry_of_a_removed_series_says_why(tmp_path: Path) -> None:
    store = Store(tmp_path / "data")
    add_series(store, "5.1")
    job = add_job(store, "5.1", {"pacs": "done"})
    cleanup(store, RULES, now=time.time() + 8 * DAY, free=PLENTY)
    result = subprocess.run([sys.executable, "-m", "vesalius.node.cli", "retry", str(job), "--data-dir",
                             str(store.data_dir)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "removed by retention" in result.stderr
    assert store.job(job)["state"] == "done"


def test_results_folder_shared_by_a_rerun_goes_only_with_its_newest_job(
        database_url: str, tmp_path: Path) -> None:
    """A series received again writes its new job's results into the same (series, model) folder:
    the old job's age must not remove the new job's undelivered results."""
    store = Store(tmp_path / "data", database_url)
    add_series(store, "6.1")
    old = add_job(store, "6.1", {"pacs": "done"})
    with store.transaction() as db:  # the old delivery settled long ago
        db.execute("UPDATE deliveries SET updated_at=updated_at-40*86400 WHERE job_id=?", (old,))
        db.execute("UPDATE jobs SET updated_at=updated_at-40*86400 WHERE id=?", (old,))
    new = add_job(store, "6.1", {"pacs": "pending"})
    assert cleanup(store, RULES, now=time.time() + 1 * DAY, free=PLENTY)["removed"] == []
    assert (store.results_dir / "6.1" / "builtin_ct" / "seg.dcm").exists()
    store.record_delivery(store.query("SELECT id FROM deliveries WHERE job_id=?", (new,))[0]["id"],
                          "done", None, time.time())
    report = cleanup(store, RULES, now=time.time() + 31 * DAY, free=PLENTY)
    assert [r["job_id"] for r in report["removed"] if r["kind"] == "results"] == [new]
    assert removal_of_results(store, old) is not None and removal_of_results(store, new) is not None


def test_cleanup_sweeps_stale_deidentified_copies(database_url: str, tmp_path: Path) -> None:
    import os

    store = Store(tmp_path / "data", database_url)
    stale, fresh = store.data_dir / ".deid-crashed", store.data_dir / ".deid-running"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "0000.dcm").write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert cleanup(store, RULES, dry_run=True)["removed"] == [] and stale.exists()
    cleanup(store, RULES)
    assert not stale.exists() and fresh.exists()
