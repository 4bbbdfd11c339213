"""The Ray layer: extraction (Ray Data), training (Ray Train), search (Ray Tune), jobs.

Everything below ``raycompat.pipeline`` may import Ray; nothing outside it does.
"""
