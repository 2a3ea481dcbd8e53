"""Sharding properties for world sizes 1-8 and awkward sample counts: disjoint, complete, equal steps,
no empty batch, and loss weights that make the ranks' average the global mean."""
import math

import numpy as np
import pytest

from hvd_train.data import sharding

COUNTS = [1, 2, 3, 7, 8, 9, 31, 33, 64, 65, 97, 100, 127, 1000, 1023]
BATCHES = [1, 2, 3, 16, 32]


def epoch_plan(n, world, batch, order):
    return [sharding.local_batches(n, r, world, batch, order) for r in range(world)]


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("n", COUNTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_shards_disjoint_complete_equal_steps(world, n, batch):
    if n < world:
        with pytest.raises(ValueError, match="cannot be shared"):
            sharding.global_steps(n, world, batch)
        return
    order = sharding.epoch_order(n, epoch=3, seed=7, shuffle=True)
    plan = epoch_plan(n, world, batch, order)
    steps = {len(p) for p in plan}
    assert steps == {sharding.steps_per_epoch(n, world, batch)}, "every rank runs the same number of steps"
    seen = np.concatenate([rows for p in plan for rows, _ in p])
    assert len(seen) == n and sorted(seen.tolist()) == list(range(n)), "disjoint and complete"
    for p in plan:
        assert all(len(rows) >= 1 for rows, _ in p), "no rank ever gets an empty batch"
    expected = math.ceil(n / (world * batch))
    assert steps.pop() in (expected, expected - 1)


@pytest.mark.parametrize("world,n,batch", [(2, 105, 32), (3, 100, 7), (4, 33, 8), (8, 1023, 16), (5, 11, 1)])
def test_loss_weights_make_rank_average_equal_global_mean(world, n, batch):
    rng = np.random.default_rng(0)
    per_sample = rng.normal(size=n)
    order = sharding.epoch_order(n, 0, 1, True)
    plan = epoch_plan(n, world, batch, order)
    for step in range(len(plan[0])):
        # Keras: a rank's loss is mean(weight * loss) over its batch; Horovod averages over ranks.
        rank_losses = [np.mean(w * per_sample[rows]) for rows, w in (p[step] for p in plan)]
        global_rows = np.concatenate([p[step][0] for p in plan])
        assert np.mean(rank_losses) == pytest.approx(np.mean(per_sample[global_rows]), rel=1e-12)


def test_uneven_last_step_is_weighted_not_averaged():
    plan = epoch_plan(5, 2, 4, np.arange(5))  # one step of 5 samples: slices of 3 and 2
    (rows0, w0), (rows1, w1) = plan[0][0], plan[1][0]
    assert (len(rows0), len(rows1)) == (3, 2)
    assert (w0, w1) == (pytest.approx(1.2), pytest.approx(0.8))


def test_full_steps_have_unit_weight_and_match_one_process_batches():
    n, world, batch = 100, 2, 16
    order = np.arange(n)
    plan = epoch_plan(n, world, batch, order)
    single = sharding.local_batches(n, 0, 1, world * batch, order)
    assert len(single) == len(plan[0])
    for step, (rows, _) in enumerate(single):
        union = np.concatenate([p[step][0] for p in plan])
        assert union.tolist() == rows.tolist(), "N ranks see exactly the samples one process sees"
        if len(rows) == world * batch:
            assert all(p[step][1] == 1.0 for p in plan)


def test_tiny_remainder_folds_into_previous_step():
    # 33 samples, 2 ranks, 16 each: a last global batch of 1 would leave rank 1 empty.
    bounds = sharding.global_steps(33, 2, 16)
    assert bounds == [(0, 33)]
    assert sharding.global_steps(34, 2, 16) == [(0, 32), (32, 34)]


def test_epoch_order_same_everywhere_and_changes_per_epoch():
    a = sharding.epoch_order(50, 1, 42, True)
    assert np.array_equal(a, sharding.epoch_order(50, 1, 42, True))
    assert not np.array_equal(a, sharding.epoch_order(50, 2, 42, True))
    assert np.array_equal(sharding.epoch_order(50, 9, 42, False), np.arange(50))


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 5, 30, 31])
def test_eval_shards_partition(world, n):
    parts = [sharding.eval_shard(n, r, world) for r in range(world)]
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("n", [9, 33, 100, 1023])
@pytest.mark.parametrize("old_world,new_world", [(3, 2), (2, 3), (1, 4), (4, 1), (2, 8)])
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_an_epoch_resumed_in_another_world_trains_every_sample_once(n, old_world, new_world, batch):
    """An elastic reset: the old world trained some steps, the new world the rest of the epoch."""
    order = sharding.epoch_order(n, epoch=2, seed=5, shuffle=True)
    steps = sharding.global_steps(n, old_world, batch)
    # A commit after each step, and none at all; over a thousand steps (n 1023, batch 1), every
    # step near either end and 20 spread between them (each point replans the whole epoch).
    points = range(len(steps) + 1)
    if len(steps) > 64:
        points = sorted({*range(4), *range(len(steps) - 3, len(steps) + 1), *range(0, len(steps), len(steps) // 20)})
    for done in points:
        position = steps[done - 1][1] if done else 0
        before = [rows for r in range(old_world)
                  for rows, _ in sharding.local_batches(n, r, old_world, batch, order)[:done]]
        after = [sharding.local_batches(n, r, new_world, batch, order, position) for r in range(new_world)]
        assert len({len(a) for a in after}) == 1, "equal steps in the new world"
        real = [rows for plan in after for rows, weight in plan if weight > 0]
        trained = np.concatenate([*before, *real]) if before or real else np.array([], int)
        assert sorted(trained.tolist()) == list(range(n)), "every sample exactly once over the two worlds"
        for step in zip(*after):  # the ranks' weights still average to the global mean
            assert sum(weight for _, weight in step) == pytest.approx(new_world)
        cursors = [sharding.Cursor(n, r, new_world, batch, position) for r in range(new_world)]
        assert sum(c.samples(c.steps) for c in cursors) == n - position, "a pad counts no sample"
        assert all(c.position(c.steps) == n for c in cursors if c.steps)


def test_a_tail_smaller_than_the_new_world_pads_with_zero_weight():
    order = np.arange(10)
    after = [sharding.local_batches(10, r, 4, 2, order, position=8) for r in range(4)]
    assert [len(plan) for plan in after] == [1, 1, 1, 1]
    assert [(rows.tolist(), weight) for (rows, weight), in after] == [([8], 2.0), ([9], 2.0), ([8], 0.0), ([8], 0.0)]
    assert [sharding.Cursor(10, r, 4, 2, 8).samples(1) for r in range(4)] == [1, 1, 0, 0]
    assert sharding.local_batches(10, 0, 4, 2, order, position=10) == []
