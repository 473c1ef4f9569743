"""Converters: a published checkpoint's layout <-> ours.

Importers (``scripts/convert.py KIND SRC OUT``) write a release folder of ours from a published folder:

* ``hf_janus``: transformers' ``JanusForConditionalGeneration`` (Janus, Janus-Pro);
* ``hf_llava``: transformers' ``LlavaForConditionalGeneration`` (LLaVA-1.5), understanding only;
* ``janusflow``: JanusFlow-1.3B's release (``multi_modality`` config + safetensors), with the SDXL VAE.

Exporters (``scripts/export_release.py RUN OUT --format KIND``) write a model of Janus or LLaVA architecture as a
folder its transformers class loads with no code of ours; every other model keeps our format, and the
exporter says why. Tensors are renamed by prefix, never changed; every key is checked once with its shape.
"""

from collections.abc import Callable

from mm.convert.common import ConversionError
from mm.convert.janus import export_hf_janus, import_hf_janus
from mm.convert.janusflow import import_janusflow
from mm.convert.llava import export_hf_llava, import_hf_llava

IMPORTERS: dict[str, Callable] = {
    "hf_janus": import_hf_janus,
    "hf_llava": import_hf_llava,
    "janusflow": import_janusflow,
}
EXPORTERS: dict[str, Callable] = {"hf_janus": export_hf_janus, "hf_llava": export_hf_llava}

__all__ = ["EXPORTERS", "IMPORTERS", "ConversionError"]
