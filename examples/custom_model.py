"""The Python API with your own data and Keras 3 model. Run: horovodrun -np 2 python examples/custom_model.py OUT_DIR"""
import sys

import keras
import numpy as np

from hvd_train import TrainConfig, train


def my_model(n_features: int, n_classes: int) -> keras.Model:
    # Any uncompiled Keras 3 model mapping features to class probabilities (Sequential,
    # functional, subclassed or one of keras.applications).
    return keras.Sequential([
        keras.Input(shape=(n_features,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(n_classes, activation="softmax"),
    ])


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 6)).astype("float32")
    y = np.where(x[:, 0] + x[:, 1] > 0, "positive", "negative")  # string labels are fine
    config = TrainConfig(epochs=15, batch_size=16, lr=0.01, output_dir=sys.argv[1], progress="none")
    result = train(config, data=(x, y), model_fn=my_model)  # every rank calls train
    # Every rank gets the same result: metrics are global, weights identical.
    print(f"test accuracy {result.metrics['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
