"""The training loop (upstream mdistiller's `BaseTrainer`, single process on the distiller's device).

Subclasses (CRD, DOT) override `unpack_batch` (what a training batch holds and which extra tensors the distiller's
`forward_train` receives) and/or `train_iter` (one optimisation step, which must call `train_meters.update`).
"""
import os
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tensorboardX import SummaryWriter

from ..dataset import batches
from ..errors import ConfigError
from ..registry import Registry
from . import distributed, recipes, speed
from .checkpoint import CheckpointError, add_prefix, load_checkpoint, load_weights, save_checkpoint, strip_prefix
from .config import dump_cfg
from .lock import RunLock
from .records import RunRecord, flatten
from .rng import capture_rng_state, restore_rng_state
from .signals import GracefulStop
from .utils import REFRESH_SECONDS, adjust_learning_rate, correct_counts, log_msg, progress_bar, validate

# SOLVER.TRAINER -> trainer class (upstream names: base, crd, dot, crd_dot); users' trainers register the same way.
trainer_dict: Registry = Registry("trainer", "SOLVER.TRAINER")


def register_trainer(name: str):
    """Class decorator: `trainer_dict[name] = cls`."""
    return trainer_dict.register(name)


class NonFiniteLossError(RuntimeError):
    """A loss term (or a gradient) became NaN or inf; the run stops and the last good checkpoint stays."""


def first_non_finite_parameter(module: nn.Module) -> Optional[str]:
    """Name of the first parameter holding NaN/inf (one host sync), or None. Run once per epoch, before validation
    and checkpoints: a non-finite gradient at an epoch's last step leaves a finite loss but non-finite weights."""
    named = list(module.named_parameters())
    if not named:
        return None
    finite = torch.stack([param.detach().isfinite().all() for _, param in named])
    return None if bool(finite.all()) else named[int((~finite).nonzero()[0])][0]


class TrainMeters:
    """Per-epoch sums kept on the device, so a step costs no host synchronisation; `summary()` syncs once."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss·n, correct@1, correct@5
        self.count = 0
        self.steps = 0
        self.names: List[str] = []
        # per loss term: first step (1-based) where it was not finite (0: none yet), and its value there
        self.first_bad_step: Optional[torch.Tensor] = None
        self.first_bad_value: Optional[torch.Tensor] = None
        self.last_terms: Optional[torch.Tensor] = None  # the loss terms of the latest step, on the device
        self.term_sums: Optional[torch.Tensor] = None  # per loss term: Σ value·batch size
        self.start = time.monotonic()

    def update(
        self, preds: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, losses_dict: Dict[str, torch.Tensor]
    ) -> None:
        batch_size = target.size(0)
        self.steps += 1
        self.count += batch_size
        correct = correct_counts(preds.detach(), target, (1, 5))
        self.sums += torch.cat([(loss.detach() * batch_size).reshape(1), correct]).double()
        terms = torch.stack([value.detach().float().mean() for value in losses_dict.values()])
        self.last_terms = terms
        weighted = terms.double() * batch_size
        self.term_sums = weighted if self.term_sums is None else self.term_sums + weighted
        if self.first_bad_step is None:
            self.names = list(losses_dict)
            self.first_bad_step = torch.zeros(len(self.names), dtype=torch.long, device=terms.device)
            self.first_bad_value = torch.zeros(len(self.names), device=terms.device)
        new_bad = ~torch.isfinite(terms) & (self.first_bad_step == 0)
        self.first_bad_step = torch.where(new_bad, self.steps, self.first_bad_step)
        self.first_bad_value = torch.where(new_bad, terms, self.first_bad_value)

    def summary(self) -> Dict[str, Any]:
        """Averages so far (one host sync): loss, top1, top5, img_per_s, seconds, and `terms` (each loss term by name);
        raises NonFiniteLossError naming step and term of the first NaN/inf."""
        loss_sum, correct1, correct5 = self.sums.tolist()
        if self.first_bad_step is not None:
            bad = [(step, name, value) for step, name, value in
                   zip(self.first_bad_step.tolist(), self.names, self.first_bad_value.tolist()) if step > 0]
            if bad:
                step, name, value = min(bad)
                raise NonFiniteLossError(f"step {step}: loss term '{name}' is {value}")
        count = max(self.count, 1)
        elapsed = max(time.monotonic() - self.start, 1e-9)
        terms = [] if self.term_sums is None else self.term_sums.tolist()
        return {
            "terms": {name: value / count for name, value in zip(self.names, terms)},
            "loss": loss_sum / count,
            "top1": 100.0 * correct1 / count,
            "top5": 100.0 * correct5 / count,
            "img_per_s": self.count / elapsed,
            "seconds": elapsed,
        }


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def start_wandb(cfg, experiment_name: str, tags: Sequence[str], log_dir: str):
    """A wandb run (with the merged config) when LOG.WANDB is on; falls back to offline logging (then to none)
    instead of crashing."""
    if not cfg.LOG.WANDB:
        return None
    try:
        import wandb
    except ImportError:
        print(log_msg("LOG.WANDB is True but wandb is not installed; continuing without wandb", "INFO"))
        return None
    kwargs = dict(project=cfg.EXPERIMENT.PROJECT, name=experiment_name, tags=list(tags), dir=log_dir,
                  config=flatten(cfg))
    try:
        return wandb.init(**kwargs)
    except Exception as error:  # no network, no login, server error: never lose the training run over it
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(log_msg(f"wandb failed to start ({reason}); logging offline under {log_dir} "
                      "(upload later with `wandb sync`)", "INFO"))
    try:
        return wandb.init(mode="offline", **kwargs)
    except Exception as error:
        print(log_msg(f"wandb offline mode failed too ({type(error).__name__}); continuing without wandb", "INFO"))
        return None


@register_trainer("base")
class BaseTrainer:
    """SGD over `distiller.get_learnable_parameters()`, step LR schedule, per-epoch validation, logs, checkpoints,
    run records (results.json, metrics.csv: docs/records.md).

    The run directory is LOG.PREFIX/`experiment_name` (upstream's rule) unless `run_dir` is given. `overrides` (the
    command line's KEY VALUE list) and `teacher_ckpt` (the teacher file used) go into results.json.
    `contrastive_batches`: whether `unpack_batch` reads CRD's (image, target, index, contrastive_index) batches; a
    distiller and a trainer must agree on it."""

    contrastive_batches = False
    # recipe state (docs/recipes.md), set by __init__; the class defaults (all off) serve trainers assembled
    # piecewise without __init__ (tests, benchmarks)
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
    ema: Optional[nn.Module] = None
    ema_acc = ema_best_acc = -1.0

    def __init__(
        self, experiment_name: str, distiller: nn.Module, train_loader, val_loader, cfg, tags: Sequence[str] = (),
        run_dir: Optional[str] = None, overrides: Sequence[str] = (), teacher_ckpt: str = "",
    ):
        self.cfg = cfg
        self.main = distributed.is_main()  # only rank 0 writes logs and checkpoints under torchrun
        self.distiller = distributed.wrap_model(speed.prepare_model(distiller, cfg), cfg)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.device = next(distiller.parameters()).device
        self.precision = speed.StepPrecision(cfg, self.device)
        self.optimizer = self.init_optimizer(cfg)
        self.scheduler = recipes.build_scheduler(cfg, self.optimizer)  # None: upstream's `adjust_learning_rate`
        self.ema = recipes.build_ema(cfg, self.distiller.student)
        if self.ema is not None:  # after every optimizer step that happens (a GradScaler may skip one)
            self.optimizer.register_step_post_hook(lambda *_: self.ema.update_parameters(self.distiller.student))
        self.best_acc = -1.0
        self.best_epoch = 0
        self.last_acc = -1.0
        self.log_path = run_dir or os.path.join(cfg.LOG.PREFIX, experiment_name)
        os.makedirs(self.log_path, exist_ok=True)
        self.run_lock = RunLock(self.log_path) if self.main else distributed.NoOpWriter()  # before any write into it
        self.stop = GracefulStop()
        self.record = RunRecord(self.log_path, cfg, overrides, teacher_ckpt) if self.main else None
        if self.main:
            dump_cfg(cfg, os.path.join(self.log_path, "config.yaml"))
        events = os.path.join(self.log_path, "train.events")
        self.tf_writer = SummaryWriter(events) if self.main else distributed.NoOpWriter()
        self.wandb = start_wandb(cfg, experiment_name, tags, self.log_path) if self.main else None

    def init_optimizer(self, cfg) -> torch.optim.Optimizer:
        """SOLVER.TYPE over the learnable parameters: upstream's SGD with momentum, or AdamW (docs/recipes.md)."""
        if cfg.SOLVER.TYPE == "AdamW":
            return torch.optim.AdamW(self.distiller.get_learnable_parameters(), lr=cfg.SOLVER.LR,
                                     weight_decay=cfg.SOLVER.WEIGHT_DECAY, betas=(0.9, 0.999))
        if cfg.SOLVER.TYPE != "SGD":
            raise ConfigError(f"SOLVER.TYPE = {cfg.SOLVER.TYPE!r} is not supported; expected one of "
                              f"{', '.join(map(repr, recipes.OPTIMIZERS))}")
        return torch.optim.SGD(
            self.distiller.get_learnable_parameters(),
            lr=cfg.SOLVER.LR,
            momentum=cfg.SOLVER.MOMENTUM,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            **speed.sgd_kwargs(self.device),
        )

    # ------------------------------------------------------------------ logging
    def log_step(self, step: int, lr: float, meters: TrainMeters) -> None:
        """Every LOG.TENSORBOARD_FREQ training steps: each loss term of the latest step and the LR (one host sync)."""
        if not self.main or meters.last_terms is None:
            return
        for name, value in zip(meters.names, meters.last_terms.tolist()):
            self.tf_writer.add_scalar(f"train_step/{name}", value, step)
        self.tf_writer.add_scalar("train_step/lr", lr, step)

    def log(self, lr: float, epoch: int, log_dict: Dict[str, float]) -> None:
        for key, value in log_dict.items():
            self.tf_writer.add_scalar(key, value, epoch)
        self.tf_writer.flush()
        if log_dict["test_acc"] > self.best_acc:
            self.best_acc = log_dict["test_acc"]
            self.best_epoch = epoch
        self.last_acc = log_dict["test_acc"]
        if self.wandb is not None:
            self.wandb.log({"current lr": lr, **log_dict}, step=epoch)
            self.wandb.summary["best_acc"] = self.best_acc
        if not self.main:
            return
        with open(os.path.join(self.log_path, "worklog.txt"), "a") as writer:
            lines = ["-" * 25 + os.linesep, "epoch: {}".format(epoch) + os.linesep]
            lines.append("lr: {:.2f}".format(float(lr)) + os.linesep)
            lines += ["{}: {:.2f}".format(key, value) + os.linesep for key, value in log_dict.items()]
            lines.append("-" * 25 + os.linesep)
            writer.writelines(lines)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, epoch: int) -> Dict:
        """Upstream's full checkpoint ({epoch, model with `module.` keys, optimizer, best_acc}) plus resume extras
        (RNG states; with SOLVER.AMP fp16, the GradScaler's scale and growth tracker)."""
        state = {
            "epoch": epoch,
            "model": add_prefix(self.distiller.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "last_acc": self.last_acc,
            "rng_state": capture_rng_state(self.train_loader),
        }
        if self.precision.scaler is not None:
            state["grad_scaler"] = self.precision.scaler.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
            state["ema_best_acc"] = self.ema_best_acc
        return state

    def save_checkpoints(self, epoch: int, test_acc: float) -> None:
        if not self.main:
            return
        state = self.checkpoint_state(epoch)
        student_state = {"model": self.distiller.student.state_dict()}
        if epoch % self.cfg.LOG.SAVE_CHECKPOINT_FREQ == 0:
            save_checkpoint(state, os.path.join(self.log_path, "epoch_{}".format(epoch)))
            save_checkpoint(student_state, os.path.join(self.log_path, "student_{}".format(epoch)))
        if test_acc >= self.best_acc:
            save_checkpoint(state, os.path.join(self.log_path, "best"))
            save_checkpoint(student_state, os.path.join(self.log_path, "student_best"))
        if self.ema is not None:  # student files, loadable as any student_* (docs/recipes.md)
            ema_state = {"model": self.ema.module.state_dict()}
            if self.ema_acc >= self.ema_best_acc:
                save_checkpoint(ema_state, os.path.join(self.log_path, "student_ema_best"))
            save_checkpoint(ema_state, os.path.join(self.log_path, "student_ema_latest"))
        save_checkpoint(student_state, os.path.join(self.log_path, "student_latest"))
        # `latest` last: it is what --resume reads, so once it says epoch N every other file of epoch N is written
        # (a kill before it makes --resume redo epoch N, rewriting the same files)
        save_checkpoint(state, os.path.join(self.log_path, "latest"))

    def resume(self) -> int:
        """Restore model, optimizer, accuracies and RNG states from `latest`; returns the next epoch."""
        path = os.path.join(self.log_path, "latest")
        if not os.path.exists(path):
            raise CheckpointError(f"--resume: no previous run to continue ({path} does not exist); omit --resume")
        state = load_checkpoint(path)
        if not isinstance(state, dict) or not {"epoch", "model", "optimizer"} <= set(state):
            raise CheckpointError(f"{path}: not a full training checkpoint (expected keys epoch, model, optimizer)")
        load_weights(self.distiller, strip_prefix(state["model"]), path, "the distiller built from this config")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{path}: optimizer state does not match this config: {error}") from None
        if self.precision.scaler is not None and state.get("grad_scaler"):
            self.precision.scaler.load_state_dict(state["grad_scaler"])
        self.restore_recipes(state, path)
        self.best_acc = float(state.get("best_acc", -1.0))
        self.best_epoch = int(state.get("best_epoch", 0))
        self.last_acc = float(state.get("last_acc", -1.0))
        if "rng_state" in state:
            warning = restore_rng_state(state["rng_state"], self.train_loader)
        else:
            warning = "the checkpoint has no RNG state (written by upstream mdistiller?)"
        if warning:
            print(log_msg(f"resuming {path}: {warning}; not bit-identical to an uninterrupted run", "INFO"))
        return int(state["epoch"]) + 1

    def restore_recipes(self, state: Dict, path: str) -> None:
        """The LR scheduler's and the EMA's state (docs/recipes.md). A checkpoint that lacks the state this config
        needs, or holds state it does not use, was written with other SOLVER settings."""
        for key, owner, keys in (("scheduler", self.scheduler, "SOLVER.SCHEDULER/WARMUP_EPOCHS"),
                                 ("ema", self.ema, "SOLVER.EMA_DECAY")):
            if owner is not None and key not in state:
                raise CheckpointError(f"{path}: this config's {keys} needs the {key} state, which the checkpoint "
                                      "lacks; resume with the run's config.yaml")
            if owner is None and key in state:
                raise CheckpointError(f"{path}: the checkpoint holds {key} state, which this config's {keys} does "
                                      "not use; resume with the run's config.yaml")
            if owner is not None:
                owner.load_state_dict(state[key])
        self.ema_best_acc = float(state.get("ema_best_acc", -1.0))

    # ------------------------------------------------------------------ training
    def train(self, resume: bool = False) -> Tuple[float, float]:
        """Run (or continue) training; returns (best, last) validation top-1."""
        self.stop.install()
        try:
            epoch = self.resume() if resume else 1
            if self.record is not None:
                self.record.start(epoch)
            while epoch < self.cfg.SOLVER.EPOCHS + 1:
                self.stop.check(epoch, 0, os.path.join(self.log_path, "latest"))
                self.train_epoch(epoch)
                epoch += 1
        finally:
            self.stop.uninstall()
            self.run_lock.release()
            self.tf_writer.close()
        message = "Best accuracy: {:.2f} (epoch {})| Last accuracy: {:.2f}"
        print(log_msg(message.format(self.best_acc, self.best_epoch, self.last_acc), "EVAL"), flush=True)
        if self.main:
            with open(os.path.join(self.log_path, "worklog.txt"), "a") as writer:
                # upstream ends the file with `best_acc\t..` (no newline); the last accuracy goes just before it
                writer.write("last_acc\t{:.2f}".format(self.last_acc) + os.linesep)
                writer.write("best_acc\t{:.2f}".format(float(self.best_acc)))
            self.record.finish()
        if self.wandb is not None:
            self.wandb.summary["last_acc"] = self.last_acc
            self.wandb.finish()
        return self.best_acc, self.last_acc

    def epoch_lr(self, epoch: int) -> float:
        """The LR of the 1-based `epoch`, set in the optimizer: upstream's step decay, or the scheduler's value (it is
        stepped after each epoch, so a resumed run continues it; docs/recipes.md)."""
        if self.scheduler is None:
            return adjust_learning_rate(epoch, self.cfg, self.optimizer)
        return self.scheduler.get_last_lr()[0]

    def validate_ema(self) -> Dict[str, float]:
        """ema_test_acc, ema_test_acc_top5 and ema_test_loss of the EMA student; tracks its best accuracy."""
        metrics = recipes.validate_student(self.val_loader, self.ema.module, "ema")
        self.ema_acc = metrics["ema_test_acc"]
        self.ema_best_acc = max(self.ema_best_acc, self.ema_acc)
        return metrics

    def train_epoch(self, epoch: int) -> None:
        lr = self.epoch_lr(epoch)
        meters = TrainMeters(self.device)
        pbar = progress_bar(len(self.train_loader))
        last_refresh = time.monotonic()
        self.distiller.train()
        try:
            with batches(self.train_loader) as stream:
                for data in stream:
                    self.train_iter(data, epoch, meters)
                    step = (epoch - 1) * len(self.train_loader) + meters.steps
                    if self.cfg.LOG.TENSORBOARD_FREQ and step % self.cfg.LOG.TENSORBOARD_FREQ == 0:
                        self.log_step(step, lr, meters)
                    self.stop.check(epoch, meters.steps, os.path.join(self.log_path, "latest"))
                    pbar.update()
                    if time.monotonic() - last_refresh >= REFRESH_SECONDS:
                        stats = meters.summary()
                        pbar.set_description(log_msg("Epoch:{}| Loss:{:.4f}| Top-1:{:.3f}| img/s:{:.0f}".format(
                            epoch, stats["loss"], stats["top1"], stats["img_per_s"]), "TRAIN"), refresh=False)
                        last_refresh = time.monotonic()
            stats = meters.summary()
            bad_parameter = first_non_finite_parameter(self.distiller)
            if bad_parameter is not None:
                raise NonFiniteLossError(f"step {meters.steps}: the gradient of '{bad_parameter}' was not finite")
        except NonFiniteLossError as error:
            latest = os.path.join(self.log_path, "latest")
            kept = f"last good checkpoint: {latest} (epoch {epoch - 1})" if epoch > 1 else "no checkpoint was written"
            raise NonFiniteLossError(f"non-finite value at epoch {epoch}, {error}; stopping ({kept})") from None
        finally:
            pbar.close()
        if self.scheduler is not None:
            self.scheduler.step()  # to the next epoch's LR, which `latest` then carries
        test_acc, test_acc_top5, test_loss = validate(self.val_loader, self.distiller)
        log_dict = OrderedDict(
            train_acc=stats["top1"],
            train_loss=stats["loss"],
            test_acc=test_acc,
            test_acc_top5=test_acc_top5,
            test_loss=test_loss,
        )
        if self.ema is not None:
            log_dict.update(self.validate_ema())
        self.log(lr, epoch, log_dict)
        self.save_checkpoints(epoch, test_acc)
        self.record_epoch(epoch, lr, stats, log_dict, time.monotonic() - meters.start)
        eta = (self.cfg.SOLVER.EPOCHS - epoch) * (time.monotonic() - meters.start)
        print(log_msg(
            "Epoch:{}/{}| lr:{:g}| Loss:{:.4f}| Top-1:{:.3f}| img/s:{:.0f}| "
            "Test Top-1:{:.3f}| Top-5:{:.3f}| Loss:{:.4f}| Best:{:.3f}| Time:{}| ETA:{}".format(
                epoch, self.cfg.SOLVER.EPOCHS, lr, stats["loss"], stats["top1"], stats["img_per_s"], test_acc,
                test_acc_top5, test_loss, self.best_acc, _format_seconds(stats["seconds"]), _format_seconds(eta)),
            "TRAIN"), flush=True)

    def record_epoch(self, epoch: int, lr: float, stats: Dict[str, Any], log_dict: Dict[str, float],
                     seconds: float) -> None:
        """metrics.csv row and results.json after the epoch's checkpoints; each loss term and the LR to TensorBoard."""
        if not self.main:
            return
        terms = stats["terms"]
        for name, value in terms.items():
            self.tf_writer.add_scalar(f"train/{name}", value, epoch)
        self.tf_writer.add_scalar("train/lr", lr, epoch)
        self.tf_writer.flush()
        row = {"epoch": epoch, "lr": lr, "train_loss": stats["loss"], **terms, "train_acc": stats["top1"],
               "train_acc_top5": stats["top5"]}
        row.update((key, value) for key, value in log_dict.items() if key not in ("train_acc", "train_loss"))
        row.update(train_img_per_s=stats["img_per_s"], epoch_time_s=seconds)
        self.record.epoch_end(row, self.best_acc, self.best_epoch, self.last_acc)

    def unpack_batch(self, data) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """(image, target, extra `forward_train` kwargs). Base batches are (image, target[, index])."""
        return data[0], data[1], {}

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return speed.to_memory_format(tensor.to(self.device, non_blocking=True), self.cfg)

    def train_iter(self, data, epoch: int, train_meters: TrainMeters) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        image, target, extra = self.unpack_batch(data)
        image, target = self.to_device(image.float()), self.to_device(target)
        extra = {key: self.to_device(value) for key, value in extra.items()}
        with self.precision.autocast():
            preds, losses_dict = self.distiller(image=image, target=target, epoch=epoch, **extra)
            loss = sum(value.mean() for value in losses_dict.values())
        if self.cfg.SOLVER.SKIP_NONFINITE and not self.loss_is_finite(loss):
            terms = ", ".join(f"{k}={v.detach().float().mean().item():.4g}" for k, v in losses_dict.items())
            print(log_msg(f"skipped a step of epoch {epoch}: non-finite loss ({terms})", "INFO"), flush=True)
            return
        self.precision.backward_step(loss, self.optimizer)
        train_meters.update(preds, target, loss, losses_dict)

    @staticmethod
    def loss_is_finite(loss: torch.Tensor) -> bool:
        """Whether every rank's loss is finite (all ranks skip together, so DDP's all-reduce cannot hang)."""
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        return bool(distributed.all_reduce_sum(finite).item() == distributed.world_size())
