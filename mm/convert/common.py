"""What every converter shares: renaming keys by prefix, reading and writing safetensors folders, and writing
a release folder of ours without building the model in memory.

A release is written from tensors: the model is built on the meta device only to know its keys, shapes and
processor, the source's tensors are renamed onto those keys (every key exactly once, equal shapes, else an
error listing the differences) and saved; ``AutoModel.from_pretrained`` (after ``import mm``) loads it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedConfig

from mm.hf import UnifiedMMConfig, UnifiedMMModel, UnifiedMMProcessor, generation_config
from mm.model.backbone import LLMConfig, stated_fields
from mm.model.config import ModelConfig
from mm.schema import to_plain
from mm.sequence import Vocab

# transformers' bookkeeping in a config dict: not architecture
CONFIG_NOISE = ("transformers_version", "architectures", "_name_or_path", "output_hidden_states", "return_dict")


class ConversionError(ValueError):
    """A checkpoint that does not map onto the target layout (the message names the keys or fields)."""


@dataclass(frozen=True)
class Rule:
    """``src`` prefix <-> ``dst`` prefix (keys are renamed by their longest matching prefix)."""

    src: str
    dst: str


def rename(state: dict[str, torch.Tensor], rules: Iterable[Rule], reverse: bool = False) -> dict[str, torch.Tensor]:
    """Keys renamed by the longest matching rule (``reverse``: dst -> src); a key no rule matches is an error."""
    pairs = sorted(((r.dst, r.src) if reverse else (r.src, r.dst) for r in rules), key=lambda p: -len(p[0]))
    out, unmatched = {}, []
    for key, value in state.items():
        for a, b in pairs:
            if key == a or key.startswith(a) and (a.endswith(".") or key[len(a)] == "."):
                out[b + key[len(a) :]] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise ConversionError(f"{len(unmatched)} keys match no conversion rule, e.g. {unmatched[:5]}")
    return out


def check_layout(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], what: str) -> None:
    """Every expected key exactly once with its shape, nothing else."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k])}" for k in sorted(set(state) & set(expected))
              if tuple(state[k].shape) != tuple(expected[k])]  # fmt: skip
    if missing or extra or shapes:
        raise ConversionError(
            f"{what}: missing {missing[:5]} ({len(missing)}), unexpected {extra[:5]} ({len(extra)}), "
            f"shape mismatches {shapes[:5]} ({len(shapes)})"
        )


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors folder (``model.safetensors`` or an index of shards)."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_file(str(folder / shard)))
        return out
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors (or index); only safetensors checkpoints are read")
    return load_file(str(folder / "model.safetensors"))


def save_tensors(state: dict[str, torch.Tensor], out: Path, max_shard_size: str = "5GB") -> None:
    """safetensors shards + index when large (the names transformers' loaders read)."""
    from huggingface_hub import save_torch_state_dict

    seen, own = set(), {}
    for k, v in state.items():  # tied weights are saved under each name (a model built untied reads both)
        v = v.detach().contiguous()
        own[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    save_torch_state_dict(own, str(out), max_shard_size=max_shard_size)


def clean_config(config: PreTrainedConfig) -> dict:
    """A transformers config as the dict our configs record (architecture only)."""
    d = config.to_dict()
    return {k: v for k, v in d.items() if k not in CONFIG_NOISE}


def llm_fields(text_config: PreTrainedConfig) -> LLMConfig:
    """Our ``model.llm`` section for a transformers LLM config: every architecture field it states (the release
    rebuilds the LLM from the saved config itself; ``model.yaml`` builds from these fields)."""
    return LLMConfig(pretrained="", tokenizer="", vocab_size=text_config.vocab_size, attn_implementation="sdpa",
                     **stated_fields(text_config))  # fmt: skip


# transformers' bookkeeping and generation defaults in an LLM config: not the architecture
NOT_ARCHITECTURE = {"transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "use_cache",
                    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "output_hidden_states",
                    "return_dict", "tie_word_embeddings_", "_attn_implementation_autoset"}  # fmt: skip


def llm_field_gaps(text_config: PreTrainedConfig) -> list[str]:
    """Where the LLM that ``model.llm``'s fields build (``llm_fields``) differs from ``text_config``: every
    architecture key of the transformers config compared (recorded in release.json; expected empty)."""
    built = llm_fields(text_config).hf_config(text_config.vocab_size).to_dict()
    theirs = text_config.to_dict()
    gaps = []
    for key in sorted(set(theirs) | set(built)):
        if key not in NOT_ARCHITECTURE and theirs.get(key) != built.get(key):
            gaps.append(f"{key}={theirs.get(key)!r} (model.llm builds {built.get(key)!r})")
    return gaps


def grow_vocab(state: dict[str, torch.Tensor], keys: Iterable[str], text_config: PreTrainedConfig, n: int) -> None:
    """Embedding rows for tokens our template adds beyond the LLM's table: the mean row (as transformers'
    resize does without noise), in place; ``text_config.vocab_size`` follows."""
    rows = text_config.vocab_size
    if n <= rows:
        return
    for key in keys:
        w = state[key]
        state[key] = torch.cat([w, w.mean(0, keepdim=True).expand(n - rows, -1)])
    text_config.vocab_size = n
    print(f"convert: the embedding table grows from {rows} to {n} rows for our special tokens (mean rows)")


RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic"}  # PIL's resample numbers (a processor config's ``resample``)
RESAMPLE_IDS = {v: k for k, v in RESAMPLE_NAMES.items()}


def resample_name(value, where: str) -> str:
    """Our ``preprocess.resample`` of a processor's ``resample`` (a PIL number or enum)."""
    name = RESAMPLE_NAMES.get(int(value))
    if name is None:
        raise ConversionError(f"{where}: resample={value!r}; our preprocessing knows {RESAMPLE_NAMES}")
    return name


def check_processor_size(size: int, tower_size: int, where: str) -> None:
    """A source processor that resizes to another size than the tower reads cannot be followed."""
    if size != tower_size:
        raise ConversionError(f"{where}: the image processor makes {size} px images, the vision tower reads "
                              f"{tower_size} px")  # fmt: skip


def torch_dtype(name: str):
    """``auto`` or a torch dtype name (``float32``, ``bfloat16``) -> what ``from_pretrained(dtype=)`` takes."""
    return name if name == "auto" else getattr(torch, name)


def meta_model(
    model_cfg: ModelConfig,
    text_config: PreTrainedConfig,
    tokenizer,
    image_token_id: int | None = None,
    part_configs: dict | None = None,
):
    """(release config, UnifiedMMModel on the meta device): the keys, shapes and processor of a release."""
    config = UnifiedMMConfig.from_model_config(model_cfg, text_config, part_configs, image_token_id=image_token_id)
    with torch.device("meta"):
        hf = UnifiedMMModel(config, tokenizer=tokenizer)
    return config, hf


def write_release(
    out: Path,
    model_cfg: ModelConfig,
    text_config: PreTrainedConfig,
    tokenizer,
    state: dict[str, torch.Tensor],
    source: dict,
    image_token_id: int | None = None,
    part_configs: dict | None = None,
    final: Path | None = None,
    embedding_keys: tuple[str, ...] = ("llm.model.embed_tokens.weight", "llm.lm_head.weight"),
    local_paths: dict[str, str] | None = None,
) -> Path:
    """A release folder of ours from renamed tensors: checked key for key and shape for shape first.

    ``final``: where the folder will live when ``out`` is a staging folder (``model.yaml`` names it).
    ``local_paths``: ``model.yaml`` keys (dotted, under ``model``) that name the local folders a part came from
    (JanusFlow's separate SDXL VAE), so a run rebuilds that part from it; the release itself needs none."""
    out = Path(out)
    vocab = Vocab(tokenizer, generation=bool(model_cfg.heads))  # adds only the special tokens it lacks
    print(f"convert: {vocab.describe()}")
    grow_vocab(state, [k for k in embedding_keys if k in state], text_config, len(vocab))
    model_cfg.llm.vocab_size = text_config.vocab_size
    config, hf = meta_model(model_cfg, text_config, vocab.tokenizer, image_token_id, part_configs)
    expected = {k: v.shape for k, v in hf.state_dict().items()}
    check_layout(state, expected, f"converting {source.get('path', 'the checkpoint')}")
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    UnifiedMMProcessor.from_model(hf.unified).save_pretrained(str(out))
    gen = generation_config(model_cfg, hf.unified.vocab)
    if tokenizer.eos_token_id is not None:  # stop at the LLM's own end of sequence too (text generate)
        gen.eos_token_id = sorted({tokenizer.eos_token_id, hf.unified.vocab.eos})
    gen.save_pretrained(str(out))
    save_tensors(state, out)
    gaps = llm_field_gaps(text_config)
    (out / "release.json").write_text(json.dumps({"source": source, "llm_fields_model_yaml_cannot_state": gaps},
                                                 indent=1))  # fmt: skip
    write_model_yaml(out, Path(final or out), model_cfg, gaps, local_paths or {})
    return out


def write_model_yaml(out: Path, final: Path, model_cfg: ModelConfig, gaps: list[str], local_paths: dict) -> None:
    """``model.yaml``: the model section that rebuilds this architecture for training (``base:`` it, then
    ``train.init_from`` the folder); the tokenizer is this folder."""
    from omegaconf import OmegaConf

    section = to_plain(model_cfg)
    section["llm"]["tokenizer"] = os.path.abspath(final)
    for key, path in local_paths.items():
        *parents, leaf = key.split(".")
        node = section
        for name in parents:
            node = node[name]
        node[leaf] = os.path.abspath(path)
    head = ["# The model section of this converted release, for training: `base:` this file and set",
            f"# train.init_from={os.path.abspath(final)} (written with the folder's absolute path)."]  # fmt: skip
    if gaps:
        head.append("# NOTE: model.llm builds the LLM from shape fields; this LLM differs in " + "; ".join(gaps))
    (out / "model.yaml").write_text("\n".join(head) + "\n" + OmegaConf.to_yaml({"model": section}))
