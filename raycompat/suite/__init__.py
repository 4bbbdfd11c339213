"""The protocol suite: one NIFCL recipe, every baseline, several protocols and seeds, one table.

:mod:`.config` is the suite's YAML, :mod:`.unit` trains and measures one (protocol, seed) in-process
(no Ray), :mod:`.summary` averages the units over seeds and checks the acceptance criteria. The Ray
orchestration (one task per unit, resumable) lives in :mod:`raycompat.pipeline.bench_suite`.
"""
