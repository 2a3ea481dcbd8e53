"""Where data comes from and who trains on what.

interface.py: the data interface the training loop consumes (Dataset) and what both kinds
share; arrays.py: in-memory datasets (bundled, arrays, a CSV read whole), split and scaled;
sources.py: CSV and Parquet readers (a new input format goes here); stream.py: file datasets
read in per-rank shares and streamed; reader.py: a rank's training stream read in a process of
its own, batches in shared memory; sharding.py: which rank trains on which sample, and when;
pipeline.py: in-memory batches as a tf.data pipeline."""
