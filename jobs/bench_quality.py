"""Ray job: `raycompat bench quality`. Usage: ray job submit --working-dir . -- python jobs/bench_quality.py --config C --out-dir D"""

from _entry import run

run("bench", "quality")
