import pytest
import torch

from mm.kernels.attention import block_causal_mask, cu_seqlens, packed_attention_inputs


def test_block_causal_mask():
    sid = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = block_causal_mask(sid)[0, 0]
    assert m[1, 0] and not m[0, 1]  # causal within a sample
    assert not m[2, 1] and m[4, 2]  # no attention across samples
    assert m[5, 5] and not m[5, 4]  # padding sees only padding (no NaN rows)


def test_cu_seqlens_splits_samples_padding_and_rows():
    sid = torch.tensor([[0, 0, 1, -1], [2, 2, 2, 2]])
    cu, longest = cu_seqlens(sid)
    assert cu.tolist() == [0, 2, 3, 4, 8] and longest == 4 and cu.dtype == torch.int32


def test_unknown_backend_named():
    with pytest.raises(KeyError, match="nope"):
        packed_attention_inputs("nope", torch.zeros(1, 2, 4), torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.gpu
def test_flash_varlen_matches_sdpa_mask():
    pytest.importorskip("flash_attn")
    from transformers import AutoModel, LlamaConfig

    cfg = LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=256, vocab_size=32)  # fmt: skip
    sdpa = AutoModel.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16).cuda().eval()
    flash = AutoModel.from_config(cfg, attn_implementation="flash_attention_2", dtype=torch.bfloat16).cuda().eval()
    flash.load_state_dict(sdpa.state_dict())
    sid = torch.tensor([[0] * 40 + [1] * 60 + [-1] * 28, [2] * 128], device="cuda")
    pos = torch.cat([torch.arange(40), torch.arange(60), torch.arange(28), torch.arange(128)]).view(2, 128).float()
    embeds = torch.randn(2, 128, 128, device="cuda", dtype=torch.bfloat16)
    outs = []
    for model in (sdpa, flash):
        e, p, kw = packed_attention_inputs(model.config._attn_implementation, embeds, pos.cuda(), sid)
        outs.append(model(inputs_embeds=e, position_ids=p, **kw).last_hidden_state.reshape(2, 128, -1))
    valid = sid >= 0
    torch.testing.assert_close(outs[0][valid], outs[1][valid], rtol=2e-2, atol=2e-2)
