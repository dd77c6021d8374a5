"""Where results live: contract paths, atomic writes, commit markers, DuckDB and the SQL catalog, exports."""
