"""Unified multimodal models: understanding + generation in one autoregressive LLM.

Importing ``mm`` registers the model with transformers' Auto classes (``mm/hf.py``), so a
release folder loads with ``AutoModel.from_pretrained`` / ``AutoProcessor.from_pretrained``.
"""

from mm.hf import register_auto_classes

register_auto_classes()
