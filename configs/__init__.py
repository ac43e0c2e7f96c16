"""ml_collections configs, installed as `unires_jax.configs` (see `unires_jax.config_lib`)."""
