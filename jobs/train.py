"""Ray job: `raycompat train`. Usage: ray job submit --working-dir . -- python jobs/train.py --config CONFIG"""

from _entry import run

run("train")
