"""The algorithms, one stage of the paper per module; no Dagster in here."""
