"""Backbones, model directories (export.py: every save and load), black-box extractor adapters, the side-info
model psi and the FCT transformation h; their configs."""
