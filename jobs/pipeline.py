"""Ray job: the whole pipeline (`raycompat demo`). Usage: ray job submit --working-dir . -- python jobs/pipeline.py [--config CONFIG]"""

from _entry import run

run("demo")
