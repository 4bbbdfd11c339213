"""Ray job: `raycompat train-side-info`. Usage: ray job submit --working-dir . -- python jobs/train_side_info.py --config CONFIG"""

from _entry import run

run("train-side-info")
