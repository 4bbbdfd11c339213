"""Ray job: `raycompat train-fct`. Usage: ray job submit --working-dir . -- python jobs/train_fct.py --config CONFIG"""

from _entry import run

run("train-fct")
