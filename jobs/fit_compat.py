"""Ray job: `raycompat fit-compat`. Usage: ray job submit --working-dir . -- python jobs/fit_compat.py --config CONFIG"""

from _entry import run

run("fit-compat")
