"""The opt-in recipe keys of docs/recipes.md: defaults train exactly as before, the LR follows the closed form,
every option resumes exactly, and each does what it says (label smoothing, clipping, AdamW, EMA, value checks)."""
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_engine_train import EVAL, TRAIN, one_thread, read_worklog  # noqa: F401  (autouse fixture)

from mdistiller.distillers import Vanilla
from mdistiller.engine import trainer as trainer_module
from mdistiller.engine.config import load_cfg
from mdistiller.engine.dot import DistillationOrientedTrainer
from mdistiller.engine.dot_trainer import DOT
from mdistiller.engine.speed import StepPrecision
from mdistiller.engine.utils import adjust_learning_rate
from mdistiller.errors import ConfigError
from mdistiller.launch.build import build_distiller, check_values
from mdistiller.models import cifar_model_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPE_KEYS = {"scheduler", "ema", "ema_best_acc"}
ALL_ON = {"TYPE": "AdamW", "LR": 0.002, "SCHEDULER": "cosine", "WARMUP_EPOCHS": 1, "MIN_LR": 0.0001,
          "LABEL_SMOOTHING": 0.1, "CLIP_GRAD": 1.0, "EMA_DECAY": 0.5}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> str:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "resnet8.pth"
    torch.save({"model": cifar_model_dict["resnet8"][0](num_classes=100).state_dict()}, path)
    return str(path)


def write_cfg(prefix: Path, data_root, teacher: str, epochs: int, images: int = 32, **solver) -> str:
    """KD resnet8 -> resnet8 on `images` training images in steps of 16; SOLVER keys on top of the file's."""
    settings = {"BATCH_SIZE": 16, "EPOCHS": epochs, "LR": 0.05, "LR_DECAY_STAGES": [2], "WEIGHT_DECAY": 0.0005,
                **solver}
    prefix.mkdir(parents=True, exist_ok=True)
    path = prefix / "cfg.yaml"
    path.write_text(
        f"""EXPERIMENT: {{NAME: run, PROJECT: p, SEED: 0}}
DATASET: {{ROOT: '{data_root}', NUM_WORKERS: 0, TRAIN_SUBSET: {images}, TEST: {{BATCH_SIZE: 50}}}}
DISTILLER: {{TYPE: KD, TEACHER: resnet8, STUDENT: resnet8, TEACHER_CKPT: '{teacher}'}}
SOLVER: {{{', '.join(f'{key}: {value!r}' for key, value in settings.items())}}}
LOG: {{PREFIX: '{prefix}', SAVE_CHECKPOINT_FREQ: 100}}
"""
    )
    return str(path)


@pytest.fixture
def used_lrs(monkeypatch):
    """{epoch: the LR in the optimizer at each of its steps} and the trainers, recorded around `train_iter`."""
    seen = {"lr": {}, "trainers": []}
    real = trainer_module.BaseTrainer.train_iter

    def train_iter(self, data, epoch, meters):
        seen["lr"].setdefault(epoch, set()).add(self.optimizer.param_groups[0]["lr"])
        if self not in seen["trainers"]:
            seen["trainers"].append(self)
        real(self, data, epoch, meters)

    monkeypatch.setattr(trainer_module.BaseTrainer, "train_iter", train_iter)
    return seen


def stop_before(epoch: int, monkeypatch) -> None:
    """The interruption of test_engine_train's resume test: Ctrl-C as `epoch` starts (exit status 130)."""
    real = trainer_module.BaseTrainer.train_epoch

    def train_epoch(self, current):
        if current == epoch:
            raise KeyboardInterrupt
        real(self, current)

    monkeypatch.setattr(trainer_module.BaseTrainer, "train_epoch", train_epoch)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def load(run: Path, name: str = "latest") -> dict:
    return torch.load(run / name, weights_only=True)


# ----------------------------------------------------------------------------------------------- defaults
def test_defaults_train_bit_for_bit_as_before(tmp_path, cifar100_root, teacher_file, used_lrs):
    explicit = {"TYPE": "SGD", "SCHEDULER": "step", "WARMUP_EPOCHS": 0, "MIN_LR": 0.0, "LABEL_SMOOTHING": 0.0,
                "CLIP_GRAD": 0.0, "EMA_DECAY": 0.0}
    runs = []
    for name, solver in (("default", {}), ("explicit", explicit)):
        cfg = write_cfg(tmp_path / name, cifar100_root, teacher_file, epochs=3, LR_DECAY_STAGES=[1, 2], **solver)
        assert TRAIN.main(["--cfg", cfg]) == 0
        runs.append(tmp_path / name / "p" / "run")
    default, explicit_run = (load(run) for run in runs)
    assert same(default["model"], explicit_run["model"]) and same(default["optimizer"], explicit_run["optimizer"])
    assert default.keys() == explicit_run.keys() and not RECIPE_KEYS & set(default)
    assert not {"student_ema_latest", "student_ema_best"} & {path.name for path in runs[0].iterdir()}
    assert all(trainer.scheduler is None and trainer.ema is None for trainer in used_lrs["trainers"])
    reference = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.05)
    expected = {epoch: {adjust_learning_rate(epoch, load_cfg(str(runs[0] / "config.yaml")), reference)}
                for epoch in (1, 2, 3)}
    assert used_lrs["lr"] == expected == {1: {0.05}, 2: {0.05 * 0.1}, 3: {0.05 * 0.1**2}}


# ----------------------------------------------------------------------------------------------- LR schedule
def closed_form(epoch: int, solver: dict) -> float:
    """docs/recipes.md: warm-up LR·e/W (times the step decay with "step"), cosine to MIN_LR after it."""
    lr, warmup, epochs = solver["LR"], solver["WARMUP_EPOCHS"], solver["EPOCHS"]
    if solver["SCHEDULER"] == "cosine":
        if epoch <= warmup:
            return lr * epoch / warmup
        low = solver.get("MIN_LR", 0.0)
        return low + 0.5 * (lr - low) * (1 + math.cos(math.pi * (epoch - warmup - 1) / (epochs - warmup)))
    decayed = lr * solver["LR_DECAY_RATE"] ** sum(epoch > stage for stage in solver["LR_DECAY_STAGES"])
    return decayed * epoch / warmup if epoch <= warmup else decayed


@pytest.mark.parametrize("solver", [
    {"SCHEDULER": "step", "WARMUP_EPOCHS": 2, "LR_DECAY_STAGES": [1, 3]},
    {"SCHEDULER": "cosine", "WARMUP_EPOCHS": 2, "MIN_LR": 0.01},
    {"SCHEDULER": "cosine", "WARMUP_EPOCHS": 0},
], ids=["step+warmup", "cosine+warmup", "cosine"])
def test_the_lr_of_every_epoch_is_the_closed_form(solver, tmp_path, cifar100_root, teacher_file, used_lrs):
    cfg = write_cfg(tmp_path, cifar100_root, teacher_file, epochs=5, images=16, LR=0.1, **solver)
    assert TRAIN.main(["--cfg", cfg]) == 0
    full = dict(load_cfg(cfg).SOLVER)
    got = {epoch: lrs.pop() for epoch, lrs in used_lrs["lr"].items() if len(lrs) == 1}
    assert got.keys() == {1, 2, 3, 4, 5}
    for epoch, lr in got.items():
        assert lr == pytest.approx(closed_form(epoch, full), rel=1e-12, abs=0), epoch
    if solver["SCHEDULER"] == "step":  # after warm-up: upstream's step decay exactly
        reference = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        assert [got[e] for e in (3, 4, 5)] == [adjust_learning_rate(e, load_cfg(cfg), reference) for e in (3, 4, 5)]
    assert got[1] > 0
    assert "scheduler" in load(tmp_path / "p" / "run")


# ----------------------------------------------------------------------------------------------- exact resume
@pytest.fixture(scope="module")
def all_on(tmp_path_factory, cifar100_root, teacher_file):
    """Every option on (AdamW, cosine + warm-up, label smoothing, clipping, EMA), 4 epochs of 2 steps:
    {"reference": uninterrupted run, "resumed": stopped before epoch 3 then --resume, "no_ema": EMA off}."""
    base = tmp_path_factory.mktemp("all_on")
    runs = {}
    for name, solver in (("reference", ALL_ON), ("resumed", ALL_ON), ("no_ema", {**ALL_ON, "EMA_DECAY": 0.0})):
        cfg = write_cfg(base / name, cifar100_root, teacher_file, epochs=4, **solver)
        if name == "resumed":
            with pytest.MonkeyPatch.context() as patch:
                stop_before(3, patch)
                assert TRAIN.main(["--cfg", cfg]) == 130
            assert load(base / name / "p" / "run")["epoch"] == 2
            shutil.copy(base / name / "p" / "run" / "latest", base / "latest_epoch_2")
            assert TRAIN.main(["--cfg", cfg, "--resume"]) == 0
        else:
            assert TRAIN.main(["--cfg", cfg]) == 0
        runs[name] = base / name / "p" / "run"
    runs["epoch_2"] = base / "latest_epoch_2"
    return runs


def test_every_option_resumes_exactly(all_on):
    reference, resumed = load(all_on["reference"]), load(all_on["resumed"])
    assert resumed["epoch"] == reference["epoch"] == 4
    for key in ("model", "optimizer", "scheduler", "ema", "ema_best_acc", "best_acc"):
        assert same(resumed[key], reference[key]), key
    for name in ("student_latest", "student_best", "student_ema_latest", "student_ema_best"):
        assert same(load(all_on["resumed"], name), load(all_on["reference"], name)), name
    assert read_worklog(all_on["resumed"] / "worklog.txt") == read_worklog(all_on["reference"] / "worklog.txt")
    adam_state = next(iter(reference["optimizer"]["state"].values()))
    assert {"exp_avg", "exp_avg_sq"} <= set(adam_state)
    assert reference["scheduler"]["last_epoch"] == 4


def test_resume_without_the_recipe_state_would_differ(all_on, tmp_path, cifar100_root, teacher_file, monkeypatch):
    """Control: the same resume with the scheduler and the EMA started afresh ends elsewhere."""
    run = tmp_path / "p" / "run"
    run.mkdir(parents=True)
    shutil.copy(all_on["epoch_2"], run / "latest")
    monkeypatch.setattr(trainer_module.BaseTrainer, "restore_recipes", lambda self, state, path: None)
    cfg = write_cfg(tmp_path, cifar100_root, teacher_file, epochs=4, **ALL_ON)
    assert TRAIN.main(["--cfg", cfg, "--resume"]) == 0
    reference, control = load(all_on["reference"]), load(run)
    assert not same(control["model"], reference["model"]) and not same(control["ema"], reference["ema"])


def test_a_checkpoint_without_the_configs_recipe_state_is_refused(all_on, tmp_path, cifar100_root, teacher_file,
                                                                   capsys):
    run = tmp_path / "p" / "run"
    run.mkdir(parents=True)
    shutil.copy(all_on["reference"] / "latest", run / "latest")
    cfg = write_cfg(tmp_path, cifar100_root, teacher_file, epochs=5, TYPE="AdamW", LR=0.002, SCHEDULER="cosine",
                    WARMUP_EPOCHS=1, MIN_LR=0.0001)  # no EMA
    assert TRAIN.main(["--cfg", cfg, "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds ema state, which this config's SOLVER.EMA_DECAY" in err


# ----------------------------------------------------------------------------------------------- EMA
def test_ema_is_updated_every_step_validated_saved_and_leaves_the_student_alone(all_on, cifar100_root):
    reference = load(all_on["reference"])
    assert int(reference["ema"]["n_averaged"]) == 4 * 2  # every optimizer step of 4 epochs of 2 steps
    ema_student = load(all_on["reference"], "student_ema_latest")["model"]
    assert same(ema_student, {k[len("module."):]: v for k, v in reference["ema"].items() if k.startswith("module.")})
    assert not same(ema_student, load(all_on["reference"], "student_latest")["model"])
    blocks, _ = read_worklog(all_on["reference"] / "worklog.txt")
    assert {"ema_test_acc", "ema_test_acc_top5", "ema_test_loss"} <= set(blocks[0])
    assert reference["ema_best_acc"] == pytest.approx(max(block["ema_test_acc"] for block in blocks), abs=0.006)
    top1, _, _ = EVAL.evaluate("resnet8", str(all_on["reference"] / "student_ema_best"), "cifar100", 50,
                               ["DATASET.ROOT", str(cifar100_root)])
    assert top1 == pytest.approx(reference["ema_best_acc"], abs=1e-6)
    # the EMA only observes: the raw student trains as without it (its validation leaves the RNG states alone)
    no_ema = load(all_on["no_ema"])
    assert same(no_ema["model"], reference["model"]) and not (RECIPE_KEYS - {"scheduler"}) & set(no_ema)


# ----------------------------------------------------------------------------------------------- single options
def test_label_smoothing_is_the_closed_form_on_kd_and_zero_is_plain_cross_entropy(teacher_file):
    eps = 0.2
    cfg = load_cfg(None, ["DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet8", "DISTILLER.STUDENT", "resnet8",
                          "DISTILLER.TEACHER_CKPT", teacher_file, "SOLVER.LABEL_SMOOTHING", str(eps)])
    distiller = build_distiller(cfg, num_data=8, num_classes=100).train()
    assert distiller.label_smoothing == eps
    torch.manual_seed(0)
    image, target = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
    logits, losses = distiller(image=image, target=target, epoch=1)
    log_p = F.log_softmax(logits, dim=1)
    smoothed = (1 - eps) * -log_p.gather(1, target[:, None]).squeeze(1) + eps * -log_p.mean(dim=1)
    torch.testing.assert_close(losses["loss_ce"], cfg.KD.LOSS.CE_WEIGHT * smoothed.mean())
    distiller.label_smoothing = 0.0
    logits, losses = distiller(image=image, target=target, epoch=1)
    assert torch.equal(losses["loss_ce"], cfg.KD.LOSS.CE_WEIGHT * F.cross_entropy(logits, target))


def test_every_distiller_takes_its_cross_entropy_from_ce_loss():
    """One place applies SOLVER.LABEL_SMOOTHING: a method calling F.cross_entropy itself would silently skip it."""
    direct = [path.name for path in (ROOT / "mdistiller" / "distillers").glob("*.py")
              if path.name != "_base.py" and "cross_entropy(" in path.read_text()]
    assert not direct


def _grad_norm(params) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()


def test_clip_grad_bounds_the_gradient_norm_at_the_step():
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []
    optimizer.register_step_pre_hook(lambda *_: norms.append(_grad_norm(model.parameters())))
    for clip in ("0.0", "0.5"):
        precision = StepPrecision(load_cfg(None, ["SOLVER.CLIP_GRAD", clip]), torch.device("cpu"))
        optimizer.zero_grad()
        precision.backward_step(model(100 * torch.randn(16, 8)).pow(2).mean(), optimizer)
    assert norms[0] > 10 and norms[1] == pytest.approx(0.5, rel=1e-5)


def test_clip_grad_with_a_grad_scaler_clips_the_unscaled_gradients_and_still_skips_inf_steps():
    """SOLVER.AMP fp16's path; the CPU GradScaler stands in for CUDA's (same API, as in test_ddp.py)."""
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []
    optimizer.register_step_pre_hook(lambda *_: norms.append(_grad_norm(model.parameters())))
    precision = StepPrecision(load_cfg(None, ["SOLVER.CLIP_GRAD", "0.5"]), torch.device("cpu"))
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    precision.backward_step(model(100 * torch.randn(16, 8)).pow(2).mean(), optimizer)
    assert norms == [pytest.approx(0.5, rel=1e-5)]
    optimizer.zero_grad()
    before = [param.detach().clone() for param in model.parameters()]
    precision.backward_step(model(torch.full((16, 8), float("inf"))).sum(), optimizer)
    assert len(norms) == 1 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_clip_grad_bounds_both_gradients_of_the_dot_trainer():
    torch.manual_seed(0)
    student = nn.Linear(8, 4)
    norms = []
    optimizer = DistillationOrientedTrainer(student.parameters(), lr=0.1, momentum=0.8, momentum_kd=0.95)
    real_step_kd = optimizer.step_kd
    optimizer.step_kd = lambda: (norms.append(_grad_norm(student.parameters())), real_step_kd())
    optimizer.register_step_pre_hook(lambda *_: norms.append(_grad_norm(student.parameters())))

    def distiller(image, target, epoch):
        logits = student(image)
        return logits, {"loss_ce": F.cross_entropy(100 * logits, target), "loss_kd": logits.pow(2).mean() * 1e3}

    precision = StepPrecision(load_cfg(None, ["SOLVER.CLIP_GRAD", "0.25"]), torch.device("cpu"))
    trainer = SimpleNamespace(unpack_batch=lambda data: (data[0], data[1], {}), to_device=lambda t: t,
                              distiller=distiller, optimizer=optimizer, precision=precision)
    meters = SimpleNamespace(update=lambda *args: None)
    DOT.train_iter(trainer, (torch.randn(16, 8), torch.randint(0, 4, (16,))), 1, meters)
    assert norms == pytest.approx([0.25, 0.25], rel=1e-5)


def test_adamw_is_built_as_asked_and_other_types_are_refused():
    holder = SimpleNamespace(distiller=Vanilla(nn.Linear(3, 2)), device=torch.device("cpu"))
    adamw = trainer_module.BaseTrainer.init_optimizer(
        holder, load_cfg(None, ["SOLVER.TYPE", "AdamW", "SOLVER.LR", "0.001", "SOLVER.WEIGHT_DECAY", "0.05"]))
    assert type(adamw) is torch.optim.AdamW
    group = adamw.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (0.001, 0.05, (0.9, 0.999))
    assert type(trainer_module.BaseTrainer.init_optimizer(holder, load_cfg(None))) is torch.optim.SGD
    with pytest.raises(ConfigError, match=r"^SOLVER.TYPE = 'Adam' is not supported; expected one of 'SGD', 'AdamW'$"):
        trainer_module.BaseTrainer.init_optimizer(holder, load_cfg(None, ["SOLVER.TYPE", "Adam"]))
    with pytest.raises(ConfigError, match=r"^SOLVER.TYPE = 'AdamW' is not supported by the DOT trainer"):
        DOT.init_optimizer(holder, load_cfg(None, ["SOLVER.TYPE", "AdamW"]))


BAD_VALUES = [
    (["SOLVER.SCHEDULER", "linear"], "SOLVER.SCHEDULER = 'linear'; expected one of 'step', 'cosine'"),
    (["SOLVER.TYPE", "Adam"], "SOLVER.TYPE = 'Adam'; expected one of 'SGD', 'AdamW'"),
    (["SOLVER.WARMUP_EPOCHS", "240"], "SOLVER.WARMUP_EPOCHS = 240; expected 0 (off) or more epochs, fewer than "
                                      "SOLVER.EPOCHS = 240"),
    (["SOLVER.WARMUP_EPOCHS", "-1"], "SOLVER.WARMUP_EPOCHS = -1;"),
    (["SOLVER.MIN_LR", "-0.1"], "SOLVER.MIN_LR = -0.1; expected 0 to SOLVER.LR = 0.05"),
    (["SOLVER.MIN_LR", "0.5"], "SOLVER.MIN_LR = 0.5;"),
    (["SOLVER.LABEL_SMOOTHING", "1.0"], "SOLVER.LABEL_SMOOTHING = 1.0; expected 0 (off) or more and below 1"),
    (["SOLVER.LABEL_SMOOTHING", "-0.1"], "SOLVER.LABEL_SMOOTHING = -0.1;"),
    (["SOLVER.CLIP_GRAD", "-1.0"], "SOLVER.CLIP_GRAD = -1.0; expected 0 (off) or a positive maximum gradient norm"),
    (["SOLVER.EMA_DECAY", "1.0"], "SOLVER.EMA_DECAY = 1.0; expected 0 (off) or more and below 1"),
    (["SOLVER.EMA_DECAY", "-0.5"], "SOLVER.EMA_DECAY = -0.5;"),
]


@pytest.mark.parametrize("opts, expected", BAD_VALUES, ids=[f"{o[0]}={o[1]}" for o, _ in BAD_VALUES])
def test_bad_values_are_one_line_config_errors_naming_the_key(opts, expected):
    with pytest.raises(ConfigError) as error:
        check_values(load_cfg(None, opts))
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


def test_a_bad_value_stops_the_cli_before_any_data_is_read(tmp_path, capsys):
    cfg = write_cfg(tmp_path, tmp_path / "no_data_here", "", epochs=2, EMA_DECAY=1.5)
    assert TRAIN.main(["--cfg", cfg]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "train.py: error: SOLVER.EMA_DECAY = 1.5; expected 0 (off) or more and below 1"
