"""Checkpoint files on their own: atomic writes, retention, and detection of damaged files."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from hvd_train.training import checkpoint
from hvd_train.training.checkpoint import CheckpointError

DATA = Path(__file__).parent / "data" / "keras2"


def arrays(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]


def save(directory, epoch, keep=3):
    state = checkpoint.State(model=arrays(epoch), optimizer=[np.int64(epoch * 7)] + arrays(100 + epoch),
                             seeds=[np.array([42, epoch], np.int64)])
    return checkpoint.save(str(directory), epoch, state, {"history": {"loss": [1.0] * epoch}, "config": {}}, keep)


def test_round_trip(tmp_path):
    path = save(tmp_path, 3)
    assert os.path.basename(path) == "ckpt-epoch-000003.npz"
    ckpt = checkpoint.load(path)
    assert ckpt.epoch == 3 and ckpt.meta["history"] == {"loss": [1.0, 1.0, 1.0]}
    for got, want in zip(ckpt.state.model, arrays(3)):
        np.testing.assert_array_equal(got, want)
    assert int(ckpt.state.optimizer[0]) == 21 and len(ckpt.state.optimizer) == 3
    assert [s.tolist() for s in ckpt.state.seeds] == [[42, 3]]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-epoch-000003.npz"], "no temp file left"


def test_keeps_only_the_newest(tmp_path):
    for epoch in range(1, 8):
        save(tmp_path, epoch, keep=2)
    assert [e for e, _ in checkpoint.listed(str(tmp_path))] == [7, 6]


def test_listing_ignores_temp_and_foreign_files(tmp_path):
    save(tmp_path, 2)
    (tmp_path / "ckpt-epoch-000009.npz.tmp").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("x")
    assert [e for e, _ in checkpoint.listed(str(tmp_path))] == [2]
    assert checkpoint.listed(str(tmp_path / "missing")) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "text"])
def test_damaged_files_are_detected(tmp_path, damage):
    path = save(tmp_path, 1)
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 3] ^= 0x01
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"not a checkpoint")
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(path)


def test_a_valid_zip_with_changed_content_fails_the_digest(tmp_path):
    path = save(tmp_path, 1)
    with np.load(path) as z:
        content = {k: z[k] for k in z.files}
    content["model_0000"] = content["model_0000"] + 1  # rewritten consistently: zip CRCs are fine
    with open(path, "wb") as f:
        np.savez(f, **content)
    with pytest.raises(CheckpointError, match=r"corrupt \(content does not match its SHA-256\)"):
        checkpoint.load(path)


def test_newest_valid_skips_damaged_ones_with_a_note(tmp_path):
    for epoch in (1, 2, 3):
        save(tmp_path, epoch)
    (tmp_path / "ckpt-epoch-000003.npz").write_bytes(b"")
    ckpt, skipped = checkpoint.newest_valid(str(tmp_path))
    assert ckpt.epoch == 2
    assert len(skipped) == 1 and "ckpt-epoch-000003.npz" in skipped[0]
    assert checkpoint.newest_valid(str(tmp_path / "empty")) == (None, [])


def test_a_format_1_checkpoint_of_hvd_train_0_1_gets_keras_3s_optimizer_layout():
    # Made by the Keras 2 engine (tests/data/keras2): tf_keras's legacy Adam holds iterations, then
    # every variable's first moment, then every second moment; Keras 3's Adam iterations, the
    # learning rate, then each variable's two moments together.
    path = DATA / "iris" / "checkpoints" / "ckpt-epoch-000002.npz"
    with np.load(path) as z:
        old = [z[k] for k in sorted(z.files) if k.startswith("optimizer_")]
        meta = json.loads(z["meta"].tobytes())
    ckpt = checkpoint.load(str(path))
    assert meta["format"] == 1 and ckpt.meta["format"] == 1 and ckpt.epoch == 2 and ckpt.state.seeds == []
    n = (len(old) - 1) // 2
    new = ckpt.state.optimizer
    assert len(new) == 2 + 2 * n and int(new[0]) == int(old[0]) == 8  # 2 epochs x 4 steps
    assert float(new[1]) == pytest.approx(meta["lr"])
    for i in range(n):
        np.testing.assert_array_equal(new[2 + 2 * i], old[1 + i])
        np.testing.assert_array_equal(new[3 + 2 * i], old[1 + n + i])
    wine = DATA / "wine" / "checkpoints" / "ckpt-epoch-000002.npz"  # SGD with momentum: one slot per variable
    with np.load(wine) as z:
        old = [z[k] for k in sorted(z.files) if k.startswith("optimizer_")]
    sgd = checkpoint.load(str(wine))
    assert sgd.meta["config"]["optimizer"] == "sgd" and len(old) == 9  # iterations + 8 trainable variables
    assert [a.shape for a in sgd.state.optimizer[2:]] == [a.shape for a in old[1:]] and len(sgd.state.optimizer) == 10


def test_other_npz_files_and_formats_are_refused(tmp_path):
    path = tmp_path / "ckpt-epoch-000001.npz"
    with open(path, "wb") as f:
        np.savez(f, a=np.zeros(2))
    with pytest.raises(CheckpointError, match="not an hvd_train checkpoint"):
        checkpoint.load(str(path))
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(str(tmp_path / "nope.npz"))


def test_meta_is_plain_json(tmp_path):
    with np.load(save(tmp_path, 4)) as z:
        meta = json.loads(z["meta"].tobytes())
    assert meta["epoch"] == 4 and meta["format"] == checkpoint.FORMAT


def test_check_writable(tmp_path):
    checkpoint.check_writable(str(tmp_path / "new" / "dir"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="not writable"):
        checkpoint.check_writable(str(blocker / "sub"))
