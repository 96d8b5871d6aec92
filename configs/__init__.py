"""Training recipes (ml_collections), passed as `python -m p3m_jax.main --config=configs/<recipe>.py`."""
