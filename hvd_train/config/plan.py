"""The resolved run: global quantities derived once from the config, the data and the world.

train() prints and saves it; ``hvd-train plan`` (``--dry-run``) prints it without training, from
the same code (session.prepare), so the two cannot disagree.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from ..data import sharding
from .options import TrainConfig, scaled_learning_rate

SHOWN_ROWS = 8  # training rows listed per rank in the per-rank view


@dataclass(frozen=True)
class Plan:
    world_size: int
    batch_size_per_process: int
    global_batch_size: int
    base_lr: float
    scaled_lr: float
    warmup_epochs: int
    steps_per_epoch: int
    train_samples: int
    val_samples: int
    test_samples: int
    train_samples_per_rank: List[int]
    intra_op_threads: int
    hosts: List[str]  # the host of each rank, in rank order
    reading: List[str] = field(default_factory=list)  # file datasets: what each rank reads (stream.py)
    classes: Dict[str, List[int]] = field(default_factory=dict)  # classification: train/val/test rows per class
    precision: str = "float32"  # Keras's dtype policy while training
    steps_per_execution: int = 1  # of a whole epoch's fit (execution_steps of the asked number)

    def lines(self) -> List[str]:
        return [
            f"world size {self.world_size}, {self.intra_op_threads} intra-op thread(s) per process; "
            + "; ".join(f"{host}: rank(s) {','.join(str(r) for r, h in enumerate(self.hosts) if h == host)}"
                        for host in dict.fromkeys(self.hosts)),
            f"batch {self.batch_size_per_process} per process x {self.world_size} "
            f"= global batch {self.global_batch_size}",
            f"learning rate {self.base_lr:g} scaled to {self.scaled_lr:g}, warmup {self.warmup_epochs} epoch(s)",
            f"samples train/val/test {self.train_samples}/{self.val_samples}/{self.test_samples}; "
            f"train samples per rank {self.train_samples_per_rank}; {self.steps_per_epoch} steps per epoch",
        ] + self._compute_line() + self.reading[:1]  # a file dataset's summary; each rank's share in report_lines

    def _compute_line(self) -> List[str]:
        if self.precision == "float32" and self.steps_per_execution == 1:
            return []
        return [f"precision {self.precision} (float32 variables, evaluation and saved model); "
                f"{self.steps_per_execution} step(s) per execution"]


def execution_steps(steps: int, asked: int) -> int:
    """Steps per execution for a fit of ``steps`` steps an epoch: ``asked`` if it divides them,
    else its largest divisor below ``asked``. Keras runs whole executions, so one that did not
    divide the epoch would train steps of the next epoch's data in this one."""
    return max(d for d in range(1, min(asked, steps) + 1) if steps % d == 0)


def make_plan(config: TrainConfig, n_train: int, n_val: int, n_test: int, world_size: int,
              intra_op_threads: int, hosts: List[str], reading: Optional[List[str]] = None,
              classes: Optional[Dict[str, Any]] = None) -> Plan:
    order = np.arange(n_train)
    steps = sharding.steps_per_epoch(n_train, world_size, config.batch_size)
    per_rank = [sum(len(rows) for rows, _ in sharding.local_batches(n_train, r, world_size, config.batch_size, order))
                for r in range(world_size)]
    return Plan(
        world_size=world_size, batch_size_per_process=config.batch_size,
        global_batch_size=config.batch_size * world_size, base_lr=config.lr,
        scaled_lr=scaled_learning_rate(config.lr, world_size, config.lr_scaling),
        warmup_epochs=config.warmup_epochs,
        steps_per_epoch=steps,
        train_samples=n_train, val_samples=n_val, test_samples=n_test,
        train_samples_per_rank=per_rank, intra_op_threads=intra_op_threads, hosts=hosts, reading=list(reading or []),
        classes={str(k): [int(n) for n in v] for k, v in (classes or {}).items()},
        precision=config.precision, steps_per_execution=execution_steps(steps, config.steps_per_execution),
    )


def rank_views(plan: Plan, config: TrainConfig) -> List[Dict[str, Any]]:
    """What each rank trains on in the first epoch: its step sizes and its first training rows
    (indices into the training split, in the epoch's order), from sharding.py like the real run."""
    order = sharding.epoch_order(plan.train_samples, 0, config.seed, config.shuffle)
    views = []
    for rank in range(plan.world_size):
        batches = sharding.local_batches(plan.train_samples, rank, plan.world_size, config.batch_size, order)
        sizes = [len(rows) for rows, _ in batches]
        rows = np.concatenate([rows for rows, _ in batches])
        views.append({"rank": rank, "host": plan.hosts[rank], "samples_per_epoch": int(sum(sizes)),
                      "steps": len(sizes), "first_batch": sizes[0], "last_batch": sizes[-1],
                      "first_rows": [int(i) for i in rows[:SHOWN_ROWS]]})
    return views


def report(plan: Plan, config: TrainConfig) -> Dict[str, Any]:
    """Everything ``hvd-train plan --json`` prints."""
    return {"plan": asdict(plan), "ranks": rank_views(plan, config), "config": config.to_dict(),
            "epochs": config.epochs, "total_steps": plan.steps_per_epoch * config.epochs}


def report_lines(plan: Plan, config: TrainConfig) -> List[str]:
    lines = plan.lines()
    shuffle = f"on (seed {config.seed})" if config.shuffle else "off"
    lines.append(f"{config.epochs} epoch(s) x {plan.steps_per_epoch} steps = {plan.steps_per_epoch * config.epochs} "
                 f"optimizer steps on every rank; shuffle {shuffle}")
    for view in rank_views(plan, config):
        more = ", ..." if view["samples_per_epoch"] > len(view["first_rows"]) else ""
        first = "" if plan.reading else (f"; epoch 1 starts with training rows "
                                         f"{', '.join(map(str, view['first_rows']))}{more}")
        # Streamed files: a window read by unit gives a rank a few rows more or fewer per step.
        about = "about " if plan.reading else ""
        lines.append(f"rank {view['rank']} ({view['host']}): {about}{view['samples_per_epoch']} samples per epoch in "
                     f"{view['steps']} steps of {about}{view['first_batch']}"
                     f"{'' if view['last_batch'] == view['first_batch'] else ', the last ' + str(view['last_batch'])}"
                     f"{first}")
    if plan.classes:  # classification: how each class falls into the splits
        lines.append("classes, train/val/test samples: " + ", ".join(
            f"{name} {'/'.join(map(str, counts))}" for name, counts in plan.classes.items()))
    return lines + plan.reading[1:]
