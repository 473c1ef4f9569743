"""Run JanusFlow's public reference code (deepseek-ai/Janus, ``janus/janusflow/models``) from a scratch directory.

This script imports nothing of this project: the reference needs transformers 4.x (its config classes break
on transformers 5), so it runs in a scratch environment, e.g.::

    git clone https://github.com/deepseek-ai/Janus /tmp/janus_ref            # or any copy of the repository
    pip install --no-deps --target /tmp/janus_ref/tf4 transformers==4.46.3 tokenizers==0.20.3 \\
        huggingface_hub==0.26.5 diffusers==0.31.0
    pip install --target /tmp/janus_ref/site attrdict
    export JANUSFLOW_REF_PATH=/tmp/janus_ref/tf4:/tmp/janus_ref:/tmp/janus_ref/site
    PYTHONPATH=$JANUSFLOW_REF_PATH python scripts/janusflow_reference.py keys tests/data/janusflow_1.3b_config.json \\
        tests/data/janusflow_1.3b_keys.json
    PYTHONPATH=$JANUSFLOW_REF_PATH python scripts/janusflow_reference.py run /tmp/jf_parity --seed 0

``keys``: the key -> shape list of the model the reference builds from a released ``config.json`` (built in
bf16 on the CPU: about 3 GB). ``run``: a reduced JanusFlow (the reference's hard-coded widths: SigLIP-L 1024,
LLM 2048, generation channels 768; fewer layers, small images) with random weights from ``--seed``, saved
as a release folder (``config.json``, ``model.safetensors`` with the reference's keys) with its inputs and
outputs (``parity.safetensors``): understanding logits, and velocities predicted from noisy latents.
``scripts/janusflow_parity.py`` converts that folder with our converter and compares.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# Token ids of the reduced parity model (no tokenizer on this side; ours writes one with these ids)
BOS, EOS, PAD, IMAGE, BOI, EOI = 0, 1, 2, 3, 4, 5
TEXT_IDS = (16, 200)  # [lo, hi) for random text tokens

PARITY_CONFIG = {
    "model_type": "multi_modality",
    "vision_und_enc_config": {
        "cls": "CLIPVisionTower",
        "params": {
            "image_size": 64,
            "model_name": "siglip_large_patch16_384",
            "select_feature": "same",
            "select_layer": 2,
        },
    },
    "vision_gen_enc_config": {
        "cls": "ShallowUViTEncoder",
        "params": {
            "input_channels": 4,
            "kernel_size": 2,
            "stride": 2,
            "padding": 0,
            "block_out_channels": [768],
            "layers_in_middle": 2,
            "hidden_size": 2048,
            "use_bias": True,
            "norm_eps": 1e-5,
        },
    },
    "vision_gen_dec_config": {
        "cls": "ShallowUViTDecoder",
        "params": {
            "in_channels": 768,
            "out_channels": 4,
            "block_out_channels": [768],
            "upsamples": 1,
            "layers_in_middle": 2,
            "hidden_size": 2048,
            "use_bias": True,
            "norm_eps": 1e-5,
        },
    },
    "language_config": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_hidden_layers": 2,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 256,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
    },
}


def build(config: dict):
    from janus.janusflow.models import MultiModalityCausalLM
    from janus.janusflow.models.modeling_vlm import MultiModalityConfig

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    return MultiModalityCausalLM(MultiModalityConfig(**cfg))


def keys(config_path: Path, out: Path) -> None:
    config = json.loads(config_path.read_text())
    torch.set_default_dtype(torch.bfloat16)  # built on the CPU (timm's ViT reads a tensor at init: no meta device)
    model = build(config)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in shapes.items()]  # one key per line: readable diffs
    head = {"source": "deepseek-ai/Janus janus/janusflow/models, MultiModalityCausalLM", "config": config_path.name}
    out.write_text(json.dumps(head)[:-1] + ', "keys": {\n' + ",\n".join(lines) + "\n}}\n")
    print(f"{len(shapes)} keys, {sum(torch.Size(s).numel() for s in shapes.values()) / 1e6:.1f}M values -> {out}")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (zero-initialised parts too, so every parameter is exercised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.02
            is_scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1.0 + noise if is_scale else noise)


def run(out: Path, seed: int, config_path: Path | None = None, latent: int = 8) -> None:
    """``config_path``: a released config.json instead of the reduced one (the full model: ~9 GB of fp32)."""
    from safetensors.torch import save_file

    config = json.loads(config_path.read_text()) if config_path else PARITY_CONFIG
    torch.manual_seed(seed)
    model = build(config).float().eval()
    randomize(model, seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    size = config["vision_und_enc_config"]["params"]["image_size"]
    n_img = (size // 16) ** 2
    text = lambda n: torch.randint(*TEXT_IDS, (n,), generator=g).tolist()  # noqa: E731
    with torch.no_grad():
        # understanding: <bos> text <boi> <image>*n <eoi> text; <boi> takes beg_of_und_embed, the placeholders the tower
        ids = torch.tensor([[BOS, *text(3), BOI, *([IMAGE] * n_img), EOI, *text(4)]])
        pixels = torch.rand(1, 1, 3, size, size, generator=g) * 2 - 1
        seq_mask = (ids == IMAGE) | (ids == BOI)
        emb_mask = torch.ones(1, 1, n_img + 1, dtype=torch.bool)
        embeds = model.prepare_inputs_embeds(ids.clone(), pixels, seq_mask, emb_mask)
        logits = model.language_model(inputs_embeds=embeds).logits
        # generation: <bos> prompt <boi>, whose slot takes the time embedding, then the latent tokens
        gen_ids = torch.tensor([[BOS, *text(5), BOI], [BOS, *text(5), BOI]])
        z = torch.randn(2, 4, latent, latent, generator=g)
        t = torch.tensor([0.25, 0.8])
        z_emb, t_emb, hs = model.vision_gen_enc_model(z, t * 1000.0)  # the reference feeds t*1000
        z_emb = model.vision_gen_enc_aligner(z_emb.flatten(2).permute(0, 2, 1))
        prompt = model.language_model.get_input_embeddings()(gen_ids)[:, :-1]
        llm_in = torch.cat([prompt, t_emb[:, None], z_emb], dim=1)
        hidden = model.language_model.model(inputs_embeds=llm_in).last_hidden_state[:, -z_emb.shape[1] :]
        hidden = model.vision_gen_dec_aligner(model.vision_gen_dec_aligner_norm(hidden))
        grid = z.shape[-1] // 2
        v = model.vision_gen_dec_model(hidden.reshape(2, grid, grid, 768).permute(0, 3, 1, 2), hs, t_emb)
    outputs = {"ids": ids, "pixels": pixels[:, 0], "logits": logits, "gen_ids": gen_ids, "z": z, "t": t, "velocity": v}
    save_file({k: x.contiguous() for k, x in outputs.items()}, str(out / "parity.safetensors"))
    print(f"reference outputs -> {out}: logits {tuple(logits.shape)}, velocity {tuple(v.shape)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keys", help="key -> shape list of a released config")
    k.add_argument("config", type=Path)
    k.add_argument("out", type=Path)
    r = sub.add_parser("run", help="a reduced model with random weights, its inputs and outputs")
    r.add_argument("out", type=Path)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--config", type=Path, help="a released config.json (default: the reduced parity model)")
    r.add_argument("--latent", type=int, default=8, help="latent side of the velocity inputs (the release: 48)")
    args = ap.parse_args()
    if args.cmd == "keys":
        keys(args.config, args.out)
    else:
        run(args.out, args.seed, args.config, args.latent)


if __name__ == "__main__":
    main()
