"""UniRES++ (multi-granularity referring expression segmentation) in JAX/Flax."""
