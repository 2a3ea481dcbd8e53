"""Keras 3 models written the way Keras's guides show them, as a user would hand them to
hvd_train.train(model_fn=...): a subclassed model, a functional one with two branches, and a
Keras application. tests/programs/many_runs.py builds them ("model": "subclassed", ...); the
tests load what a run saved with plain Keras (the subclassed class is registered, as Keras asks
of a class it must rebuild)."""
import keras


@keras.saving.register_keras_serializable(package="hvd_train_tests")
class Subclassed(keras.Model):
    """Dense -> BatchNormalization -> Dropout -> softmax, built only when first called."""

    def __init__(self, n_outputs, hidden=16, **kwargs):
        super().__init__(**kwargs)
        self.n_outputs, self.hidden = n_outputs, hidden
        self.dense = keras.layers.Dense(hidden, activation="relu")
        self.norm = keras.layers.BatchNormalization()
        self.drop = keras.layers.Dropout(0.1)
        self.head = keras.layers.Dense(n_outputs, activation="softmax")

    def call(self, x, training=None):
        return self.head(self.drop(self.norm(self.dense(x), training=training), training=training))

    def get_config(self):
        return {**super().get_config(), "n_outputs": self.n_outputs, "hidden": self.hidden}


def subclassed(n_features, n_classes):
    return Subclassed(n_classes)


def functional(n_features, n_classes):
    """Two branches over the same input, concatenated."""
    inputs = keras.Input(shape=(n_features,))
    wide = keras.layers.Dense(8, activation="relu", name="wide")(inputs)
    deep = keras.layers.Dense(16, activation="relu", name="deep_1")(inputs)
    deep = keras.layers.Dense(8, activation="relu", name="deep_2")(deep)
    merged = keras.layers.Concatenate(name="merge")([wide, deep])
    return keras.Model(inputs, keras.layers.Dense(n_classes, activation="softmax", name="classes")(merged),
                       name="two_branches")


def mobilenet(shape, n_classes):
    """Keras's MobileNetV2, untrained (weights=None: no download), small (alpha 0.35)."""
    return keras.applications.MobileNetV2(input_shape=tuple(shape), alpha=0.35, weights=None, classes=n_classes)


BUILDERS = {"subclassed": subclassed, "functional": functional, "mobilenet": mobilenet}
