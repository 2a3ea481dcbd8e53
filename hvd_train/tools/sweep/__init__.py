"""hvd-train sweep: hyperparameter search where every trial is a distributed run.

spec.py (the sweep file, the trials), runner.py (one launcher per trial, resume, stops),
results.py (tables, best config, plots); the trial side of pruning is pruning.py and
callbacks.Pruner.
"""
