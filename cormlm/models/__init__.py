"""Model code shared by every family: attention, RoPE, norms, MLPs, the transformer."""

from .transformer import CausalLM

__all__ = ["CausalLM"]
