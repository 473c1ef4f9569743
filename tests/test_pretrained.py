"""Pretrained parts configure the model: shapes come from the loaded folders (library-saved stand-ins of a Qwen2
with its tokenizer, a SiglipVisionModel and a diffusers AutoencoderKL), a YAML key that contradicts a folder is a
one-line error naming it, the validated config records what was loaded, and the LLM's own special tokens and chat
template are used (held against the tokenizer's own ``apply_chat_template``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.pretrained_fixtures import llama_tokenizer, qwen2_tokenizer, stand_ins


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return stand_ins(tmp_path_factory.mktemp("models"))


def _model_cfg(models: dict[str, Path], extra: list[str] | None = None):
    from mm.config import load_config

    return load_config(None, [
        f"model.llm.pretrained={models['llm']}", "model.und.kind=hf_siglip",
        f"model.und.tower.weights={models['siglip']}",
        "model.heads.flow.autoencoder.kind=diffusers_kl", f"model.heads.flow.autoencoder.path={models['vae']}",
        "model.heads.flow.autoencoder.image_size=384", "model.heads.flow.repa_layer=6", *(extra or []),
    ])  # fmt: skip


def test_shapes_come_from_the_folders_and_the_config_records_them(models):
    from transformers import AutoConfig

    from mm.schema import to_plain

    cfg = _model_cfg(models)
    llm = AutoConfig.from_pretrained(str(models["llm"]))
    saved = to_plain(cfg)["model"]
    assert saved["llm"]["model_type"] == "qwen2" and saved["llm"]["hidden_size"] == llm.hidden_size == 64
    assert saved["llm"]["num_layers"] == 8 and saved["llm"]["num_kv_heads"] == 2
    assert saved["llm"]["rms_norm_eps"] == 1e-5 and saved["llm"]["tie_word_embeddings"] is True
    assert saved["llm"]["rope_theta"] == 1e6 and saved["llm"]["tokenizer"] == str(models["llm"])
    shapes = dict(image_size=384, patch_size=16, width=32, layers=2, heads=2, mlp_ratio=2.0, channels=3)
    assert {k: saved["und"]["tower"][k] for k in shapes} == shapes
    ae = saved["heads"]["flow"]["autoencoder"]
    assert (ae["image_channels"], ae["latent_channels"], ae["downsample"]) == (3, 4, 8)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.llm.hidden_size=128", "model.llm.hidden_size=128"),
        ("model.llm.model_type=llama", "model.llm.model_type='llama'"),
        ("model.llm.rms_norm_eps=1e-6", "model.llm.rms_norm_eps=1e-06"),
        ("model.und.tower.image_size=224", "model.und.tower.image_size=224"),
        ("model.und.tower.patch_size=14", "model.und.tower.patch_size=14"),
        ("model.heads.flow.autoencoder.downsample=16", "model.heads.flow.autoencoder.downsample=16"),
        ("model.heads.flow.autoencoder.latent_channels=16", "model.heads.flow.autoencoder.latent_channels=16"),
        ("model.heads.flow.autoencoder.image_channels=1", "model.heads.flow.autoencoder.image_channels=1"),
    ],
)
def test_a_key_that_contradicts_its_folder_fails_in_one_line_naming_it(models, override, key):
    from mm.schema import ConfigError

    with pytest.raises(ConfigError) as e:
        _model_cfg(models, [override])
    msg = str(e.value)
    assert "\n" not in msg and key in msg and "contradicts" in msg and "drop" in msg, msg


def test_keys_that_agree_with_the_folder_are_accepted(models):
    cfg = _model_cfg(models, ["model.llm.hidden_size=64", "model.und.tower.patch_size=16",
                              "model.heads.flow.autoencoder.downsample=8"])  # fmt: skip
    assert cfg.model.llm.num_layers == 8


def test_the_repa_grid_error_says_which_keys_fix_it(models):
    from mm.model.unified import build_model
    from mm.schema import ConfigError

    cfg = _model_cfg(models, ["model.heads.flow.autoencoder.image_size=256"])
    with pytest.raises(ConfigError) as e:
        build_model(cfg.model)
    msg = str(e.value)
    assert "\n" not in msg and "(16x16" in msg and "(24x24" in msg
    assert "model.heads.flow.autoencoder.image_size=384" in msg and "model.heads.flow.repa_weight=0" in msg
    cfg = _model_cfg(models, ["model.heads.flow.autoencoder.image_size=256", "model.heads.flow.repa_weight=0"])
    assert build_model(cfg.model).heads["flow"].grid == 16  # REPA off: any grid


def test_a_missing_folder_leaves_the_shapes_unset_and_building_names_it(tmp_path):
    from mm.config import load_config
    from mm.model.unified import build_model

    cfg = load_config(None, [f"model.llm.pretrained={tmp_path}/none", "model.heads.flow.repa_weight=0"])
    assert cfg.model.llm.hidden_size is None
    with pytest.raises(FileNotFoundError, match="model.llm.pretrained: no such directory"):
        build_model(cfg.model)


def test_the_built_llm_is_the_folder_s(models):
    from transformers import AutoModelForCausalLM

    from mm.model.unified import build_model

    model = build_model(_model_cfg(models).model)
    ref = AutoModelForCausalLM.from_pretrained(str(models["llm"]))
    assert model.llm.config.rms_norm_eps == 1e-5 and model.llm.config.tie_word_embeddings
    assert model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight
    n = ref.get_input_embeddings().num_embeddings  # the folder's rows are untouched; ours come after (spare rows)
    assert torch.equal(model.llm.get_input_embeddings().weight[:n], ref.get_input_embeddings().weight)
    assert model.und.tower.image_size == 384 and model.und.tokens_per_image == 576
    assert model.heads["flow"].latent_shape == (4, 48, 48)


# ---- the LLM's own tokens and chat template ---------------------------------------------------------------------
def test_qwen2_tokens_and_chat_template_are_the_tokenizer_s():
    """Text-only conversations: our ids are the tokenizer's own apply_chat_template ids, token for token; the loss
    covers each answer and the text closing its turn (<|im_end|> and its newline)."""
    from mm.sequence import ROLE_ASSISTANT, ROLE_USER, Vocab, conversation_sample

    tok = qwen2_tokenizer()
    v = Vocab(tok)
    assert v.chat and v.bos is None and v.prefix == []
    assert (v.eos, v.pad) == (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>"))
    assert v.added == ["<image_placeholder>", "<begin_of_image>", "<end_of_image>", "<begin_of_generation>",
                       "<gen_placeholder>"]  # fmt: skip
    assert "its own chat template" in v.describe() and "added ours: <image_placeholder>" in v.describe()
    turns = [(ROLE_USER, "what digit is this ?"), (ROLE_ASSISTANT, "7"), (ROLE_USER, "draw the digit 3"),
             (ROLE_ASSISTANT, "yes")]  # fmt: skip
    s = conversation_sample(v, turns, [], 4)
    messages = [{"role": r, "content": t} for r, t in turns]
    ref = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert s.input_ids == list(ref)
    supervised = [tok.decode([t]) for t in s.targets if t >= 0]
    assert "".join(supervised) == "7<|im_end|>\nyes<|im_end|>\n"
    prompt = conversation_sample(v, turns[:3], [], 4).input_ids
    assert prompt == list(tok.apply_chat_template(messages[:3], tokenize=True, add_generation_prompt=True,
                                                  return_dict=False))  # fmt: skip
    assert v.stop_ids == [v.eos]


def test_images_and_generation_prompts_sit_inside_the_chat_template():
    from mm.sequence import ImageTemplate, Vocab, image_generation_sample, understanding_sample

    tok = qwen2_tokenizer()
    v = Vocab(tok)
    s = understanding_sample(v, torch.zeros(3, 8, 8), 3, "what digit is this ?", None)
    image = [v.boi, v.image, v.image, v.image, v.eoi]
    ref = tok.apply_chat_template([{"role": "user", "content": "@@what digit is this ?"}], tokenize=False,
                                  add_generation_prompt=True)  # fmt: skip
    before, after = ref.split("@@")
    assert s.input_ids == v.encode(before) + image + v.encode(after)
    g = image_generation_sample(v, ImageTemplate("flow", 8, 3, (4,)), None, "draw the digit 3")
    ref = tok.apply_chat_template([{"role": "user", "content": "draw the digit 3"}], tokenize=True,
                                  add_generation_prompt=True, return_dict=False)  # fmt: skip
    assert g.input_ids == list(ref) + [v.bog] + [v.gen] * 4
    assert [t for t, m in zip(g.input_ids, g.prompt_mask) if m] == v.encode("draw the digit 3")


def test_a_tokenizer_without_a_chat_template_gets_ours_and_says_so():
    from mm.sequence import ROLE_USER, Vocab, conversation_sample

    tok = llama_tokenizer()
    v = Vocab(tok)
    assert not v.chat and v.bos == tok.bos_token_id and v.eos == tok.eos_token_id
    assert v.added == ["<|pad|>", "<image_placeholder>", "<begin_of_image>", "<end_of_image>", "<|user|>",
                       "<|assistant|>", "<begin_of_generation>", "<gen_placeholder>"]  # fmt: skip
    assert "our chat template (it has none)" in v.describe()
    s = conversation_sample(v, [(ROLE_USER, "<image>\nwhat digit is this ?")], [torch.zeros(3, 8, 8)], 2)
    assert s.input_ids[:3] == [tok.bos_token_id, v.user, v.boi] and s.input_ids[-1] == v.assistant
    assert Vocab(llama_tokenizer(), generation=False).added[-1] == "<|assistant|>"  # no generation tokens


def test_the_digits_tokenizer_keeps_its_ids():
    from mm.sequence import SPECIAL_TOKENS, load_vocab

    v = load_vocab(ROOT / "configs" / "tokenizers" / "digits")
    ids = [v.pad, None, v.bos, v.eos, v.user, v.assistant, v.boi, v.eoi, v.image, v.bog, v.gen]
    assert ids == [None if t == "<|unk|>" else i for i, t in enumerate(SPECIAL_TOKENS)] and v.added == []


def test_a_qwen2_run_trains_and_answers_in_its_chat_template(models, shard_dir, tmp_path):
    """Understanding only on the stand-ins: a training step, then answer() stops at the template's <|im_end|>."""
    from mm.config import load_config
    from mm.train.launch import launch

    cfg = load_config(None, [
        f"model.llm.pretrained={models['llm']}", "model.und.kind=hf_siglip",
        f"model.und.tower.weights={models['siglip']}",
        "model.understanding_only=true", "model.heads.flow=null", "model.und.freeze=false",
        "train.pretrained_tower_lr=1.0e-5", f"data.train_shards={shard_dir}/digits/train-{{000000..000003}}.tar",
        "data.sources=[{name: digits_vqa, kind: conversation, weight: 1.0}]", "data.seq_len=1200",
        "data.rows_per_batch=1", "data.num_workers=0", "train.max_steps=1", "train.log_every=1",
        "train.ckpt_every=1", "train.warmup_steps=1", f"run.dir={tmp_path}/run",
    ])  # fmt: skip
    torch.set_num_threads(1)
    trainer = launch(cfg)
    groups = {g.name: g.lr for g in trainer.stage.groups}
    assert groups == {"und.tower (pretrained)": 1e-5, "default": cfg.train.lr}
    report = trainer.stage.report
    assert "pretrained understanding tower (weights from model.und.tower.weights=" in report and "1.0e-05" in report
    assert "its own chat template" in report
    trainer.train()
    model = trainer.model.eval()
    end = model.vocab.tokenizer.convert_tokens_to_ids("<|im_end|>")
    streamed = []

    def forced(module, inputs, logits):  # the model says "7" once, then closes its turn
        out = torch.zeros_like(logits)
        out[..., end if streamed else model.vocab.encode("7")[0]] = 1.0
        return out

    hook = model.llm.get_output_embeddings().register_forward_hook(forced)
    answer = model.answer(torch.rand(1, 3, 384, 384), ["what digit is this ?"], max_new_tokens=5,
                          on_token=lambda row, tok: streamed.append(tok))  # fmt: skip
    hook.remove()
    assert answer == ["7"] and len(streamed) == 1


def test_a_turn_end_other_than_eos_stops_answers():
    """Qwen2's base tokenizer ends documents with <|endoftext|> and turns with <|im_end|>: both stop an answer."""
    from mm.sequence import Vocab

    tok = qwen2_tokenizer()
    tok.eos_token = "<|endoftext|>"
    v = Vocab(tok)
    assert v.eos == tok.convert_tokens_to_ids("<|endoftext|>")
    assert v.stop_ids == sorted([v.eos, tok.convert_tokens_to_ids("<|im_end|>")])
