"""raycompat: upgrade an embedding model without backfilling the whole gallery.

The algorithmic core (``data``, ``models``, ``compat``, ``retrieval``, ``backfill``)
imports without Ray; ``pipeline`` is the Ray layer on top of it.
"""

__version__ = "0.1.0"
