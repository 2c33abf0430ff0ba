"""at_jax: attention transfer for Vision Transformers in JAX/Flax."""
