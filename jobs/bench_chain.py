"""Ray job: the chain benchmark (`raycompat bench chain`). Usage: ray job submit --working-dir . -- python jobs/bench_chain.py --config CONFIG --out-dir DIR [--name N]"""

from _entry import run

run("bench", "chain")
