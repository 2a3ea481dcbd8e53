"""The rank-consensus comparison on its own (the collective itself is tested under horovodrun)."""
import numpy as np

from hvd_train.config.options import TrainConfig
from hvd_train.data.arrays import from_arrays, split_and_scale
from hvd_train.training import consensus


def fp(**changes):
    base = {"config.epochs": 10, "data.train": "[8, 2] sha256 aaaa", "version.tensorflow": "2.15.1"}
    return {**base, **changes}


def test_identical_ranks_agree():
    assert consensus.differences([fp(), fp(), fp()]) is None


def test_message_names_each_differing_rank_and_key():
    msg = consensus.differences([fp(), fp(), fp(**{"version.tensorflow": "2.16.1"}),
                                 fp(**{"config.epochs": 11, "data.train": "[8, 2] sha256 bbbb"})])
    assert msg == ("ranks disagree, stopping before training: "
                   "rank 2 differs from rank 0 in version.tensorflow: 2.16.1 (rank 0: 2.15.1) | "
                   "rank 3 differs from rank 0 in config.epochs: 11 (rank 0: 10); "
                   "data.train: [8, 2] sha256 bbbb (rank 0: [8, 2] sha256 aaaa)")


def test_a_missing_key_counts_as_a_difference():
    other = fp()
    del other["version.tensorflow"]
    assert "version.tensorflow: missing (rank 0: 2.15.1)" in consensus.differences([fp(), other])


def test_data_fingerprint_sees_one_changed_value():
    x = np.arange(60, dtype=np.float64).reshape(30, 2)
    y = np.array([0, 1, 2] * 10)
    a = split_and_scale(from_arrays(x, y), 0.1, 0.2, 42).fingerprint()
    x2 = x.copy()
    x2[3, 1] += 0.5
    b = split_and_scale(from_arrays(x2, y), 0.1, 0.2, 42).fingerprint()
    assert a != b and a["data.class_names"] == b["data.class_names"]
    assert a == split_and_scale(from_arrays(x, y), 0.1, 0.2, 42).fingerprint()


def test_output_dir_is_not_fingerprinted():
    # Rank 0 chooses the output directory and broadcasts it; other ranks may have said anything.
    class Plan:
        steps_per_epoch, train_samples_per_rank = 1, [1]
    splits = split_and_scale(from_arrays(np.arange(40.0).reshape(20, 2), np.array([0, 1] * 10)), 0.1, 0.2, 1)
    a = consensus.fingerprint(TrainConfig(output_dir="a"), splits, Plan, {"tensorflow": "x"})
    b = consensus.fingerprint(TrainConfig(output_dir="b"), splits, Plan, {"tensorflow": "x"})
    assert a == b and "config.epochs" in a
