"""TFDS builders of the UniRES++ datasets (folder layout found by `tfds build`)."""
