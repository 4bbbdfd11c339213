"""The Ray layer: extraction (Ray Data), training (Ray Train), search (Ray Tune), jobs.

Everything below ``raycompat.pipeline`` may import Ray; the core never does (see
docs/architecture.md; tests/test_layering.py checks it). Above it, the CLI and the
local-cluster harness (``raycompat.local_cluster``) also import Ray.
"""
