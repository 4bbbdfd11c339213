"""Ray job: `raycompat tune`. Usage: ray job submit --working-dir . -- python jobs/tune.py --config CONFIG"""

from _entry import run

run("tune")
