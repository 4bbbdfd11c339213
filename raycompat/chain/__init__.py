"""A chain of upgrades: its config, the evaluation of its generations' stored features, and its report.

Core code (no Ray): :mod:`raycompat.pipeline.chain` trains and extracts the
generations with Ray and calls these.
"""
