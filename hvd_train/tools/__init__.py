"""Tools built on the library: bench/ (hvd-bench, the benchmark) and sweep/ (hvd-sweep,
hyperparameter sweeps of whole runs)."""
