"""How a run trains: trainer.py (train(), dry_run()) and elastic.py (the elastic run) around
session.py (set-up checks, agreement and consensus, the model, the final metrics and outputs)
and loop.py (the epoch loop, the one model.fit). Per-epoch work is Keras callbacks
(callbacks.py, in order; a new callback goes there), with stopping.py, checkpoint.py,
schedules.py and pruning.py; metrics.py (exact global figures), replicas.py and consensus.py
(identical replicas, agreeing ranks); model.py, layers.py and tasks.py (the model, its
layers, classification and regression)."""
