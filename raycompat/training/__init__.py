"""Training loops and per-method loss terms in plain torch (Ray Train wraps them)."""
