"""Data loading (bundled, synthetic, CSV and every CSV error, arrays), the seeded stratified split and
training-only scaling."""
import numpy as np
import pytest

from hvd_train import data
from hvd_train.data import DataError


@pytest.mark.parametrize("name,n,features,classes", [
    ("iris", 150, 4, 3), ("wine", 178, 13, 3), ("breast_cancer", 569, 30, 2), ("digits", 1797, 64, 10),
])
def test_bundled(name, n, features, classes):
    t = data.load(name)
    assert t.x.shape == (n, features) and t.x.dtype == np.float32
    assert len(t.class_names) == classes and set(np.unique(t.y)) == set(range(classes))


def test_synthetic_shape_and_determinism():
    a = data.load("synthetic", samples=300, features=12, classes=5, seed=1)
    assert a.x.shape == (300, 12) and len(a.class_names) == 5
    assert np.array_equal(a.x, data.load("synthetic", samples=300, features=12, classes=5, seed=1).x)


def test_split_is_stratified_seeded_and_scaled_on_train_only():
    t = data.load("iris")
    s = data.split_and_scale(t, 0.1, 0.2, seed=0)
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (105, 15, 30)
    assert np.bincount(s.y_test).tolist() == [10, 10, 10]
    np.testing.assert_allclose(s.x_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(s.x_train.std(axis=0), 1, atol=1e-4)
    assert np.abs(s.x_test.mean(axis=0)).max() > 1e-3, "test data must not be used to fit the scaler"
    again = data.split_and_scale(t, 0.1, 0.2, seed=0)
    assert np.array_equal(s.x_test, again.x_test)
    other = data.split_and_scale(t, 0.1, 0.2, seed=1)
    assert not np.array_equal(s.x_test, other.x_test)


def test_class_too_small_for_split():
    x = np.random.default_rng(0).normal(size=(40, 3))
    y = np.array([0] * 20 + [1] * 18 + [2] * 2)
    with pytest.raises(DataError, match="class '2' has 2 sample"):
        data.split_and_scale(data.from_arrays(x, y), 0.1, 0.2, 0)
    data.split_and_scale(data.from_arrays(x, y), 0.0, 0.2, 0)  # train/test alone needs only 2


def test_from_arrays_rejects_bad_arrays():
    with pytest.raises(DataError, match="NaN or inf"):
        data.from_arrays(np.array([[1.0, np.nan]]), [0])
    with pytest.raises(DataError, match="2-D"):
        data.from_arrays(np.zeros(3), [0, 1, 2])
    with pytest.raises(DataError, match="one label per row"):
        data.from_arrays(np.zeros((3, 2)), [0, 1])
    with pytest.raises(DataError, match="numeric"):
        data.from_arrays(np.array([["a", "b"]]), [0])


