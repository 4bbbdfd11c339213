"""Ray job: `raycompat backfill-report`. Usage: ray job submit --working-dir . -- python jobs/backfill_report.py --config CONFIG"""

from _entry import run

run("backfill-report")
