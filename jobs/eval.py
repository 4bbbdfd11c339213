"""Ray job: `raycompat eval`. Usage: ray job submit --working-dir . -- python jobs/eval.py --config CONFIG"""

from _entry import run

run("eval")
