"""Datasets: raw readers and writers, the TFDS schema, ShapesParts, the Grain input pipeline."""
