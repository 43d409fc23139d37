"""Data: TFDS image pipelines per host, the digits builder, trajectory datasets."""
