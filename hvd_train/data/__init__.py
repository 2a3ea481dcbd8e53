"""Where data comes from and who trains on what.

interface.py: the data interface the training loop consumes (Dataset) and what every kind
shares; arrays.py: in-memory datasets (bundled, arrays, a CSV read whole), split and scaled;
formats.py: the file formats by prefix, each a module of its own: sources.py (CSV and Parquet),
images.py (image folders), tfrecord.py (tf.train.Example records); stream.py: file datasets read
in per-rank shares (the facts pass) and streamed; splitting.py: a sample's split and the
moments; windows.py: who trains which row of a shuffle window; reader.py: a rank's training
stream read in a process of its own, batches in shared memory; feed.py: those batches to
TensorFlow; sharding.py: which rank trains on which sample, and when; pipeline.py: in-memory
batches as a tf.data pipeline."""
