"""The main job, end to end: data -> model -> [FP pre-training] -> prepare -> calibrate ->
DDQ training to the budget -> report -> saved run. Shared by the CLI and Python users."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..atomic import atomic_write_bytes
from ..budget import Budget, CostModel
from ..conversion import DDQConfig, prepare
from ..training import TrainConfig, evaluate, train_ddq, train_float
from .distributed import check_device, init_distributed

__all__ = ["RunConfig", "load_run", "run_quantize"]

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "config.json"
FP_WEIGHTS_FILE = "fp32.safetensors"
MODEL_FILE = "model.safetensors"
RESULT_FILE = "result.json"
ARCH_FILE = "arch.json"


@dataclass
class RunConfig:
    """Every setting of one ``ddq quantize`` run; saved as ``config.json`` in the run folder.

    Example:
        >>> cfg = RunConfig(model="mobilenet_v2", budget={"avg_weight_bits": 4, "max_act_bits": 4})
        >>> RunConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    model: str = "mobilenet_v2"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    small_input: bool | None = None  # None: on for images of 64 px or less
    dataset: str = "mnist5k"
    data_root: str | None = None
    subset: int | None = None
    weights: str | None = None
    batch_size: int = 64
    workers: int = 0
    fp_epochs: int = 4
    fp_lr: float = 0.05
    budget: dict[str, Any] = field(
        default_factory=lambda: {"avg_weight_bits": 4.0, "max_act_bits": 4}
    )
    ddq: dict[str, Any] = field(default_factory=lambda: DDQConfig().to_dict())
    train: dict[str, Any] = field(default_factory=lambda: dataclasses.asdict(TrainConfig()))
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/default"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        if not isinstance(d, dict):
            raise ValueError(f"run settings must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names, key=repr)
        if unknown:
            raise ValueError(f"unknown run setting(s) {unknown}; known: {sorted(names)}")
        cfg = cls(**d)
        cfg.budget_obj()
        cfg.ddq_config()
        cfg.train_config()
        return cfg

    def budget_obj(self) -> Budget:
        return Budget.from_dict(self.budget)

    def ddq_config(self) -> DDQConfig:
        return DDQConfig.from_dict(self.ddq)

    def train_config(self) -> TrainConfig:
        if not isinstance(self.train, dict):
            raise ValueError(f"train must be a mapping of training settings, got {self.train!r}")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(self.train) - known, key=repr)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return TrainConfig(**self.train)


def _build(cfg: RunConfig):
    from ..data import create_dataset
    from ..models import create_model

    splits = create_dataset(cfg.dataset, root=cfg.data_root, subset=cfg.subset, seed=cfg.seed)
    small = cfg.small_input if cfg.small_input is not None else splits.image_size <= 64
    arch = {
        "name": cfg.model,
        "kwargs": {
            "num_classes": splits.num_classes,
            "in_channels": splits.in_channels,
            "small_input": small,
            **cfg.model_kwargs,
        },
    }
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, **arch["kwargs"])
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    return splits, model, arch, example


def _write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def run_quantize(cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Run the main job; returns the result dict that is also saved as ``result.json``.

    Every bad input (unknown model or dataset, missing data folder, unreadable weights
    file, infeasible budget, bad settings) raises before any training starts.

    Example:
        >>> res = run_quantize(RunConfig(out="runs/mnv2-w4a4"))  # doctest: +SKIP
        >>> res["fp_acc"], res["ddq_acc"], res["budget_usage"]
    """
    from ..data import make_loaders
    from ..models import load_weights, save_weights
    from ..report import write_report

    t0 = time.time()
    run_dir = Path(cfg.out)
    budget, ddq_cfg, train_cfg = cfg.budget_obj(), cfg.ddq_config(), cfg.train_config()
    check_device(cfg.device)
    distributed = init_distributed(cfg.device)
    main = not distributed or dist.get_rank() == 0
    splits, model, arch, example = _build(cfg)
    if cfg.weights:
        load_weights(model, cfg.weights)
    # Feasibility on a throw-away prepared copy: the error comes before FP pre-training.
    probe = prepare(copy.deepcopy(model), ddq_cfg, example_inputs=example)
    budget.apply(probe, CostModel(probe))
    del probe
    if resume and not (run_dir / RUN_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"--resume: {run_dir / RUN_CONFIG_FILE} not found")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / RUN_CONFIG_FILE, cfg.to_dict())
        _write_json(run_dir / ARCH_FILE, {"arch": arch, "example_shape": list(example.shape)})

    train_loader, test_loader = make_loaders(
        splits, cfg.batch_size, workers=cfg.workers, seed=cfg.seed, distributed=distributed
    )
    model.to(cfg.device)
    fp_path = run_dir / FP_WEIGHTS_FILE
    if cfg.weights or cfg.fp_epochs == 0:
        fp_acc = evaluate(model, test_loader, cfg.device)
    elif resume and fp_path.is_file():
        load_weights(model, fp_path)
        fp_acc = evaluate(model, test_loader, cfg.device)
    else:
        fp_acc = train_float(
            model, train_loader, test_loader, cfg.fp_epochs, cfg.fp_lr, cfg.seed,
            cfg.device, train_cfg.progress and main,
        )  # fmt: skip
        if main:
            save_weights(model, fp_path)
    if main:
        logger.info("fp32 accuracy: %.2f%%", fp_acc)
    fp_time = time.time() - t0

    prepare(model, ddq_cfg, example_inputs=example.to(cfg.device))
    model.ddq_arch = arch
    result = train_ddq(
        model, train_loader, test_loader, budget, train_cfg, run_dir, resume, cfg.device
    )
    out = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "budget": budget.to_dict(),
        "budget_description": budget.describe(),
        "fp_acc": fp_acc,
        "ddq_acc": result.test_acc,
        "budget_usage": result.budget_usage,
        "fit_actions": [dataclasses.asdict(a) for a in result.fit_actions],
        "fp_wall_s": fp_time,
        "ddq_wall_s": result.wall_s,
        "wall_s": time.time() - t0,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if main:
        save_weights(model, run_dir / MODEL_FILE)
        _write_json(run_dir / RESULT_FILE, out)
        write_report(run_dir, model, out, result.history)
    return out


def load_run(run_dir: str | Path) -> tuple[nn.Module, torch.Tensor]:
    """The trained, prepared model of a finished run and an example input for it.

    Example:
        >>> model, example = load_run("runs/default")  # doctest: +SKIP
    """
    from ..models import create_model, load_weights

    run_dir = Path(run_dir)
    paths = [run_dir / f for f in (RUN_CONFIG_FILE, ARCH_FILE, MODEL_FILE)]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: is {run_dir} a finished ddq run folder?")
    try:
        cfg = RunConfig.from_dict(json.loads(paths[0].read_text()))
        info = json.loads(paths[1].read_text())
        arch, shape = info["arch"], info["example_shape"]
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise ValueError(f"{run_dir} holds an invalid run description: {e}") from e
    model = create_model(arch["name"], **arch["kwargs"])
    example = torch.zeros(*shape)
    prepare(model, cfg.ddq_config(), example_inputs=example)
    load_weights(model, paths[2])
    model.ddq_arch = arch
    return model.eval(), example
