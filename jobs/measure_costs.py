"""Ray job: `raycompat measure-costs`. Usage: ray job submit --working-dir . -- python jobs/measure_costs.py --config CONFIG --write costs.yaml"""

from _entry import run

run("measure-costs")
