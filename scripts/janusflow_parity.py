"""JanusFlow parity: our converted model against the reference implementation's outputs, as JSON.

    PYTHONPATH=$JANUSFLOW_REF_PATH python scripts/janusflow_reference.py run /tmp/jf_parity --seed 0
    python scripts/janusflow_parity.py /tmp/jf_parity

The first command (in the reference's scratch environment, see its docstring) saves a reduced JanusFlow with
random weights, its inputs and its outputs; this one writes a tokenizer with the same token ids, converts the
folder with ``mm.convert.janusflow`` (``--random-vae``: the VAE is not part of the comparison) and runs our
model on the same inputs: understanding logits (image + text through the SigLIP tower, the aligner, the
begin-of-image embedding and the LLM) and predicted velocities (noisy latents and t through the generation
encoder, its aligner, the time token, the LLM, the decoder aligner and norm, the decoder). Prints the max
absolute differences beside the outputs' own scale.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModel  # noqa: E402

import mm  # noqa: E402, F401  (registers the Auto classes)
from mm.batch import ImageInputs  # noqa: E402
from mm.convert.janusflow import import_janusflow  # noqa: E402
from mm.kernels.attention import AttentionSpec  # noqa: E402

# The reference run's token ids (scripts/janusflow_reference.py): bos, eos, pad, image, boi, eoi
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image_placeholder>",
            "<begin_of_image>", "<end_of_image>"]  # fmt: skip


def write_tokenizer(folder: Path) -> None:
    """Word-level tokenizer whose first ids are the reference run's special tokens (words fill up to 240)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, "<unk>", *(f"w{i}" for i in range(233))])}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   bos_token=SPECIALS[0], eos_token=SPECIALS[1], pad_token=SPECIALS[2],
                                   unk_token="<unk>", additional_special_tokens=SPECIALS[3:])  # fmt: skip
    fast.save_pretrained(str(folder))


def compare(folder: Path) -> dict:
    ref = load_file(str(folder / "parity.safetensors"))
    write_tokenizer(folder)
    out = folder / "ours"
    shutil.rmtree(out, ignore_errors=True)
    import_janusflow(folder, out, random_vae=True, gen_image_size=ref["z"].shape[-1] * 8)
    model = AutoModel.from_pretrained(str(out), local_files_only=True).eval()
    u, head = model.unified, model.unified.heads["flow"]
    with torch.no_grad():
        logits = model(input_ids=ref["ids"], pixel_values=(ref["pixels"] + 1) / 2).logits
        # our generation row: the prompt, <begin_of_generation> (the time token) and the latent slots
        ids, n = ref["gen_ids"], (ref["z"].shape[-1] // 2) ** 2
        ids = torch.cat(
            [ids[:, :-1], torch.full_like(ids[:, :1], u.vocab.bog), torch.full((len(ids), n), u.vocab.gen)], 1
        )
        embeds = u.embed_tokens(ids)
        empty = ImageInputs(embeds.new_zeros(0), ids.new_zeros(0))
        embeds, skip, temb = head.embed_latents(
            embeds, ref["z"], ref["t"], ids == u.vocab.gen, ids == u.vocab.bog, empty
        )
        pos = torch.arange(ids.shape[1], dtype=torch.float32).expand(len(ids), -1)
        h = u.decode(embeds, pos, AttentionSpec.packed(torch.zeros_like(ids))).last_hidden_state
        velocity = head.codec.velocity(h[:, -n:], skip, temb)
    diff = lambda a, b: float((a - b).abs().max())  # noqa: E731
    return {
        "understanding_logits_max_abs_diff": diff(logits, ref["logits"]),
        "understanding_logits_max_abs": float(ref["logits"].abs().max()),
        "velocity_max_abs_diff": diff(velocity, ref["velocity"]),
        "velocity_max_abs": float(ref["velocity"].abs().max()),
        "shapes": {"logits": list(logits.shape), "velocity": list(velocity.shape)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="the output folder of scripts/janusflow_reference.py run")
    args = ap.parse_args()
    print(json.dumps(compare(args.folder), indent=1))


if __name__ == "__main__":
    main()
