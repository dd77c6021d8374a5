"""dbprune: Density-Based Pruning of image-text pools as a Dagster asset graph.

Layout: ``core/`` holds the algorithms (plain functions over numpy, polars,
torch, faiss and DuckDB; no Dagster), ``defs/`` the Dagster assets, resources
and checks built on them, ``cli.py`` the ``dbprune`` command.
"""

__version__ = "0.1.0"
