"""hvd-bench: measure hvd_train's scaling, overhead, its peer, the wire and the knobs (see driver)."""
