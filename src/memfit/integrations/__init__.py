"""Model families: Hugging Face transformers (optional dependency, imported lazily).

Importing this package registers the families' hooks with the runtime (turning off HF's own
checkpointing when a plan is applied); it does not import transformers.
"""

from memfit.integrations.hf import build_hf, disable_hf_checkpointing, hf_block_names

__all__ = ["build_hf", "disable_hf_checkpointing", "hf_block_names"]
