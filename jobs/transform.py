"""Ray job: `raycompat transform`. Usage: ray job submit --working-dir . -- python jobs/transform.py --config CONFIG"""

from _entry import run

run("transform")
