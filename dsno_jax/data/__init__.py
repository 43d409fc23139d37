"""Data: image sources per host, the digits builder, trajectory datasets, read order and noise."""
