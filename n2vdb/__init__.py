"""n2vdb: Net2Vec (Fong & Vedaldi, CVPR 2018) as a DuckDB database.

The package is a library first; `n2vdb.cli` is a thin typer layer over it.
Notebook entry points live in `n2vdb.api`.
"""

__version__ = "0.1.0"
