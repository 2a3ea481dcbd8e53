"""The version of hvd_train (setup.cfg reads it here; run records carry it)."""
__version__ = "0.2.0"
