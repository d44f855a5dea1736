"""Data: ingest (scan, validate, split, shard), shard formats, transforms and the Ray Data pipeline."""
