"""torchrun DDP on CPU (gloo): a 2-process epoch end to end, and one DDP step against the single-process step."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mdistiller.engine import distributed
from mdistiller.engine.checkpoint import save_checkpoint
from mdistiller.engine.config import load_cfg
from mdistiller.engine.speed import StepPrecision
from mdistiller.engine.trainer import BaseTrainer, TrainMeters

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_shard_sampler_covers_each_item_once_and_pads_training_shards():
    train = [list(distributed.ShardSampler(10, shuffle=True, pad=True, seed=3, num_replicas=3, rank_=r))
             for r in range(3)]
    assert [len(shard) for shard in train] == [4, 4, 4]
    assert sorted(set(sum(train, []))) == list(range(10))  # every item, two repeated to even the shards out
    val = [list(distributed.ShardSampler(10, shuffle=False, pad=False, num_replicas=3, rank_=r)) for r in range(3)]
    assert sorted(sum(val, [])) == list(range(10))
    assert [len(distributed.ShardSampler(10, False, False, num_replicas=3, rank_=r)) for r in range(3)] == [4, 3, 3]


def _cfg():
    return load_cfg(None, ["DISTILLER.TYPE", "KD", "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER", "resnet8",
                           "SOLVER.BATCH_SIZE", GLOBAL_BATCH, "SOLVER.LR", 0.1])


def _step_trainer(distiller, cfg) -> BaseTrainer:
    """The trainer's step (wrap, precision, optimizer) without its run directory."""
    trainer = BaseTrainer.__new__(BaseTrainer)
    trainer.cfg = cfg
    trainer.main = distributed.is_main()
    trainer.distiller = distributed.wrap_model(distiller, cfg)
    trainer.device = torch.device("cpu")
    trainer.precision = StepPrecision(cfg, trainer.device)
    trainer.optimizer = trainer.init_optimizer(cfg)
    return trainer


def _build_distiller(cfg):
    from mdistiller.distillers import distiller_dict
    from mdistiller.models import build_model

    torch.manual_seed(0)
    student = build_model("resnet8", 100, dataset="cifar100")
    teacher = build_model("resnet8", 100, dataset="cifar100")
    return distiller_dict["KD"](student, teacher, cfg)


def _batch():
    generator = torch.Generator().manual_seed(1)
    half = torch.randn(GLOBAL_BATCH // 2, 3, 32, 32, generator=generator)
    target = torch.randint(0, 100, (GLOBAL_BATCH // 2,), generator=generator)
    # both halves equal: per-rank BatchNorm statistics then equal the global batch's (SyncBN needs CUDA)
    return torch.cat([half, half]), torch.cat([target, target])


def _two_steps(trainer, image, target):
    """Losses of two consecutive steps (the second is the loss after one step), and the student's weights."""
    trainer.distiller.train()
    losses = []
    for _ in range(2):
        meters = TrainMeters(trainer.device)
        trainer.train_iter((image, target), 1, meters)
        losses.append(meters.summary()["loss"])
    # parameters only: BatchNorm's running_var uses the unbiased variance of each rank's half, not of the whole batch
    return losses, {k: v.detach().clone() for k, v in trainer.distiller.student.named_parameters()}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    distributed.init_from_env()
    try:
        cfg = _cfg()
        trainer = _step_trainer(_build_distiller(cfg), cfg)
        image, target = _batch()
        shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        losses, weights = _two_steps(trainer, image[shard], target[shard])
        mean_losses = distributed.all_reduce_sum(torch.tensor(losses, dtype=torch.float64)) / world
        if rank == 0:
            torch.save({"losses": mean_losses.tolist(), "weights": weights}, out)
    finally:
        distributed.shutdown()


def test_ddp_step_matches_single_process_on_the_global_batch(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ddp = torch.load(out)
    cfg = _cfg()
    single_losses, single_weights = _two_steps(_step_trainer(_build_distiller(cfg), cfg), *_batch())
    assert single_losses[1] != pytest.approx(single_losses[0], rel=1e-3)  # the step changed the model
    assert ddp["losses"] == pytest.approx(single_losses, rel=1e-4, abs=1e-5)
    for key, value in single_weights.items():
        torch.testing.assert_close(ddp["weights"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def _torchrun(tmp_path, cfg_path, *args):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", str(REPO / "tools" / "train.py"), "--cfg", str(cfg_path), *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_torchrun_two_processes_train_one_epoch_with_one_set_of_checkpoints_and_resume(tmp_path, cifar100_root):
    prefix = tmp_path / "runs"
    cfg_path = tmp_path / "ddp.yaml"
    cfg_text = (f"DATASET:\n  ROOT: {cifar100_root}\n  NUM_WORKERS: 0\n  TEST:\n    BATCH_SIZE: 30\n"
                f"DISTILLER:\n  STUDENT: resnet8\nEXPERIMENT:\n  SEED: 0\nLOG:\n  PREFIX: {prefix}\n"
                "SOLVER:\n  BATCH_SIZE: 32\n  EPOCHS: {epochs}\n")
    cfg_path.write_text(cfg_text.format(epochs=1))
    result = _torchrun(tmp_path, cfg_path)
    runs = [path for path in prefix.rglob("latest")]
    assert len(runs) == 1, runs
    run = runs[0].parent
    assert {"latest", "student_latest", "best", "student_best", "worklog.txt"} <= {p.name for p in run.iterdir()}
    assert len(list((run / "train.events").iterdir())) == 1  # rank 0 alone writes TensorBoard events
    worklog = (run / "worklog.txt").read_text()
    assert worklog.count("epoch: 1") == 1 and "best_acc" in worklog
    checkpoint = torch.load(run / "latest", weights_only=False)
    assert checkpoint["epoch"] == 1 and all(key.startswith("module.") for key in checkpoint["model"])
    assert result.stdout.count("Best accuracy") == 1  # ranks > 0 print nothing

    cfg_path.write_text(cfg_text.format(epochs=2))  # same run directory (the name does not depend on the file)
    _torchrun(tmp_path, cfg_path, "--resume")
    assert [path.parent for path in prefix.rglob("latest")] == [run]
    assert torch.load(run / "latest", weights_only=False)["epoch"] == 2
    worklog = (run / "worklog.txt").read_text()
    assert worklog.count("epoch: 1") == 1 and worklog.count("epoch: 2") == 1


def test_resume_restores_the_fp16_grad_scaler(tmp_path):
    """SOLVER.AMP fp16 keeps a GradScaler whose scale adapts over training: `latest` carries it, --resume restores it
    (a fresh scale would skip steps again until it re-adapts). The CPU scaler stands in for CUDA's, same API."""
    cfg = _cfg()
    trainers = []
    for init_scale in (1024.0, 2.0):
        trainer = _step_trainer(_build_distiller(cfg), cfg)
        trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        trainer.train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_batch()), batch_size=4)
        trainer.log_path = str(tmp_path)
        trainer.best_acc, trainer.best_epoch, trainer.last_acc = 0.0, 0, 0.0
        trainers.append(trainer)
    trainers[0].precision.scaler.scale(torch.ones(()))  # the scale tensor exists from the first scaled loss on
    trainers[0].precision.scaler.update(new_scale=512.0)
    save_checkpoint(trainers[0].checkpoint_state(3), str(tmp_path / "latest"))
    assert trainers[1].resume() == 4
    assert trainers[1].precision.scaler.get_scale() == 512.0
