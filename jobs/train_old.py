"""Ray job: `raycompat train-old`. Usage: ray job submit --working-dir . -- python jobs/train_old.py --config CONFIG"""

from _entry import run

run("train-old")
