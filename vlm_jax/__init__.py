"""vlm_jax: staged perception-first post-training of vision-language models in JAX."""

__version__ = "0.1.0"
