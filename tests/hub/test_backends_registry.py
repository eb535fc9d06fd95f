"""The registry on PostgreSQL + S3 (real servers on loopback): the LocalRegistry suite run again on
them, plus what only shared backends have — reconcile of S3 orphans, a corrupted object, racing
publishers in separate processes, migration from a local folder, the CLI by URL."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
from backend_fixtures import SharedBackends
from hub_testing import make_artifact, sha256

# The backend-independent LocalRegistry tests, collected here a second time with the `registry`
# fixture below: same assertions, PostgreSQL index, S3 blobs.
from test_local_registry import (  # noqa: F401
    test_bad_files_are_refused_and_leave_nothing,
    test_declared_base_must_match,
    test_delete_keeps_the_number_and_shared_blobs,
    test_explicit_versions_are_immutable_and_latest_follows_numbers,
    test_namespace_owner_is_the_first_publisher,
    test_publish_auto_increments_and_info_reports_the_artifact,
    test_search_filters,
    test_yank_hides_from_latest_and_search_but_exact_download_works,
)

from adapterkit.hub import Conflict, IntegrityError, LocalRegistry, NotFound
from adapterkit.hub.cli import main as hub_main
from adapterkit.hub.index_postgres import PostgresIndex
from adapterkit.hub.registry import IndexedRegistry

pytestmark = pytest.mark.slow

RACERS = 4


@pytest.fixture()
def registry(shared_registry: IndexedRegistry) -> IndexedRegistry:
    return shared_registry


def test_it_really_is_postgres_and_s3(registry: IndexedRegistry, artifact: Path, shared_backends: SharedBackends) -> None:
    v = registry.publish(artifact, "team/x")
    assert isinstance(registry.index, PostgresIndex)
    with registry._read() as db:
        assert db.execute("SELECT version()").fetchone()[0].startswith("PostgreSQL")
    key = registry.blobs.key_for(v.sha256)
    body = shared_backends.s3.client().get_object(Bucket=registry.blobs.bucket, Key=key)["Body"].read()
    assert body == artifact.read_bytes() and key.startswith(shared_backends.blobs.split("/", 3)[3] + "/blobs/")


def test_reconcile_removes_s3_orphans_and_flags_missing_objects(
    shared_backends: SharedBackends, artifact: Path, tmp_path: Path
) -> None:
    """Orphan object (crash after the PUT, before the commit), dead spool file, object deleted behind
    the hub's back; a fresh process's registry reconciles all three."""
    reg = shared_backends.open(tmp_path / "w1")
    kept = reg.publish(artifact, "team/kept")
    lost = reg.publish(make_artifact(tmp_path / "b.safetensors", seed=9), "team/lost")
    s3 = shared_backends.s3.client()
    s3.delete_object(Bucket=reg.blobs.bucket, Key=reg.blobs.key_for(lost.sha256))
    s3.put_object(Bucket=reg.blobs.bucket, Key=reg.blobs.key_for("ab" * 32), Body=b"half of something")
    (tmp_path / "w2" / "tmp").mkdir(parents=True)
    (tmp_path / "w2" / "tmp" / "up-dead.part").write_bytes(b"partial upload")
    assert len(reg.check()) == 2  # the spool file belongs to the other work folder
    reg.close()

    reopened = shared_backends.open(tmp_path / "w2")  # another machine's view: empty cache
    try:
        assert reopened.last_reconcile == {"stale_temps": 1, "orphan_blobs": 1, "missing_blobs": 1}
        assert reopened.check() == [f"team/lost@1: blob {lost.sha256[:12]} is missing"]
        assert [v.adapter for v in reopened.search()] == ["team/kept"]
        with pytest.raises(NotFound, match="missing from the blob store"):
            reopened.download("team/lost@1")
        assert reopened.download("team/kept").read_bytes() == artifact.read_bytes() and kept.sha256 == sha256(artifact)
        reopened.publish(tmp_path / "b.safetensors", "team/again")  # the same bytes heal the row
        assert reopened.download("team/lost@1").is_file() and reopened.check(deep=True) == []
    finally:
        reopened.close()


def test_a_corrupted_object_is_detected_on_download(shared_backends: SharedBackends, artifact: Path, tmp_path: Path) -> None:
    reg = shared_backends.open(tmp_path / "w1")
    v = reg.publish(artifact, "team/x")
    data = bytearray(artifact.read_bytes())
    data[-1] ^= 0xFF
    shared_backends.s3.client().put_object(Bucket=reg.blobs.bucket, Key=reg.blobs.key_for(v.sha256), Body=bytes(data))
    reg.close()
    fresh = shared_backends.open(tmp_path / "w2", reconcile=False)  # nothing cached
    try:
        with pytest.raises(IntegrityError, match="corrupt"):
            fresh.download("team/x@1")
        assert any("does not hash to its name" in p for p in fresh.check(deep=True))
    finally:
        fresh.close()


def _race(index: str, blobs: str, work: str, path: str, barrier, results) -> None:
    from adapterkit.hub.backends import open_backends

    reg = open_backends(index, blobs, work_dir=work, reconcile=False)
    barrier.wait()
    try:
        reg.publish(path, "race/one@1")
        won = "won"
    except Conflict:
        won = "lost"
    auto = reg.publish(path, "race/auto").version
    results.put((path, won, auto))
    reg.close()


def test_racing_publishers_in_separate_processes(shared_backends: SharedBackends, tmp_path: Path) -> None:
    """Four processes, each its own connection pool and S3 client: one wins name@1, and the
    auto-numbered versions are 1..4 with no number handed out twice."""
    shared_backends.open(tmp_path / "setup").close()  # schema in place before the race
    paths = [str(make_artifact(tmp_path / f"r{i}.safetensors", seed=100 + i)) for i in range(RACERS)]
    ctx = multiprocessing.get_context("fork")  # cheap on a busy machine; the children open their own clients
    barrier, results = ctx.Barrier(RACERS), ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(shared_backends.index, shared_backends.blobs, str(tmp_path / f"w{i}"), p, barrier, results))
        for i, p in enumerate(paths)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    winners = [path for path, won, _ in outcomes if won == "won"]
    assert len(winners) == 1
    assert sorted(int(auto) for *_, auto in outcomes) == list(range(1, RACERS + 1))
    reg = shared_backends.open(tmp_path / "check")
    try:
        assert reg.info("race/one@1").sha256 == sha256(Path(winners[0]))
        assert {v.sha256 for v in reg.versions("race/auto")} == {sha256(Path(p)) for p in paths}
        assert reg.check(deep=True) == []
    finally:
        reg.close()


def test_migrate_a_local_hub_verified_and_rerunnable(shared_backends: SharedBackends, tmp_path: Path, capsys) -> None:
    local = LocalRegistry(tmp_path / "local")
    a, b = make_artifact(tmp_path / "a.safetensors", seed=1), make_artifact(tmp_path / "b.safetensors", seed=2)
    local.publish(a, "team/x", owner="alice", metrics={"accuracy": 0.5})
    local.publish(b, "team/x", owner="alice")
    local.publish(a, "team/copy", owner="alice")  # shares a's blob
    local.publish(b, "lab/gone", owner="bob")
    local.yank("team/x@2", reason="bad labels")
    local.delete("lab/gone@1")
    from adapterkit.hub.tokens import TokenStore

    _, token = TokenStore(local).create("alice")

    argv = ["migrate", "--from", str(local.root), "--to", shared_backends.index, "--blobs", shared_backends.blobs]
    assert hub_main(argv) == 0
    out = capsys.readouterr().out
    assert "copied 4 versions (2 blobs" in out and "2 namespaces, 1 tokens" in out
    reg = shared_backends.open(tmp_path / "w")
    try:
        assert [v.version for v in reg.versions("team/x")] == ["1", "2"]
        assert reg.info("team/x@2").yanked and reg.info("team/x").version == "1"
        assert reg.info("team/x@1").metrics == {"accuracy": 0.5} and reg.info("team/x@1").publisher == "alice"
        assert reg.download("team/copy@1").read_bytes() == a.read_bytes()
        with pytest.raises(NotFound, match="was deleted"):
            reg.info("lab/gone@1")
        with pytest.raises(Conflict):  # a deleted number stays taken after the move
            reg.publish(b, "lab/gone@1")
        from adapterkit.hub.tokens import TokenStore as Tokens

        assert Tokens(reg).owner_of(token) == "alice"  # tokens people hold keep working
        assert sorted(reg.blobs.sizes()) == sorted({sha256(a), sha256(b)}) and reg.check(deep=True) == []
    finally:
        reg.close()
    assert hub_main(argv) == 0  # again: nothing to copy, nothing duplicated
    again = capsys.readouterr().out
    assert "copied 0 versions" in again and "4 versions were already there" in again


def test_cli_by_url_tokens_and_reconcile(shared_backends: SharedBackends, tmp_path: Path, capsys) -> None:
    env = {**os.environ, "ADAPTERKIT_HOME": str(tmp_path / "home")}
    where = ["--index", shared_backends.index, "--blobs", shared_backends.blobs]
    run = lambda *args: subprocess.run([sys.executable, "-m", "adapterkit.hub", *args], env=env, capture_output=True, text=True, timeout=300)  # noqa: E731
    made = run("token", "create", "alice", *where)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("akt_")
    assert hub_main(["token", "list", *where]) == 0
    assert "alice" in capsys.readouterr().out
    assert hub_main(["serve", "--index", shared_backends.index]) == 1
    assert "give both --index and --blobs" in capsys.readouterr().err
    # A crash left an orphan object; the command removes it.
    reg = shared_backends.open(tmp_path / "w", reconcile=False)
    shared_backends.s3.client().put_object(Bucket=reg.blobs.bucket, Key=reg.blobs.key_for("cd" * 32), Body=b"x")
    reg.close()
    reconciled = run("reconcile", *where, "--deep")
    assert reconciled.returncode == 0, reconciled.stderr
    assert "removed 0 dead temp files and 1 orphan blobs" in reconciled.stdout
