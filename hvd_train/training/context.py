"""The run context: what travels together through a run's loop, callbacks and outputs.

One object instead of the same eight to ten parameters passed from function to function
(trainer -> loop.fit_epochs -> callbacks.run_callbacks -> session.finish -> outputs). Made once the
world, the data and the model are known (session.py); a plain run keeps it to the end, an elastic
run makes a new one per session (the world and the plan change) as an ``ElasticRun``
(elastic.py), which adds its commit callback and says which errors are resets rather than failures:
the loop itself knows nothing of elastic training.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from .. import runtime
from ..config.options import TrainConfig
from ..config.plan import Plan
from ..data.interface import Dataset
from ..outputs.events import EventLog


@dataclass(frozen=True)
class RunContext:
    rt: runtime.Runtime  # this process in its Horovod world
    config: TrainConfig  # what was asked, with rank 0's output directory
    plan: Plan  # the world's global quantities (batch, steps, learning rate, hosts)
    data: Dataset  # arrays or files, behind the data interface
    model: Any  # the keras.Model being trained (identical on every rank)
    optimizer: Any  # its optimizer, averaged over ranks (distributed.DistributedOptimizer)
    log: EventLog  # the run's event log (rank 0 writes)
    model_fn: Optional[Any] = None  # the user's builder, or None for hvd_train's own model
    user_callbacks: Tuple[Any, ...] = ()  # run after hvd_train's own, on every rank
    scorer: Any = None  # a float32 twin of the model for evaluation under a mixed precision policy

    def replace(self, **changes: Any) -> "RunContext":
        return dataclasses.replace(self, **changes)

    @functools.cached_property
    def task(self):
        """Classification or regression, with what the data says (tasks.for_run)."""
        from . import tasks

        return tasks.for_run(self.config, self.data)

    def cursor(self, epoch: int, position: int = 0):
        """This rank's sharding.Cursor of ``epoch`` (or of its rest after ``position``): its
        samples per step as its data shares the steps (interface.Dataset.step_rows)."""
        from ..data import sharding

        rt, batch = self.rt, self.config.batch_size
        rows = self.data.step_rows(rt.rank, rt.size, self.config, epoch, position)
        return sharding.Cursor(self.plan.train_samples, rt.rank, rt.size, batch, position, rows)

    def scoring_model(self):
        """The model evaluation runs: the trained model, or under a mixed precision policy its
        float32 twin holding the trained weights (exact float32 metrics)."""
        if self.scorer is None:
            return self.model
        self.scorer.set_weights(self.model.get_weights())
        return self.scorer

    # What an elastic run changes (elastic.ElasticRun); a plain run adds nothing.

    def extra_callbacks(self, early_stopping) -> List[Any]:
        """Callbacks after every other one of a fit (elastic: the commit)."""
        return []

    def is_reset(self, err: BaseException) -> bool:
        """Whether ``err`` ends this session to continue in a new world rather than failing the run."""
        return False
