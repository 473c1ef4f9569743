"""UnifiedModel.loglikelihood (teacher forcing) and sampled answers.

log p(continuation | context, images) from left-padded rows equals the same quantity computed on packed
training rows (collate, several samples per row), with and without V2PE positions; the greedy flag
agrees with greedy decoding; sampling is seeded and reduces to greedy decoding at top_k=1.
"""

from __future__ import annotations

import pytest
import torch

from mm.batch import collate
from mm.config import with_overrides
from mm.model.unified import UnifiedModel
from mm.sequence import IGNORE, ROLE_ASSISTANT, ROLE_USER, conversation_sample

QUESTIONS = ["what digit is this ?", "<image> <image> which number is shown in the image ?", "draw the digit 3"]
CONTINUATIONS = ["7", "3 8", "what number is written here"]


def _model(cfg, vocab, v2pe: bool) -> UnifiedModel:
    if v2pe:
        cfg = with_overrides(cfg, ["model.v2pe.enabled=true", "model.v2pe.infer_delta=0.25"])
    torch.manual_seed(0)
    return UnifiedModel(cfg.model, vocab).eval()


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(1, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g), torch.rand(0, 3, 8, 8)]


def _packed_logp(model: UnifiedModel, images: list[torch.Tensor]) -> list[float]:
    """The same quantities from the training layout: conversation samples packed two to a row, summed log-softmax."""
    samples = []
    for imgs, q, c in zip(images, QUESTIONS, CONTINUATIONS):
        text = q if "<image>" in q else "<image>" * len(imgs) + "\n" + q
        s = conversation_sample(model.vocab, [(ROLE_USER, text), (ROLE_ASSISTANT, c)], list(imgs),
                                model.und.tokens_per_image)  # fmt: skip
        if model.position_policy.enabled:
            s.positions = model.position_policy.positions(s.kinds())
        samples.append(s)
    batch = collate([samples[:2], samples[2:]], 160, model.vocab.pad)
    with torch.no_grad():
        embeds = model._embed_und(model.embed_tokens(batch.input_ids), batch)
        hidden = model.decode(embeds, batch.position_ids, batch.attention(), batch.token_kinds,
                              spans=batch.spans).last_hidden_state  # fmt: skip
        logp = model.llm.get_output_embeddings()(hidden).float().log_softmax(-1)
    out = []
    for row, sample_ids in ((0, (0, 1)), (1, (2,))):
        for sid, c in zip(sample_ids, [CONTINUATIONS[i] for i in sample_ids]):
            cols = ((batch.sample_ids[row] == sid) & (batch.targets[row] != IGNORE)).nonzero()[:, 0]
            cols = cols[: len(model.vocab.encode(c))]  # the continuation's tokens, not the closing <eos>
            targets = batch.targets[row, cols]
            out.append(float(logp[row, cols].gather(-1, targets[:, None]).sum()))
    return out


@pytest.mark.parametrize("v2pe", [False, True])
def test_loglikelihood_equals_packed_teacher_forcing(small_cfg, vocab, v2pe):
    model = _model(small_cfg, vocab, v2pe)
    images = _images()
    with torch.no_grad():
        together = model.loglikelihood(images, QUESTIONS, CONTINUATIONS)
        alone = [model.loglikelihood([im], [q], [c])[0] for im, q, c in zip(images, QUESTIONS, CONTINUATIONS)]
    direct = _packed_logp(model, images)
    assert [ll for ll, _ in together] == pytest.approx(direct, abs=1e-4)
    assert [ll for ll, _ in alone] == pytest.approx(direct, abs=1e-4)  # left padding changes nothing
    assert all(ll < 0 for ll, _ in together)
    assert model.loglikelihood(images[:1], QUESTIONS[:1], [""]) == [(0.0, True)]
    with pytest.raises(ValueError, match="2 contexts for 1 continuations"):
        model.loglikelihood(images[:2], QUESTIONS[:2], CONTINUATIONS[:1])


def test_greedy_flag_agrees_with_greedy_decoding(small_cfg, vocab):
    model = _model(small_cfg, vocab, False)
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    questions = ["what digit is this ?"] * 4
    with torch.no_grad():
        first = model.answer(images, questions, max_new_tokens=1)
        assert all(first)  # a token, not an immediate end of answer (seeded weights)
        other = [next(w for w in ("0", "1") if w != f) for f in first]
        greedy = model.loglikelihood(images, questions, first)
        not_greedy = model.loglikelihood(images, questions, other)
    assert all(g for _, g in greedy) and not any(g for _, g in not_greedy)
    assert all(a >= b for (a, _), (b, _) in zip(greedy, not_greedy))


def test_sampling_is_seeded_and_top_k_1_is_greedy(small_cfg, vocab):
    model = _model(small_cfg, vocab, False)
    images = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    questions = ["what digit is this ?"] * 16

    def sampled(seed: int, **kw) -> list[str]:
        g = torch.Generator().manual_seed(seed)
        return model.answer(images, questions, max_new_tokens=3, do_sample=True, generator=g, **kw)

    with torch.no_grad():
        greedy = model.answer(images, questions, max_new_tokens=3)
        assert sampled(0) == sampled(0)
        assert sampled(0) != sampled(1)  # an untrained model's distribution is broad
        assert sampled(0, top_k=1) == greedy
        assert sampled(5, top_p=1e-6) == greedy  # the nucleus keeps the most likely token only
        assert sampled(0, temperature=2.0) != greedy
        with pytest.raises(ValueError, match="temperature > 0"):
            model.answer(images, questions, do_sample=True, temperature=0.0)
