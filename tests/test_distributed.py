"""Training in two processes on a CPU: detectron2's ``launch`` joins them with GLOO, DiffSegTrainer wraps
the tiny ODISE in DistributedDataParallel, trains a few iterations, checkpoints and evaluates.

The test starts this file in a fresh interpreter (its ``__main__`` block below), as tools/train_net.py is
started: the same argument parser and setup, ``launch`` with ``--num-gpus 2 --dist-url auto``. Each rank
saves what it holds (its trainable parameters before DistributedDataParallel and after training, a
fingerprint of each batch it trained on, its evaluation results) for the test to compare.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY_ODISE = os.path.join(ROOT, "configs", "tiny", "odise.yaml")
DATASET = "diffseg_sample_voc_panoptic"
MAX_ITER = 3
SEED = 7  # detectron2's default_setup seeds rank r with SEED + r: the ranks draw different crops and heads


def _trainable(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _plain(results):
    """Evaluation results as nested dicts of floats (what ``torch.load(weights_only=True)`` reads)."""
    if isinstance(results, dict):
        return {str(k): _plain(v) for k, v in results.items()}
    return float(results)


def _train_one_rank(args, record_dir: str) -> None:
    """One process: tools/train_net.py's setup and training, then this rank's record in ``record_dir``."""
    import train_net
    from detectron2.utils import comm
    from torch.nn.parallel import DistributedDataParallel

    from diffseg_d2.engine import DiffSegTrainer

    class RecordingTrainer(DiffSegTrainer):
        built = None
        batches = []

        @classmethod
        def build_model(cls, cfg):
            model = super().build_model(cfg)
            cls.built = _trainable(model)  # this rank's own random start, before DDP copies rank 0's
            return model

        @classmethod
        def build_train_loader(cls, cfg):
            loader = super().build_train_loader(cfg)

            def recorded():
                for batch in loader:
                    # (height, width, sum of pixel values) of each image: what this rank trains on
                    cls.batches.append([[*d["image"].shape[-2:], d["image"].double().sum().item()] for d in batch])
                    yield batch

            return recorded()

    cfg = train_net.setup(args)
    trainer = RecordingTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    record = {
        "rank": comm.get_rank(),
        "world_size": comm.get_world_size(),
        "ddp": isinstance(model, DistributedDataParallel),
        "iter": trainer.iter,
        "built": RecordingTrainer.built,
        "trained": _trainable(inner),
        "batches": RecordingTrainer.batches,
        "results": _plain(getattr(trainer, "_last_eval_results", None) or {}),
    }
    torch.save(record, os.path.join(record_dir, f"rank{comm.get_rank()}.pt"))


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """Run this file's ``__main__`` (2 CPU processes) once; returns (records by rank, output dir)."""
    from detectron2.modeling import build_model

    from diffseg_d2 import get_diffseg_cfg

    # The tiny presets are built here first, so that the ranks only read them: building one seeds torch's
    # global RNG, which would give both ranks the same random head.
    build_model(get_diffseg_cfg(TINY_ODISE))
    tmp = tmp_path_factory.mktemp("distributed")
    records, out = tmp / "records", tmp / "run"
    records.mkdir()
    # one thread per process: two ranks on a 2-core machine, and the GLOO all-reduce must not wait
    # behind oversubscribed intra-op threads
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), str(records), "--config-file", TINY_ODISE,
           "--num-gpus", "2", "--dist-url", "auto",
           "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.IMS_PER_BATCH", "2", "SEED", str(SEED), "OUTPUT_DIR", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    by_rank = {}
    for path in sorted(records.glob("rank*.pt")):
        record = torch.load(path, map_location="cpu", weights_only=True)
        by_rank[record["rank"]] = record
    return by_rank, out


@pytest.mark.slow
def test_both_ranks_train_in_distributed_data_parallel(two_rank_run):
    by_rank, _ = two_rank_run
    assert sorted(by_rank) == [0, 1], "each of the two processes writes its record"
    for rank, record in by_rank.items():
        assert record["world_size"] == 2, f"rank {rank} was not part of a 2-process group"
        assert record["ddp"], f"rank {rank} trained an unwrapped model: gradients were never averaged"
        assert record["iter"] == MAX_ITER, f"rank {rank} stopped at iteration {record['iter']}"
        # IMS_PER_BATCH is the total over the ranks: one image per rank and iteration
        assert [len(b) for b in record["batches"]] == [1] * MAX_ITER


@pytest.mark.slow
def test_parameters_are_identical_across_ranks_after_training(two_rank_run):
    """Each rank starts from its own random head (seeded by rank) and trains on its own crops; only DDP's
    broadcast of rank 0's weights and its averaging of the gradients make the ranks end up equal."""
    by_rank, _ = two_rank_run
    built0, built1 = by_rank[0]["built"], by_rank[1]["built"]
    trained0, trained1 = by_rank[0]["trained"], by_rank[1]["trained"]
    assert trained0 and sorted(trained0) == sorted(trained1) == sorted(built0) == sorted(built1)
    # the preconditions that make equality mean something: the ranks built different models and
    # computed their gradients on different images
    assert any(not torch.equal(built0[k], built1[k]) for k in built0), "both ranks built the same weights"
    assert by_rank[0]["batches"] != by_rank[1]["batches"], "both ranks trained on the same images"
    unequal = [k for k in trained0 if not torch.equal(trained0[k], trained1[k])]
    assert not unequal, f"{len(unequal)} parameters differ between the ranks after training, e.g. {unequal[:3]}"
    # and training moved them away from the start that DDP broadcast (rank 0's)
    moved = [k for k in trained0 if not torch.equal(trained0[k], built0[k])]
    assert len(moved) > len(trained0) // 2, f"only {len(moved)} of {len(trained0)} parameters were updated"


@pytest.mark.slow
def test_rank_zero_writes_the_final_checkpoint_of_the_shared_weights(two_rank_run):
    by_rank, out = two_rank_run
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    checkpoint = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["iteration"] == MAX_ITER - 1
    state = checkpoint["model"]
    assert not any(k.startswith("module.") for k in state), "the checkpoint holds the DDP wrapper's names"
    for k, v in by_rank[1]["trained"].items():
        assert torch.equal(state[k], v), f"{k} in model_final.pth differs from rank 1's weights"


@pytest.mark.slow
def test_the_final_evaluation_gathers_metrics_on_rank_zero(two_rank_run):
    by_rank, _ = two_rank_run
    results = by_rank[0]["results"]
    assert list(results) == [DATASET]
    metrics = results[DATASET]
    for task, name in (("panoptic_seg", "PQ"), ("sem_seg", "mIoU")):
        value = metrics[task][name]
        assert math.isfinite(value) and 0.0 <= value <= 100.0, f"{task} {name} = {value}"
    # detectron2's evaluators gather every rank's predictions and compute metrics on the main process only
    assert by_rank[1]["results"] == {DATASET: {}}


if __name__ == "__main__":
    # Started by ``two_rank_run``: argv is the record folder, then tools/train_net.py's arguments.
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import train_net
    from detectron2.engine import launch

    record_dir, argv = sys.argv[1], sys.argv[2:]
    args = train_net.argument_parser().parse_args(argv)
    launch(_train_one_rank, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args, record_dir))
