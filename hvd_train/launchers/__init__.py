"""How a run is launched, Python side: horovodrun.py (hvd-horovodrun, what launch/*.sh start)
and ray_launch.py (launch/ray.py on a Ray cluster). A new launcher is a thin script in launch/
that ends in one of these or in mpirun; launch/common.sh holds the shared shell helpers."""

from pathlib import Path

# The repository's shell launchers (launch/*.sh), which the sweep and the bench start jobs with.
LAUNCH_DIR = Path(__file__).resolve().parents[2] / "launch"
