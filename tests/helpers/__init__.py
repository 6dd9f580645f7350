"""Helpers the tests share: schedule trees, hand-made plans, training steps, random-draw probes,
Hypothesis strategies for cost chains, and Hugging Face's tester configurations."""
