"""raycompat: upgrade an embedding model without backfilling the whole gallery.

Dependencies point one way (docs/architecture.md): ``cli`` -> ``pipeline`` (the Ray
layer) -> the core (``storage``, ``data``, ``models``, ``compat``, ``training``,
``retrieval``, ``backfill``, ``suite``), which imports without Ray.
``local_cluster`` is the local multi-node cluster harness, outside that chain.
"""

__version__ = "0.1.0"
