"""Datasets, protocols (old/new/validation splits), the IDX reader and the Parquet feature store; their configs."""
