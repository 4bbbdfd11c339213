"""Ray job: `raycompat extract`. Usage: ray job submit --working-dir . -- python jobs/extract.py --config CONFIG"""

from _entry import run

run("extract")
