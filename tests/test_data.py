"""Data loading (bundled, synthetic, CSV and every CSV error, arrays), the seeded stratified split and
training-only scaling."""
import numpy as np
import pytest

from hvd_train.data import arrays as data
from hvd_train.data.interface import DataError


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
    with pytest.raises(DataError, match=r"an array \[samples, features\]"):
        data.from_arrays(np.zeros(3), [0, 1, 2])
    with pytest.raises(DataError, match="one label per sample"):
        data.from_arrays(np.zeros((3, 2)), [0, 1])
    with pytest.raises(DataError, match="numeric"):
        data.from_arrays(np.array([["a", "b"]]), [0])




def test_regression_tables_split_and_standardise_the_target():
    table = data.load("diabetes", task="regression")
    assert table.regression and table.x.shape == (442, 10) and table.target_name == "disease_progression"
    splits = data.split_and_scale(table, 0.1, 0.2, 42)
    assert splits.n_outputs == 1 and splits.n_classes == 0
    assert abs(float(np.mean(splits.y_train))) < 1e-6 and float(np.std(splits.y_train)) == pytest.approx(1, rel=1e-5)
    back = splits.target.inverse(np.concatenate([splits.y_train, splits.y_val, splits.y_test]))
    assert sorted(back) == pytest.approx(sorted(table.y), rel=1e-5)
    with pytest.raises(DataError, match="add --task regression"):
        data.load("diabetes")
    synthetic = data.load("synthetic", task="regression", samples=50, features=4)
    assert synthetic.y.dtype == np.float64 and synthetic.regression


def test_a_regression_target_must_be_numeric():
    with pytest.raises(DataError, match="regression needs a numeric target, and target holds values such as 'b'"):
        data.from_arrays(np.zeros((3, 2)), ["1.5", "b", "2"], task="regression")
    assert data.from_arrays(np.zeros((2, 2)), ["1.5", "2"], task="regression").y.tolist() == [1.5, 2.0]


def test_images_are_standardised_per_channel():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4, 4, 2)) * np.array([1.0, 10.0]) + np.array([5.0, -3.0])
    y = np.arange(60) % 3
    splits = data.split_and_scale(data.from_arrays(x, y), 0.1, 0.2, 0)
    assert splits.input_shape == (4, 4, 2) and splits.n_features == 32 and splits.model_inputs == (4, 4, 2)
    assert splits.scaler.mean.shape == (2,)
    assert np.abs(splits.x_train.mean(axis=(0, 1, 2))).max() < 1e-5
    assert splits.x_train.std(axis=(0, 1, 2)) == pytest.approx([1, 1], rel=1e-4)
    raw = data.split_and_scale(data.from_arrays(x, y), 0.1, 0.2, 0, scale="none")
    assert raw.x_train.mean() == pytest.approx(x.mean(), abs=1.0)  # untouched
    digits = data.load("digits", images=True)
    assert digits.x.shape == (1797, 8, 8, 1) and len(digits.feature_names) == 64
    assert data.load("iris", images=True).x.shape == (150, 4), "a table stays a table"
