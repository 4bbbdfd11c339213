"""Ray job: a chain of upgrades (`raycompat chain`). Usage: ray job submit --working-dir . -- python jobs/chain.py --config CONFIG [--out DIR]"""

from _entry import run

run("chain")
