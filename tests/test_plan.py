"""Plans: text the model writes between a prompt and its image (mm.sequence.ImageTemplate.plan_tokens).

The layout (plan tokens and the begin token are next-token targets, dropped with the prompt for CFG), the
generation source's ``plan.txt``, prompt dropout taking a plan's targets with it, and a small model that learns
to write prompt-dependent plans, stops at the image, and draws after what it wrote.
"""

from __future__ import annotations

import io
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from data.sources import BuildContext, SourceConfig, build_samples
from data.stream import BadSample
from mm.batch import SampleShapes, collate
from mm.images import ImagePreprocess
from mm.model.heads.base import unconditional
from mm.model.unified import UnifiedModel
from mm.schema import ConfigError
from mm.sequence import IGNORE, ImageTemplate, image_generation_sample

TEMPLATE = ImageTemplate("flow", 8, 1, (4,), begin="bog", plan_tokens=4)


def _flow(cfg, **changes):
    return replace(cfg, heads={"flow": replace(cfg.heads["flow"], **changes)})


def test_plan_tokens_and_the_image_opening_are_the_targets(vocab):
    prompt, plan = "draw the digit 3", "3 . 3" if "." in vocab.tokenizer.get_vocab() else "3 3 3"
    plain = image_generation_sample(vocab, TEMPLATE, None, prompt)
    s = image_generation_sample(vocab, TEMPLATE, None, prompt, plan=plan)
    plan_ids = vocab.encode(plan)
    n = len(plain) - 5  # the plain layout up to <|assistant|>: prompt ids, then <bog> and 4 slots
    assert s.input_ids == plain.input_ids[:n] + plan_ids + plain.input_ids[n:]
    assert all(t == IGNORE for t in plain.targets)  # no plan: no text targets (a drawing has none)
    written = [(i, t) for i, t in enumerate(s.targets) if t != IGNORE]
    # logits at <|assistant|> and at each plan token predict the plan, then <begin_of_generation>
    assert written == [(n - 1 + k, tok) for k, tok in enumerate(plan_ids + [vocab.bog])]
    assert s.prompt_mask[n : n + len(plan_ids)] == [True] * len(plan_ids)  # dropped with the prompt
    (u,) = unconditional([s], vocab.pad)
    assert u.input_ids[n : n + len(plan_ids)] == [vocab.pad] * len(plan_ids)
    assert u.input_ids[n + len(plan_ids) :] == s.input_ids[n + len(plan_ids) :]
    empty = image_generation_sample(vocab, TEMPLATE, None, prompt, plan="")  # draw at once
    assert empty.input_ids == plain.input_ids and [t for t in empty.targets if t != IGNORE] == [vocab.bog]
    with pytest.raises(ValueError, match="plan of 5 tokens.*at most 4"):
        image_generation_sample(vocab, TEMPLATE, None, prompt, plan="3 3 3 3 3")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_generation_source_reads_plans_only_when_asked(vocab):
    shapes = SampleShapes(und_preprocess=ImagePreprocess("pad", 8, 3), und_tokens=4, gen_templates={"flow": TEMPLATE})
    ctx = BuildContext(vocab, shapes, 256, 10**6, random.Random(0))
    raw = {"__key__": "k", "png": _png(), "txt": b"draw the digit 3", "plan.txt": b"3 3"}
    planned = SourceConfig(name="g", kind="generation", options={"plan": True})
    (s,) = build_samples(planned, raw, ctx)
    assert [t for t in s.targets if t != IGNORE] == vocab.encode("3 3") + [vocab.bog]
    (s,) = build_samples(SourceConfig(name="g", kind="generation"), raw, ctx)  # not asked: not read
    assert all(t == IGNORE for t in s.targets)
    (s,) = build_samples(planned, {k: v for k, v in raw.items() if k != "plan.txt"}, ctx)  # none: draw at once
    assert [t for t in s.targets if t != IGNORE] == [vocab.bog]
    with pytest.raises(BadSample, match="5 tokens > plan_tokens=4") as e:
        build_samples(planned, raw | {"plan.txt": b"3 3 3 3 3"}, ctx)
    assert e.value.reason == "plan_too_long"
    no_plans = replace(shapes, gen_templates={"flow": replace(TEMPLATE, plan_tokens=0)})
    with pytest.raises(ValueError, match="writes no plan.*plan_tokens"):
        build_samples(planned, raw, BuildContext(vocab, no_plans, 256, 10**6, random.Random(0)))


def test_plan_tokens_config_is_checked(small_cfg):
    with pytest.raises(ConfigError, match="plan_tokens=-1.*must be >= 0"):
        replace(small_cfg.model.heads["flow"], plan_tokens=-1)


def test_a_dropped_prompt_takes_its_plan_targets_along(small_cfg, vocab):
    model = UnifiedModel(_flow(small_cfg.model, plan_tokens=4), vocab)
    t = model.heads["flow"].template
    sample = image_generation_sample(vocab, t, torch.rand(1, 8, 8), "draw the digit 3", plan="3 3")
    batch = collate([[sample] for _ in range(300)], 40, vocab.pad)
    out = model.add_draws(batch, torch.Generator().manual_seed(0))
    dropped = (out.input_ids != batch.input_ids).any(1)
    assert 0.05 < dropped.float().mean() < 0.15  # prompt_dropout 0.1
    assert (out.targets[dropped] == IGNORE).all()  # no plan is learnt from pads
    assert torch.equal(out.targets[~dropped], batch.targets[~dropped])
    counts = model.loss_counts(out)  # plans are their own loss: two plan tokens and <bog> per kept row
    assert counts["plan"] == 3 * int((~dropped).sum()) and counts["text"] == 0
    losses = model(out)
    assert float(losses["plan_count"]) == counts["plan"] and float(losses["text_count"]) == 0


def test_a_model_learns_to_write_plans_and_draws_after_them(small_cfg, vocab, one_thread):
    """Plans that depend on the prompt (and one empty): trained, the model writes each exactly and stops at the
    image; generate draws after the plan it wrote, as if that plan had been given."""
    torch.manual_seed(0)
    cfg = _flow(small_cfg.model, plan_tokens=4, prompt_dropout=0.0)
    model = UnifiedModel(cfg, vocab)
    t = model.heads["flow"].template
    plans = {"draw the digit 3": "3 3", "draw the digit 5": "5 1 5", "draw the digit 7": ""}
    rows = [[image_generation_sample(vocab, t, torch.rand(1, 8, 8), p, plan=plan)] for p, plan in plans.items()]
    batch = model.add_draws(collate(rows, 40, vocab.pad), torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    model.eval()
    prompts = list(plans)
    assert model.plan(prompts) == list(plans.values())
    noise = torch.randn(3, 1, 8, 8)
    given = model.head().generate(model, prompts, noise=noise, plans=list(plans.values()))
    assert torch.allclose(model.generate(prompts, noise=noise), given)
    assert not torch.allclose(model.head().generate(model, prompts, noise=noise, plans=["3 3"] * 3), given)
    with pytest.raises(ValueError, match="writes no plan"):
        UnifiedModel(small_cfg.model, vocab).plan(prompts)


def test_eval_reports_the_plan_each_image_was_drawn_after(small_cfg, vocab):
    from mm.eval.harness import generate_all

    torch.manual_seed(0)
    model = UnifiedModel(_flow(small_cfg.model, plan_tokens=3), vocab).eval()
    prompts = ["draw the digit 3", "draw the digit 5"]
    recipe = {"head": "flow", "steps": 2, "cfg_scale": 1.0}
    images, plans = generate_all(model, prompts, 2, recipe, seed=0, batch_size=1)
    written = model.plan(prompts)
    assert plans == [[written[0]] * 2, [written[1]] * 2]  # greedy: the same plan for each image of a prompt
    assert len(images) == 2 and all(len(imgs) == 2 for imgs in images)
    first = model.generate(prompts[:1], generator=torch.Generator().manual_seed(0), steps=2, cfg_scale=1.0)
    assert np.array_equal(images[0][0], first[0].numpy())  # drawn after the plan generate itself writes
