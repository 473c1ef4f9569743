"""Unified multimodal models: understanding + generation in one autoregressive LLM."""
