"""Pools and their shards: img2dataset tars and parquets, precomputed embedding sources, uids, shard groups."""
