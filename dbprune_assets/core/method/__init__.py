"""The paper's method: SemDeDup, the CLIP-score filter, DBP and the k-means they share; no Dagster in here."""
