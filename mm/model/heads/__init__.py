"""Image heads, registered by name (``model.heads`` in the config maps names to their configs); see ``base.py``.

Importing this package registers the bundled heads: ``flow`` (JanusFlow's rectified flow), ``nextfreq``
(NFIG), ``raster`` (one code per pass) and ``janus`` (Janus's VQ codes, one per pass). A head defined
elsewhere registers itself with ``@register_head("name")`` when its module is imported.
"""

from mm.model.heads import codes, flow, janus  # noqa: F401  (each module registers its heads on import)
from mm.model.heads.base import IMAGE_HEADS, HeadContext, HeadHost, ImageHead, head_class, register_head
from mm.model.heads.codes import CFG_SCHEDULES, CodeHead, CodeHeadConfig, NextFreqHead, RasterHead
from mm.model.heads.flow import FlowHead, FlowHeadConfig
from mm.model.heads.janus import JanusHead, JanusHeadConfig

__all__ = [
    "CFG_SCHEDULES", "IMAGE_HEADS", "CodeHead", "CodeHeadConfig", "FlowHead", "FlowHeadConfig", "HeadContext",
    "HeadHost", "ImageHead", "JanusHead", "JanusHeadConfig", "NextFreqHead", "RasterHead", "head_class",
    "register_head",
]  # fmt: skip
