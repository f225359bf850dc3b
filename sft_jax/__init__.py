"""sft_jax: supervised instruction fine-tuning of GPT-2 and Llama-family models in JAX/Flax.

Entry point: `python -m sft_jax.main --config configs/X.py --workdir DIR`.
"""

__version__ = "0.1.0"
