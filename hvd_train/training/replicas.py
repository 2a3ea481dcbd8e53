"""The end-of-run proof that every rank holds the same model.

Trainable variables stay identical by construction: every rank starts from rank 0's (broadcast)
and applies the same allreduced gradients. Non-trainable weights are updated by the layers
themselves from each rank's own batches; distributed.sync_state brings them back together before
every evaluation, every checkpoint and the final save. ``check`` then proves it: every rank hashes
every weight (trainable or not), the digests are gathered, and a difference names the first
variable that differs. Dropout's random state is each rank's own on purpose (distributed.py) and is
not a weight.
"""
from __future__ import annotations

import hashlib
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .. import runtime


def digests(model) -> Tuple[str, List[str]]:
    """SHA-256 of the whole model (consensus.weights_digest of ``model.get_weights()``) and of
    each variable (``model.weights`` order, trainable or not), from one pass over the bytes."""
    whole, each = hashlib.sha256(), []
    for array in model.get_weights():
        data = np.ascontiguousarray(array).tobytes()
        whole.update(data)
        each.append(hashlib.sha256(data).hexdigest())
    return whole.hexdigest(), each


def first_difference(names: Sequence[str], per_rank: Sequence[Sequence[str]]) -> Optional[str]:
    """None if every rank's variable digests match rank 0's, else a message naming the first
    variable (in the model's order) that differs, and the ranks that hold another value."""
    if len({len(d) for d in per_rank}) > 1:
        return (f"replicas differ: the ranks hold different numbers of variables "
                f"({', '.join(f'rank {r}: {len(d)}' for r, d in enumerate(per_rank))})")
    for i, name in enumerate(names):
        ranks = [r for r, d in enumerate(per_rank) if d[i] != per_rank[0][i]]
        if ranks:
            return (f"replicas differ after training, first in variable {name} ({i + 1} of {len(names)}): "
                    f"rank(s) {', '.join(map(str, ranks))} hold another value than rank 0. Something changed "
                    f"it outside the allreduced gradients and the state sync; no model written")
    return None


def check(model) -> Tuple[List[str], Optional[str]]:
    """Collective: every rank's whole-model digest (rank order), and the difference, if any."""
    # Horovod: one allgather of every rank's digests; each rank compares the same list.
    gathered = runtime.allgather(digests(model), "replicas")
    problem = first_difference([v.path for v in model.weights], [each for _, each in gathered])
    return [whole for whole, _ in gathered], problem
