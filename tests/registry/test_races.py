"""Two races between real processes, on SQLite and on PostgreSQL.

First use in parallel: eight `saereg sae register` processes and one training tracker start
together on a brand-new SAEREG_HOME (no mlflow.db; on SQLite no catalog.db either). Every
registration exits 0 with a distinct, gapless version number, every version loads, MLflow holds
exactly those versions and the tracker's finished run, no half-made store file is left next to
mlflow.db, and a later registration in the same home works.

gc during registrations: `gc --min-age 0` runs in a loop while six registrations are in
flight. It still removes real garbage (a planted unreferenced blob, a planted MLflow version of
this catalog that no catalog version names), but nothing a registration then committed:
every registration exits 0, each catalog version's MLflow model version exists with its uid,
every version loads (its files are all there), and `alias set` and `deprecate` work on each.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid

from catalog_helpers import make_sae_folder
from click.testing import CliRunner

LAUNCHER = textwrap.dedent("""
    import json, os, sys, time, traceback
    import mlflow.store.model_registry.sqlalchemy_store  # imported once, before the forks
    import mlflow.store.tracking.sqlalchemy_store
    from saereg.commands.main import main
    from saereg.registry.api import gc
    work, jobs = sys.argv[1], json.loads(sys.argv[2])
    go, stop = os.path.join(work, "go"), os.path.join(work, "stop")

    def register(*args):  # the `saereg sae register` command, exit code and all
        sys.argv = ["saereg", "sae", "register", *args]
        main()

    def track():  # training's tracker opening the same new store
        from saereg.training.tracking import Tracker

        tracker = Tracker("race")
        run_id = tracker.start_run("race", {"p": "1"}, {})
        tracker.finish(run_id)
        print(json.dumps({"run_id": run_id}))

    def gc_loop():  # `saereg gc --min-age 0` back to back, from before the start line on
        removed, rounds = {"blobs": set(), "mlflow": set()}, 0
        while True:
            after_go = os.path.exists(go)
            report = gc(min_age=0)
            assert report.mlflow_error is None, report.mlflow_error
            removed["blobs"].update(report.blobs)
            removed["mlflow"].update(f"{n}/{v}" for n, v in report.mlflow_versions)
            rounds += after_go
            open(os.path.join(work, "gc-ready"), "w").close()
            if rounds and os.path.exists(stop):
                break
        print(json.dumps({"rounds": rounds, **{k: sorted(v) for k, v in removed.items()}}))

    pids = []
    for i, (kind, *args) in enumerate(jobs):
        pid = os.fork()
        if pid == 0:  # a child: its own process from here on
            code = 1
            try:
                for fd, name in ((1, "out"), (2, "err")):
                    os.dup2(os.open(f"{work}/{name}-{i}", os.O_WRONLY | os.O_CREAT), fd)
                while kind != "gc-loop" and not os.path.exists(go):
                    time.sleep(0.005)
                {"register": register, "track": track, "gc-loop": gc_loop}[kind](*args)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    open(os.path.join(work, "forked"), "w").close()
    wait = lambda pid: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    codes = {i: wait(pid) for i, pid in enumerate(pids) if jobs[i][0] != "gc-loop"}
    open(stop, "w").close()  # every other job has ended: a gc loop may stop
    codes.update({i: wait(pid) for i, pid in enumerate(pids) if i not in codes})
    print(json.dumps([codes[i] for i in range(len(pids))]))
""")


class Children:
    """Processes forked from one launcher that imported MLflow once (a fresh interpreter
    spends seconds on that import): ``register`` jobs wait for the start line, then run the
    CLI command; a ``track`` job then opens training's tracker and logs a run; a ``gc-loop``
    job runs gc from the start until every other job has ended."""

    def __init__(self, work, jobs: list[list[str]]):
        self.work, self.n = work, len(jobs)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(work), json.dumps([list(map(str, j))
                                                                   for j in jobs])],
            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc) -> None:
        """Release everyone; a launcher still running after a failed assertion is killed with
        its children."""
        (self.work / "go").touch()
        (self.work / "stop").touch()
        if self.proc.poll() is None:
            try:
                self.proc.communicate(timeout=5 if exc[0] else 300)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.communicate()

    def wait_for(self, *names: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not all((self.work / n).exists() for n in names):
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.time() < deadline, f"no {names} from the launcher"
            time.sleep(0.05)

    def go(self) -> None:
        (self.work / "go").touch()

    def results(self) -> list[tuple[int, str, str]]:
        """(exit code, stdout, stderr) of each child, in job order."""
        out, err = self.proc.communicate(timeout=300)
        assert self.proc.returncode == 0, err[-3000:]
        codes = json.loads(out.strip().splitlines()[-1])
        return [(code, (self.work / f"out-{i}").read_text(), (self.work / f"err-{i}").read_text())
                for i, code in enumerate(codes)]


def registered(result: tuple[int, str, str]) -> tuple[str, int]:
    """(name, number) a register child printed; it must have exited 0."""
    code, out, err = result
    assert code == 0, (out + err)[-3000:]
    m = re.search(r"registered (\S+)@(\d+) ", out)
    assert m, out
    return m[1], int(m[2])


def cli(*args: str):
    from saereg.commands.main import cli as group

    result = CliRunner().invoke(group, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_eight_first_registrations_on_a_fresh_home(backend, monkeypatch, tmp_path):
    from mlflow import MlflowClient

    from saereg.registry.api import load_sae
    from saereg.registry.paths import mlflow_tracking_uri, saereg_home

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "SAEREG_ARTIFACT_STORE"):
        monkeypatch.delenv(var, raising=False)
    home = saereg_home()
    assert not (home / "mlflow.db").exists()
    if backend == "sqlite":
        assert not (home / "catalog.db").exists()
    n = 8
    folders = [make_sae_folder(tmp_path / f"w{i}", seed=i) for i in range(n + 1)]
    with Children(tmp_path, [*(["register", folders[i], "--name", "first"] for i in range(n)),
                             ["track"]]) as children:
        children.wait_for("forked")
        children.go()  # all of them open the new home at once
        *registrations, (code, out, err) = children.results()
    results = [registered(r) for r in registrations]
    assert sorted(num for _, num in results) == list(range(1, n + 1))
    assert code == 0, err[-3000:]
    run_id = json.loads(out.strip().splitlines()[-1])["run_id"]

    for num in range(1, n + 1):
        sae = load_sae(f"first@{num}")
        assert sae.cfg.metadata["saereg_ref"] == f"first@{num}"
    client = MlflowClient(mlflow_tracking_uri())
    mlflow_versions = client.search_model_versions("name = 'first'")
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(int(mv.version) for mv in mlflow_versions) == list(range(1, n + 1))
    assert sorted(p.name for p in home.iterdir() if p.name.startswith(("mlflow", ".mlflow"))) \
        == ["mlflow.db", "mlflow.db.lock"]

    out = cli("sae", "register", str(folders[n]), "--name", "first")
    assert f"registered first@{n + 1} " in out
    load_sae(f"first@{n + 1}")


def test_gc_in_a_loop_during_registrations_keeps_what_they_commit(backend, mlflow_store,
                                                                  tmp_path):
    from saereg.registry.api import load_sae
    from saereg.registry.catalog.writes import Catalog

    cat = Catalog()
    cat.register_folder(make_sae_folder(tmp_path / "seed", seed=99), "raced0")  # makes the catalog
    orphan_blob = cat.store.put(make_sae_folder(tmp_path / "orphan", seed=98)
                                / "sae_weights.safetensors").sha256
    orphan_mv, _ = cat.mirror.create_version(
        "raced1", cat.store.url, None, tags={"saereg.catalog": cat.catalog_id(),
                                             "saereg.uid": uuid.uuid4().hex})

    n = 6
    folders = [make_sae_folder(tmp_path / f"w{i}", seed=i) for i in range(n)]
    with Children(tmp_path, [["gc-loop"], *(["register", folders[i], "--name",
                                             f"raced{i % 2}"] for i in range(n))]) as children:
        children.wait_for("forked", "gc-ready")
        children.go()  # gc keeps running through all six registrations
        (code, out, err), *registrations = children.results()
    assert code == 0, err[-3000:]
    swept = json.loads(out.strip().splitlines()[-1])
    assert swept["rounds"] >= 1
    assert orphan_blob in swept["blobs"] and f"raced1/{orphan_mv}" in swept["mlflow"]
    results = [registered(r) for r in registrations]

    assert sorted(results) == [("raced0", 2), ("raced0", 3), ("raced0", 4),
                               ("raced1", 1), ("raced1", 2), ("raced1", 3)]
    versions = [v for v in cat.list() if v.name.startswith("raced")]
    assert len(versions) == n + 1
    for row in versions:
        v = cat.get(row.ref)
        mv = mlflow_store.get_model_version(v.name, v.mlflow_model_version)
        assert mv.tags["saereg.uid"] == v.uid and mv.tags["saereg.version"] == str(v.number)
        load_sae(v.ref)
        cli("sae", "alias", "set", v.name, "prod", str(v.number))
        assert mlflow_store.get_model_version_by_alias(v.name, "prod").version \
            == int(v.mlflow_model_version)
        cli("sae", "deprecate", v.ref, "--reason", "raced")
        assert cat.get(v.ref).status == "deprecated"
        assert mlflow_store.get_model_version(v.name, v.mlflow_model_version) \
            .tags["saereg.status"] == "deprecated"
