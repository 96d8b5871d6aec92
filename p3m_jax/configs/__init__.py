"""Training recipes (ml_collections), passed as `python -m p3m_jax.main --config=<recipe>` (or the path of a config file)."""
