"""Errors raycompat raises for bad input: one line, naming the file, key or record."""


class RaycompatError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(RaycompatError):
    """A config file or key is missing, unknown, of the wrong type or out of range."""


class DataError(RaycompatError):
    """A dataset, file, shard or record is missing or corrupt."""


class FeatureStoreError(RaycompatError):
    """A feature store is missing, corrupt, or from another model/version than expected."""


class StoreChecksumError(FeatureStoreError, DataError):
    """A feature-store part's bytes differ from the sha256 its manifest promises."""
