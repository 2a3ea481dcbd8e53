#!/usr/bin/env python
"""hvd-train on a Ray cluster (horovod.ray.RayExecutor). Run it with the venv's python:

    .venv/bin/python launch/ray.py [--address HOST:PORT] --num-workers N [--cpus-per-worker C]
        [--gpus-per-worker G] [--fetch-to DIR] [--grace S] -- HVD_TRAIN_ARGS...

Without --address it starts a local Ray instance for the job. The driver is
hvd_train/launchers/ray_launch.py; docs/running.md (Ray) has the cluster step by step.
"""
import os
import sys

# `python launch/ray.py` puts launch/ first on sys.path, where this file would shadow the ray package.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from hvd_train.launchers.ray_launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
