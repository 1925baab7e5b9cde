"""The benchmark notebook as users run it: through papermill and the `bk run` command."""
import json, math
from dataclasses import fields
from pathlib import Path

import papermill as pm
import pytest

from bk_nbdev.benchmark import BenchmarkResults
from bk_nbdev.cli import main

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "nbs" / "06_benchmark.ipynb"


@pytest.fixture(autouse=True)
def _not_in_nbdev_test(monkeypatch):
    monkeypatch.delenv("IN_TEST", raising=False)  # the notebook would write to a temporary directory


def _run(tmp_path, **params):
    return pm.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), cwd=str(NB.parent), progress_bar=False,
                               parameters={"output_dir": str(tmp_path), **params})


def test_smoke_preset_writes_complete_finite_results(tmp_path):
    _run(tmp_path, preset="smoke", epochs=3)
    res = json.loads((tmp_path / "wikitext2" / "smoke_results.json").read_text())
    assert set(f.name for f in fields(BenchmarkResults)) == set(res)
    assert res["config"]["epochs"] == 3 and len(res["epoch_perplexities"]) == 3  # the papermill parameter took effect
    for k, v in res.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool): assert math.isfinite(v), k
    for k in ("epoch_losses", "epoch_perplexities", "epoch_times", "epoch_flops"):
        assert all(math.isfinite(x) for x in res[k]), k
    assert res["best_perplexity"] < res["metadata"]["vocab_size"] / 5
    assert res["forward_flops"] > 0 and res["backward_flops"] > res["forward_flops"] and res["optimizer_flops"] > 0
    assert res["metadata"]["torch"] and res["metadata"]["seed"] == 42
    assert (tmp_path / "wikitext2" / "training_curves.png").stat().st_size > 10_000
    assert not list((tmp_path / "wikitext2").glob("*.ckpt")), "the checkpoint is removed after a finished run"


def test_papermill_skips_the_notebooks_self_tests(tmp_path):
    "A run of one configuration runs it, not 06's tests of its functions (cells tagged skip-execution)"
    nb = _run(tmp_path, preset="smoke", epochs=1, max_train_tokens=2048)
    tests = [c for c in nb.cells if "skip-execution" in c.metadata.get("tags", [])]
    assert len(tests) >= 10 and all(c.execution_count is None and not c.outputs for c in tests)
    assert any(c.execution_count for c in nb.cells if "parameters" in c.metadata.get("tags", []))


def test_the_notebooks_self_tests_pass(tmp_path):
    "06's self-tests carry skip-execution for papermill, and nbdev 3's nbdev-test skips that tag too: they run here"
    from nbdev.config import get_config
    from fastcore.nbio import read_nb, write_nb
    from nbdev.test import test_nb
    nb = read_nb(NB)
    tests = [c for c in nb.cells if "skip-execution" in c.metadata.get("tags", [])]
    for c in tests: c.metadata["tags"].remove("skip-execution")
    assert len(tests) >= 10
    write_nb(nb, tmp_path / NB.name)  # run as nbdev-test runs a notebook, in a folder of its own
    passed, _ = test_nb(tmp_path / NB.name, skip_flags=get_config().tst_flags.split(), profile=False)
    assert passed, "a self-test of 06 failed (its traceback is above)"


def test_bad_preset_fails_clearly(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="valid presets: transformer, baseline, full"):
        _run(tmp_path, preset="fulll")


def test_unknown_parameter_fails_clearly(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match=r"Unknown parameter\(s\) \['epoch'\]"):
        _run(tmp_path, preset="smoke", epoch=2)


def test_badly_typed_override_fails_clearly(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="lr = 'fast' is not a valid float"):
        _run(tmp_path, preset="smoke", lr="fast")


def test_cli_validates_before_running(tmp_path):
    with pytest.raises(SystemExit, match="Unknown preset 'nope'"):
        main(["run", "smoke", "nope", "--output-dir", str(tmp_path)])
    assert not (tmp_path / "wikitext2" / "smoke_results.json").exists()  # nothing ran
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        main(["run", "smoke", "-p", "epochs"])


def test_cli_runs_presets_and_compares(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --output-dir is the caller's, although the notebook runs in nbs/
    main(["run", "smoke", "smoke_transformer", "--output-dir", "runs", "-p", "epochs=1", "-p", "seed=1"])
    out = tmp_path / "runs" / "wikitext2"
    for name in ("smoke", "smoke_transformer"):
        assert (out / f"{name}_benchmark.ipynb").exists()
        assert json.loads((out / f"{name}_results.json").read_text())["config"]["seed"] == 1
    cmp = json.loads((out / "comparison_smoke_transformer_vs_smoke.json").read_text())
    assert cmp["model1"] == "smoke_transformer" and cmp["perplexity"]["ratio"] > 0
    assert (out / "training_curves.png").exists() and (out / "training_flops.png").exists()
