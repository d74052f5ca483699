"""Model-specific glue (Hugging Face Flax models, a Flax Mamba port)."""
