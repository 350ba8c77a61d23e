"""fdistill_jax: sequence-level knowledge distillation with f-divergences in JAX/Flax."""

__version__ = "0.1.0"
