"""`saereg cache import`: a tensor file (.safetensors, .npy, .pt) becomes a cache folder that
`saereg train --from-cache` trains on and evaluates with, holding exactly the file's rows (shards
in order, the last rows held out, float32, token ids -1); the SAEs trained from it say in their
cfg.json metadata and MLflow params what is true of such rows (no tokenizer, context size, BOS
or special-token handling, dataset). Every bad file or option gives one clear error with exit
code 1 or 2 and leaves no folder behind (nor the hidden folder it was written in); a .pt file
that is not weights-only is refused without running anything it holds."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from saereg.commands.main import cli

N, D = 1200, 16
HELD = 120  # --heldout-tokens 200, capped at a tenth of the rows


def activations(seed: int, n: int = N, d: int = D) -> torch.Tensor:
    """Rows on a 4-dimensional subspace plus a little noise: a tiny SAE learns them fast."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g) @ torch.randn(4, d, generator=g) \
        + 0.01 * torch.randn(n, d, generator=g)


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def import_args(file, out, *hooks: str, extra=()):
    return ["cache", "import", file, *[x for h in hooks for x in ("--hook", h)], "--out", out,
            "--shard-tokens", "500", "--heldout-tokens", "200", "--no-progress", *extra]


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if ".import-" in p.name)


def write(fmt: str, folder: Path) -> tuple[Path, list[str], dict[str, torch.Tensor]]:
    """A tensor file of format ``fmt``; the --hook values for it; the rows of each hook."""
    if fmt == "safetensors":  # two hooks (one by its key, one mapped) and a tensor left out
        a, b = activations(1), activations(2, d=8)
        path = folder / "acts.safetensors"
        save_file({"model.layers.1": a, "l2": b, "other": torch.zeros(3, 3)}, str(path))
        return path, ["model.layers.1", "l2=model.layers.2"], {"model.layers.1": a,
                                                                "model.layers.2": b}
    x = activations(3)
    if fmt == "npy":  # float16 on disk, stored as float32
        x = x.half()
        path = folder / "acts.npy"
        np.save(path, x.numpy())
    else:
        path = folder / "acts.pt"
        torch.save(x, path)
    return path, ["blocks.1.hook_resid_post"], {"blocks.1.hook_resid_post": x.float()}


@pytest.mark.parametrize("fmt", ["safetensors", "npy", "pt"])
def test_import_train_evaluate_round_trip(fmt, tmp_path, mlflow_store):
    from saereg.registry.sae.folder import load_sae
    from saereg.training.cache import CacheSource, evaluate_from_cache, read_manifest

    path, hooks, rows = write(fmt, tmp_path)
    out = tmp_path / "acts"
    widths = ("--mixed-widths",) if fmt == "safetensors" else ()  # its two hooks: 16 and 8 wide
    result = invoke(*import_args(path, out, *hooks, extra=("--model", "my-model", *widths)))
    assert result.exit_code == 0, result.output
    assert f"{N - HELD} rows" in result.output and f"{HELD} held-out rows" in result.output
    m = read_manifest(out)
    assert m["complete"] and m["hooks"] == list(rows) and m["model"] == "my-model"
    assert m["d_in"] == {h: x.shape[1] for h, x in rows.items()}
    assert m["tokenizer"] is None and m["context_size"] is None and m["dataset"] is None
    assert m["source"]["kind"] == "import" and m["source"]["file"] == str(path.resolve())
    assert m["source"]["rows"] == N and m["source"]["format"] == fmt
    assert [s["rows"] for s in m["shards"]] == [[0, 500], [500, 1000], [1000, N - HELD]]
    assert m["tokens"] == N - HELD and m["heldout"] == {"file": "heldout.safetensors",
                                                        "tokens": HELD}
    shards = [load_file(str(out / s["file"])) for s in m["shards"]]
    held = load_file(str(out / "heldout.safetensors"))
    for hook, x in rows.items():  # exactly the file's rows, in order, as float32
        assert torch.equal(torch.cat([s[hook] for s in shards]), x[:N - HELD])
        assert torch.equal(held[hook], x[N - HELD:]) and held[hook].dtype == torch.float32
    assert all(bool((s["token_ids"] == -1).all()) for s in [*shards, held])
    assert leftovers(tmp_path) == []

    hook = next(iter(rows))
    result = invoke("train", "--from-cache", out, "--hook", hook, "--k", "4", "--expansion", "2",
                    "--tokens", "1024", "--batch-tokens", "256", "--buffer-tokens", "512",
                    "--no-progress")
    assert result.exit_code == 0, result.output
    exp = mlflow_store.get_experiment_by_name("sae-registry")
    run = next(r for r in mlflow_store.search_runs([exp.experiment_id])
               if "mlflow.parentRunId" in r.data.tags)
    assert run.data.params["job.context_size"] == "" and run.data.tags["model"] == "my-model"
    folder = Path(mlflow_store.download_artifacts(run.info.run_id, "sae", str(tmp_path / "dl")))
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "my-model" and meta["hook_name"] == hook
    for key in ("context_size", "prepend_bos", "exclude_special_tokens", "dataset_path",
                "tokenizer"):
        assert key in meta and meta[key] is None, key
    assert meta["activation_file"] == str(path.resolve())
    assert meta["activation_cache"] == str(out)

    # the evaluation the job ran is the one on the cache's held-out rows, for the saved SAE
    sae = load_sae(folder)
    again = evaluate_from_cache(CacheSource(out, m, torch.device("cpu")), {"s": (hook, sae)},
                                HELD)["s"]
    metrics = run.data.metrics
    assert metrics["eval/explained_variance"] == pytest.approx(again["explained_variance"],
                                                               abs=1e-6)
    assert 0.0 < again["explained_variance"] <= 1.0 and 0 < metrics["eval/l0"] <= 4.0


class Touch:
    """Unpickling this would create ``marker``: a stand-in for code a pickle runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def bad_file(case: str, folder: Path) -> tuple[Path, list[str]]:
    """A bad input for ``case`` and the --hook values to import it with."""
    x = activations(4)
    st = folder / "acts.safetensors"
    if case == "rank":
        np.save(folder / "acts.npy", x.reshape(10, 120, D).numpy())
        return folder / "acts.npy", ["h"]
    if case in ("nan", "inf"):  # in the second shard, after the first was written
        x[700, 3] = float("nan") if case == "nan" else float("inf")
        save_file({"a": x}, str(st))
        return st, ["a=h"]
    if case == "rows":
        save_file({"a": x, "b": x[:-1].clone()}, str(st))
        return st, ["a", "b"]
    if case == "widths":
        save_file({"a": x, "b": x[:, :8].clone()}, str(st))
        return st, ["a", "b"]
    if case == "dtypes":
        save_file({"a": x, "b": x.half()}, str(st))
        return st, ["a", "b"]
    if case == "integer":
        torch.save({"a": torch.ones(N, D, dtype=torch.int64)}, folder / "acts.pt")
        return folder / "acts.pt", ["a"]
    if case == "pickle":
        torch.save({"a": x, "b": Touch(folder / "marker")}, folder / "acts.pt")
        return folder / "acts.pt", ["a"]
    if case == "extension":
        (folder / "acts.csv").write_text("1,2\n3,4\n")
        return folder / "acts.csv", ["h"]
    if case == "key":
        save_file({"resid_6": x, "mlp_out": x.clone()}, str(st))
        return st, ["resid_8=model.layers.8"]
    if case == "two-hooks-one-tensor":
        save_file({"a": x, "b": x.clone()}, str(st))
        return st, ["a=h", "a=g"]
    raise AssertionError(case)


@pytest.mark.parametrize("case, code, message", [
    ("rank", 1, "has shape [10, 120, 16]; an activation tensor is [rows, width]"),
    ("nan", 1, "tensor 'a' of {file} (hook h) holds NaN or inf at row 700"),
    ("inf", 1, "holds NaN or inf at row 700"),
    ("rows", 1, "hook b has 1199 rows but hook a has 1200"),
    ("dtypes", 1, "hook b is float16 but hook a is float32"),
    ("widths", 1, "hook b is 8 wide but hook a is 16; one model's hooks share a width"),
    ("integer", 1, "has dtype int64 (not floating point); activations must be float16"),
    ("pickle", 1, "is not a weights-only torch file"),
    ("extension", 2, "unknown file type '.csv'"),
    ("key", 1, "unknown tensor 'resid_8'; did you mean: resid_6 (in {file}"),
    ("two-hooks-one-tensor", 2, "is given to two hooks"),
])
def test_bad_file_one_error_and_no_folder(case, code, message, tmp_path):
    path, hooks = bad_file(case, tmp_path)
    out = tmp_path / "new" / "acts"  # its parent is made for the import, and removed again
    result = invoke(*import_args(path, out, *hooks))
    assert result.exit_code == code, result.output
    assert message.format(file=path) in result.output.replace("\n", " ")
    assert result.output.count("Error:") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []
    assert not (tmp_path / "marker").exists()  # nothing from the pickle ran


def test_existing_out_is_refused_and_kept(tmp_path):
    path, hooks, _ = write("npy", tmp_path)
    out = tmp_path / "acts"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = invoke(*import_args(path, out, *hooks))
    assert result.exit_code == 2, result.output
    assert "--out" in result.output and "exists and is not empty" in result.output
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and leftovers(tmp_path) == []
    (out / "mine.txt").unlink()  # an empty folder is taken
    assert invoke(*import_args(path, out, *hooks)).exit_code == 0
    assert (out / "manifest.json").is_file() and leftovers(tmp_path) == []
