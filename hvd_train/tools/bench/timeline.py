"""Per-step breakdown of a training run from its Horovod timeline (rank 0, the coordinator, writes it).

For every gradient allreduce the timeline holds a NEGOTIATE phase, from rank 0 submitting the
tensor to every rank having submitted it (Horovod's response cache leaves out the per-rank marks
after the first step), then the ALLREDUCE itself. A step is one round of every gradient tensor.
Per step, seen from rank 0:

- ``wait_ms``: from rank 0's last gradient to the last gradient being ready on every rank: rank 0
  idle because another rank is behind, plus the negotiation round that notices it;
- ``allreduce_ms``: from then to the end of the step's last allreduce: the communication nothing
  overlaps (what earlier allreduces cost is hidden under the rest of the backward pass);
- ``allreduce_total_ms``: the sum of the step's allreduce phases, overlapped or not.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

# DistributedOptimizer's gradient ops: .../DistributedAdam_Allreduce/grad_<i> (distributed.py; hvd_train
# 0.1's, Horovod's own: .../DistributedAdam_Allreduce/cond/HorovodAllreduce_grads_<i>).
GRADIENT_MARK = "Allreduce"


def load(path: str) -> List[Dict[str, Any]]:
    """The timeline's events; a file cut short while training (no closing bracket) is read too."""
    text = Path(path).read_text().strip().rstrip(",")
    if not text.endswith("]"):
        text += "]"
    return json.loads(text)


def _tensors(events: List[Dict[str, Any]]) -> Dict[int, str]:
    return {e["pid"]: e["args"].get("name", "") for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name" and e.get("args")}


def rounds(events: List[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """Per gradient tensor, every allreduce in order: rank 0's submission, all ranks' (the end of
    negotiation), the allreduce's start and end (us)."""
    names = _tensors(events)
    open_phase: Dict[int, List[tuple]] = defaultdict(list)
    current: Dict[int, Dict[str, Any]] = {}
    out: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for e in sorted((e for e in events if e.get("ph") in ("B", "E", "X")), key=lambda e: e["ts"]):
        name = names.get(e["pid"], "")
        if GRADIENT_MARK not in name or "grad" not in name:
            continue
        pid, ph = e["pid"], e["ph"]
        if ph == "B":
            open_phase[pid].append((e["name"], e["ts"]))
            if e["name"].startswith("NEGOTIATE"):
                current[pid] = {"submitted": e["ts"], "ready": None, "start": None, "end": None}
        elif ph == "E" and open_phase[pid]:
            phase, began = open_phase[pid].pop()
            if phase.startswith("NEGOTIATE") and pid in current:
                current[pid]["ready"] = e["ts"]
            elif phase == "ALLREDUCE" and pid in current:
                current[pid].update(start=began, end=e["ts"])
                out[name].append(current.pop(pid))
    return out


def breakdown(path: str, skip: int = 0) -> Optional[Dict[str, float]]:
    """Median per-step wait and exposed/total allreduce (ms) over the steps after the first ``skip``."""
    per_tensor = rounds(load(path))
    if not per_tensor:
        return None
    steps = min(len(r) for r in per_tensor.values())
    waits, exposed, totals = [], [], []
    for k in range(skip, steps):
        step = [r[k] for r in per_tensor.values()]
        if any(s["ready"] is None for s in step):
            continue
        mine, everyone = max(s["submitted"] for s in step), max(s["ready"] for s in step)
        end = max(s["end"] for s in step)
        waits.append(max(0.0, everyone - mine) / 1e3)
        exposed.append(max(0.0, end - everyone) / 1e3)
        totals.append(sum(s["end"] - s["start"] for s in step) / 1e3)
    if not waits:
        return None
    return {"steps": len(waits), "tensors": len(per_tensor), "wait_ms": statistics.median(waits),
            "allreduce_ms": statistics.median(exposed), "allreduce_total_ms": statistics.median(totals)}
