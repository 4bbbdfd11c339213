"""The chain benchmark's config: several chains x several methods, one chain config each.

``chain`` holds the keys every run shares (a chain config's keys but ``generations``,
``method``, ``compat`` and ``output_dir``); ``chains`` names each chain's generations and
``methods`` each method (``method``, ``compat`` and ``fct``, as in a chain config). Run
``(chain, method)`` is the chain config ``chain`` + those, with output under
``<output_dir>/<chain>/<method>``. Every run's config is built and checked on load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from raycompat.chain.config import ChainConfig, ChainFctConfig, GenerationConfig
from raycompat.compat.config import CompatConfig
from raycompat.configio import check_dir_name, deep_merge, from_dict, join, load_config, to_dict
from raycompat.errors import ConfigError

# Given per run by chains / methods / output_dir, not by the shared section.
PER_RUN = ("generations", "method", "compat", "fct", "output_dir")


@dataclass
class MethodSpec:
    """One method of the benchmark: a chain config's ``method``, ``compat`` and ``fct``."""

    method: Literal["independent", "l2", "bct", "nifcl"] = "nifcl"
    compat: CompatConfig = field(default_factory=CompatConfig)
    # FCT across this method's chains (off by default); generations are not retrained when it changes.
    fct: ChainFctConfig = field(default_factory=ChainFctConfig)


@dataclass
class ChainBenchConfig:
    output_dir: str = "runs/chain_bench"
    chain: dict[str, Any] = field(default_factory=dict)
    chains: dict[str, list[GenerationConfig]] = field(default_factory=dict)
    methods: dict[str, MethodSpec] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        shared = sorted(set(self.chain) & set(PER_RUN))
        if shared:
            raise ConfigError(f"{join(key, 'chain.' + shared[0])}: given per run (by chains, methods and output_dir)")
        for what in ("chains", "methods"):
            if not getattr(self, what):
                raise ConfigError(f"{join(key, what)}: needs at least one entry")
            for name in getattr(self, what):
                check_dir_name(name, join(key, f"{what}.{name}"))
        for chain in self.chains:
            for method in self.methods:
                self.run_config(chain, method, key)

    def run_config(self, chain: str, method: str, key: str = "") -> ChainConfig:
        """The chain config of run ``(chain, method)``."""
        spec = self.methods[method]
        doc = deep_merge(self.chain, {
            "output_dir": f"{self.output_dir.rstrip('/')}/{chain}/{method}",
            "generations": [to_dict(g) for g in self.chains[chain]],
            "method": spec.method, "compat": to_dict(spec.compat), "fct": to_dict(spec.fct),
        })
        try:
            return from_dict(ChainConfig, doc)
        except ConfigError as exc:
            raise ConfigError(f"{join(key, f'run {chain}/{method}')}: {exc}") from None


def load_chain_bench_config(path: str | Path, overrides: dict | None = None) -> ChainBenchConfig:
    """Load and validate a chain benchmark config YAML (errors name the file and key)."""
    return load_config(path, ChainBenchConfig, overrides)
