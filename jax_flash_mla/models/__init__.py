"""Example models that run on jax-flash-mla."""
