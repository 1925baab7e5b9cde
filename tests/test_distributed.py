"""Data-parallel training with torch.distributed (gloo on this CPU): same numbers as one process, rank 0 writes,
resume works, and a failing rank ends the job instead of hanging."""
import json, math, os, socket, time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bk_nbdev.benchmark import WikiText2Benchmark, launch_distributed
from bk_nbdev.data import load_corpus
from bk_nbdev.models import TransformerConfig, TransformerLM
from bk_nbdev.runtime import init_distributed
from bk_nbdev.training import TrainConfig
from bk_nbdev.trainer import train

CFG = dict(epochs=2, batch_size=8, n_seq=32, lr=3e-3, warmup_steps=5, max_train_tokens=8 * 32 * 8, eval_batch_size=16)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _worker(rank, world, port, ckpt, stop_after, out_file, fail_rank, compiled):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_distributed(timeout_s=30)
    syn = load_corpus("synthetic", use_cache=False)
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=len(syn.vocab), d_model=32, n_layers=2, n_seq=32, dropout=0.0))
    if rank == fail_rank: raise RuntimeError(f"rank {rank} fails on purpose")
    r = train(model, syn, TrainConfig(**CFG, compile=compiled), checkpoint_path=ckpt, progress=False, stop_after_epochs=stop_after)
    if rank == 0: Path(out_file).write_text(json.dumps(asdict(r)))
    if world > 1: dist.destroy_process_group()


def _run(world, tmp_path, ckpt=None, stop_after=None, fail_rank=None, compiled=False):
    out = tmp_path / f"result_{world}_{time.time_ns()}.json"
    mp.spawn(_worker, args=(world, _free_port(), ckpt, stop_after, str(out), fail_rank, compiled), nprocs=world, join=True)
    return json.loads(out.read_text())


def test_two_processes_match_one(tmp_path):
    one, two = _run(1, tmp_path), _run(2, tmp_path)
    assert two["world_size"] == 2 and two["backend"] == "gloo" and one["world_size"] == 1
    for a, b in zip(one["epoch_perplexities"], two["epoch_perplexities"]):
        assert abs(a - b) / a < 1e-4, (one["epoch_perplexities"], two["epoch_perplexities"])
    assert abs(one["test_perplexity"] - two["test_perplexity"]) / one["test_perplexity"] < 1e-4
    assert one["epoch_tokens"] == two["epoch_tokens"]          # the same global batches
    assert set(two["per_rank"]) == {"0", "1"}


def test_two_process_run_resumes_from_its_checkpoint(tmp_path):
    full = _run(2, tmp_path)
    ckpt = tmp_path / "ckpt.pt"
    part = _run(2, tmp_path, ckpt=str(ckpt), stop_after=1)
    assert len(part["epoch_losses"]) == 1 and ckpt.exists()
    assert [p.name for p in tmp_path.glob("*.pt")] == ["ckpt.pt"]   # one checkpoint, written by rank 0
    resumed = _run(2, tmp_path, ckpt=str(ckpt))
    assert resumed["epoch_losses"] == full["epoch_losses"]
    assert resumed["test_perplexity"] == full["test_perplexity"]


def test_a_compiled_step_trains_under_two_processes(tmp_path):
    "torch.compile of the DDP-wrapped loss (TrainConfig.compile): the eager run's numbers, up to the rounding of fused kernels"
    eager, compiled = _run(2, tmp_path), _run(2, tmp_path, compiled=True)
    assert compiled["world_size"] == 2 and compiled["epoch_tokens"] == eager["epoch_tokens"]
    for a, b in zip(eager["epoch_perplexities"] + [eager["test_perplexity"]], compiled["epoch_perplexities"] + [compiled["test_perplexity"]]):
        assert abs(a - b) / a < 1e-5, (eager["epoch_perplexities"], compiled["epoch_perplexities"])


def test_a_failing_rank_ends_the_job(tmp_path):
    with pytest.raises(Exception, match="rank 1 fails on purpose"):
        _run(2, tmp_path, fail_rank=1)


def test_torchrun_benchmark_rank0_writes_once(tmp_path):
    launch_distributed("smoke", 2, tmp_path, {"epochs": 1}, timeout=60)
    files = sorted(p.name for p in (tmp_path / "wikitext2").iterdir())
    assert files == ["smoke_results.json"], files
    res = WikiText2Benchmark(tmp_path).load_results("smoke")
    assert res["metadata"]["world_size"] == 2 and res["metadata"]["backend"] == "gloo"
    assert math.isfinite(res["test_perplexity"]) and res["test_perplexity"] < res["metadata"]["vocab_size"] / 5


def test_batch_must_divide_over_processes(tmp_path):
    "The error names the bad value, and torchrun's root-cause report ends with the failing rank's own traceback"
    with pytest.raises(RuntimeError, match="batch_size=9 must be divisible by the number of processes") as e:
        launch_distributed("smoke", 2, tmp_path, {"epochs": 1, "batch_size": 9}, timeout=60)
    root_cause = str(e.value).split("Root Cause (first observed failure)")[-1]
    assert "in worker_main" in root_cause and "ValueError: batch_size=9" in root_cause, root_cause


def test_benchmark_notebook_launches_nproc(tmp_path, monkeypatch):
    import papermill as pm
    monkeypatch.delenv("IN_TEST", raising=False)
    nb = Path(__file__).resolve().parents[1] / "nbs" / "06_benchmark.ipynb"
    pm.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), cwd=str(nb.parent), progress_bar=False,
                        parameters={"preset": "smoke", "output_dir": str(tmp_path), "nproc": 2, "epochs": 1})
    res = WikiText2Benchmark(tmp_path).load_results("smoke")
    assert res["metadata"]["world_size"] == 2 and len(res["epoch_perplexities"]) == 1


def test_full_trains_data_parallel(tmp_path):
    "All twelve flags under two processes: active learning's scoring batch and curriculum's short steps each get their FLOPs counted, and counting must not tell DDP that a parameter (an expert no token of the step reached) was used"
    tiny = dict(dataset="synthetic", d_model=32, n_layers=3, n_seq=32, batch_size=8, epochs=1, max_train_tokens=2048,
                eval_batch_size=16)
    launch_distributed("full", 2, tmp_path, tiny, timeout=60)
    res = WikiText2Benchmark(tmp_path).load_results("resnet_bk_full")
    assert res["metadata"]["world_size"] == 2 and math.isfinite(res["test_perplexity"])
