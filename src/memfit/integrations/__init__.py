"""Model families: Hugging Face transformers (optional dependency, imported lazily)."""
