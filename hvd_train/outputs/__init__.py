"""What a run writes and how it is read back: run_dir.py (the run directory, written once by
rank 0), events.py (the event log), plots.py, predict.py (predictions from a finished
run); every file through ../storage.py (local or s3://, written whole)."""
