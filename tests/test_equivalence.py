"""N processes with batch b compute what 1 process computes with batch N*b: the core promise.

Shard layout (sharding.py): each step's global batch is the next N*b samples of the epoch
order, cut into N contiguous slices. Without shuffling the epoch order is 0..n-1 for every
world size, so 1 process with batch N*b takes exactly the same samples in every step as the N
processes together. Horovod averages the N slice-mean gradients; with the uneven-slice loss
weights that is the global-batch mean gradient, so the updates are equal up to float rounding.
iris here: 105 training samples, global batch 16 -> 7 steps per epoch, the last one 9 samples
(uneven: 5/4 on 2 ranks, 3/2/2/2 on 4), and 9 >= N, so no step is folded on any world size.

Batch normalization breaks the promise unless its training statistics are the global batch's:
with --sync-batchnorm (layers.SyncBatchNormalization, weighted by slice size) it holds again,
moving statistics included; with local batch norm it does not (the negative control).
"""
import keras
import numpy as np
import pytest
from conftest import Jobs, check_run, max_weight_difference, read_json, saved_weights

pytestmark = pytest.mark.integration

GLOBAL_BATCH = 16
EPOCHS = 5
COMMON = ["--no-shuffle", "--lr-scaling", "none", "--warmup-epochs", "0", "--seed", "7",
          "--epochs", str(EPOCHS), "--progress", "none"]
# Float32 rounding differs between one mean over 16 samples and the average of N slice means.
# SGD carries that difference linearly; Adam divides by sqrt(v), which amplifies it where a
# gradient is near zero, so its bound is looser (measured max differences are in docs/design.md).
TOLERANCE = {"sgd": 1e-5, "adam": 1e-4}
LR = {"sgd": "0.05", "adam": "0.01"}
BN = ("--batch-norm", "--sync-batchnorm")
# The same promise under a mixed precision policy (to the 16-bit format's rounding: each rank rounds
# its own gradients before the float32 average; the bounds docs/design.md states, measured there)
# and with local gradient accumulation (1 process accumulates as many passes).
VARIANTS = {"adam_bf16": ("adam", ("--precision", "mixed_bfloat16")),
            "sgd_fp16": ("sgd", ("--precision", "mixed_float16")),
            "sgd_passes_2": ("sgd", ("--backward-passes-per-step", "2"))}
VARIANT_TOLERANCE = {"adam_bf16": 5e-2, "sgd_fp16": 2e-3, "sgd_passes_2": TOLERANCE["sgd"]}


def options(optimizer, world_size, *extra, batch=None):
    return [*COMMON, "--optimizer", optimizer, "--lr", LR[optimizer], *extra,
            "--batch-size", str(batch or GLOBAL_BATCH // world_size)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of this module: one job per world size (tests/programs/many_runs.py)."""
    base = tmp_path_factory.mktemp("equivalence")
    jobs = {
        1: {"sgd": options("sgd", 1), "adam": options("adam", 1), "sgd_sync_bn": options("sgd", 1, *BN),
            **{name: options(optimizer, 1, *extra) for name, (optimizer, extra) in VARIANTS.items()}},
        2: {"sgd": options("sgd", 2), "adam": options("adam", 2), "sgd_sync_bn": options("sgd", 2, *BN),
            **{name: options(optimizer, 2, *extra) for name, (optimizer, extra) in VARIANTS.items()},
            # 7 steps an epoch, 7 per call of the compiled step: one call per epoch.
            "sgd_7_per_execution": options("sgd", 2, "--steps-per-execution", "7"),
            "sgd_local_bn": options("sgd", 2, "--batch-norm"),
            # Another global batch (2 x 16): must end elsewhere.
            "sgd_batch_16": options("sgd", 2, batch=16),
            # Each rank builds its model from a different seed on purpose.
            "different_init": {"args": ["--epochs", "1"], "model": "mlp", "different_init": True}},
        4: {"sgd": options("sgd", 4), "adam": options("adam", 4)},
    }
    return Jobs(base, jobs)



@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_n_processes_equal_one_process_with_n_times_the_batch(runs, optimizer, world_size):
    one, many = runs.finished(1, optimizer).out, runs.finished(world_size, optimizer).out
    m1, mn = read_json(one / "metrics.json"), read_json(many / "metrics.json")
    assert m1["global_batch_size"] == mn["global_batch_size"] == GLOBAL_BATCH
    assert m1["steps_per_epoch"] == mn["steps_per_epoch"] == 7  # K = 35 steps in all
    assert (m1["world_size"], mn["world_size"]) == (1, world_size)
    assert mn["replicas_identical"] is True
    w1, wn = saved_weights(one), saved_weights(many)
    assert [w.shape for w in w1] == [w.shape for w in wn]
    max_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(w1, wn))
    moved = max(float(np.max(np.abs(a))) for a in w1)
    print(f"{optimizer} np={world_size} vs np=1: max |w_N - w_1| = {max_diff:.2e}")
    assert moved > 0.1, "the weights must have trained for the comparison to mean anything"
    assert max_diff <= TOLERANCE[optimizer]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_mixed_precision_and_accumulated_passes_keep_n_processes_equal_to_one(runs, name):
    one, two = runs.finished(1, name), runs.finished(2, name)
    diff = max_weight_difference(one.out, two.out)
    print(f"{name} np=2 vs np=1: max |w_N - w_1| = {diff:.2e}")
    assert diff <= VARIANT_TOLERANCE[name]
    # Exact float32 test metrics from the saved float32 model, replicas identical, on both.
    m1, m2 = check_run(one.out, one, 1), check_run(two.out, two, 2)
    assert m1["precision"] == m2["precision"] == {"adam_bf16": "mixed_bfloat16", "sgd_fp16": "mixed_float16"}.get(
        name, "float32")
    if name == "sgd_passes_2":  # one update per 2 passes of 16 samples: a global batch of 32
        assert max_weight_difference(one.out, runs.finished(1, "sgd").out) > 100 * TOLERANCE["sgd"]


def test_several_steps_per_execution_train_bit_for_bit_as_one(runs):
    many = runs.finished(2, "sgd_7_per_execution")
    assert read_json(many.out / "config.json")["plan"]["steps_per_execution"] == 7
    assert max_weight_difference(runs.finished(2, "sgd").out, many.out) == 0.0


def test_a_different_global_batch_does_not_match(runs):
    """The comparison can fail: 2 processes with batch 16 (global 32) end elsewhere."""
    w1, w2 = saved_weights(runs.finished(1, "sgd").out), saved_weights(runs.finished(2, "sgd_batch_16").out)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(w1, w2)) > 100 * TOLERANCE["sgd"]


def test_rank0_weights_and_optimizer_state_reach_every_rank(runs):
    run = runs[2]["different_init"]
    assert run.ok, run
    r0, r1 = run.reports
    assert r0["built"] != r1["built"], "the ranks really started from different weights"
    # Before the first step every rank holds rank 0's initial weights and optimizer state ...
    assert r0["train_begin"] == r1["train_begin"] == r0["built"]
    assert r0["train_begin_optimizer"] == r1["train_begin_optimizer"]
    # ... and after it, the same updated weights and Adam slots.
    assert r0["after_first_step"] == r1["after_first_step"] != r0["built"]
    assert r0["after_first_step_optimizer"] == r1["after_first_step_optimizer"]
    assert r0["optimizer_iterations"] == r1["optimizer_iterations"] == 1
    assert r0["final"] == r1["final"]



def test_with_sync_batchnorm_n_processes_equal_one_process_with_n_times_the_batch(runs):
    one, two = runs.finished(1, "sgd_sync_bn").out, runs.finished(2, "sgd_sync_bn").out
    names = [w.path for w in keras.models.load_model(one / "model.keras").weights]
    assert "batchnorm_0/moving_variance" in names, "every weight compared, moving statistics too"
    diff = max_weight_difference(one, two)
    print(f"sync batch norm, sgd np=2 vs np=1: max |w_N - w_1| = {diff:.2e}")
    assert read_json(two / "metrics.json")["replicas_identical"] is True
    assert diff <= TOLERANCE["sgd"]
    # Negative control: batch norm over each process's slice trains another model.
    assert max_weight_difference(one, runs.finished(2, "sgd_local_bn").out) > 100 * TOLERANCE["sgd"]
