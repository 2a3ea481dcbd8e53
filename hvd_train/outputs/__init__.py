"""What a run writes and how it is read back: run_dir.py (the run directory, written once by
rank 0), events.py (the event log), plots.py, files.py (atomic writes), predict.py
(predictions from a finished run)."""
