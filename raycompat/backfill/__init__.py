"""Backfill simulator and cost report: what an embedding upgrade costs and what quality it buys.

Measured per-item costs (backbone images/s, transformation vectors/s, read
bandwidth) and measured quality curves (quality.json) go in; for each strategy
(compatible model, full / partial backfill, FCT + FastFill) the report gives $,
node-hours, wall time and retrieval quality over time, at any gallery size in
O(steps) time and memory. Entry point: :func:`raycompat.backfill.report.run_backfill_report`.
"""
