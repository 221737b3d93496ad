"""Data: sample schema, one-pass rendering, webdataset shards, mixtures, demo generation, converters."""
