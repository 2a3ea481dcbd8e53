"""Checkpoint files on their own: atomic writes, retention, and detection of damaged files."""
import json
import os

import numpy as np
import pytest

from hvd_train.training import checkpoint
from hvd_train.training.checkpoint import CheckpointError


def arrays(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]


def save(directory, epoch, keep=3):
    return checkpoint.save(str(directory), epoch, arrays(epoch), [np.int64(epoch * 7)] + arrays(100 + epoch),
                           {"history": {"loss": [1.0] * epoch}, "config": {}}, keep)


def test_round_trip(tmp_path):
    path = save(tmp_path, 3)
    assert os.path.basename(path) == "ckpt-epoch-000003.npz"
    ckpt = checkpoint.load(path)
    assert ckpt.epoch == 3 and ckpt.meta["history"] == {"loss": [1.0, 1.0, 1.0]}
    for got, want in zip(ckpt.model_weights, arrays(3)):
        np.testing.assert_array_equal(got, want)
    assert int(ckpt.optimizer_weights[0]) == 21 and len(ckpt.optimizer_weights) == 3
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
