"""The position policy: standard positions as V2PE's delta = 1 case, the V2PE rule itself."""

import random

import torch

from mm.positions import PositionPolicy, image_runs, next_position, sample_positions
from mm.sequence import TOKEN_GEN_IMAGE, TOKEN_TEXT, TOKEN_UND_IMAGE

T, U, G = TOKEN_TEXT, TOKEN_UND_IMAGE, TOKEN_GEN_IMAGE
VISUAL = frozenset({U, G})


def test_delta_one_is_the_standard_encoding():
    kinds = [T, T, U, U, U, T, T, G, G, T]
    for deltas in ([], [1.0, 1.0]):
        assert torch.equal(sample_positions(kinds, deltas, VISUAL), torch.arange(10, dtype=torch.float32))


def test_v2pe_rule_by_hand():
    kinds = [T, T, U, U, U, U, T, U, U, T]
    pos = sample_positions(kinds, [0.25, 0.5], VISUAL)
    # text 0,1; image 1: 1.25 1.5 1.75 2.0; text at ceil(2.0)+1 = 3; image 2: 3.5 4.0; text ceil(4)+1 = 5
    assert pos.tolist() == [0, 1, 1.25, 1.5, 1.75, 2.0, 3, 3.5, 4.0, 5]
    assert pos.dtype == torch.float32
    pos = sample_positions([T, U, U, U, T], [0.5], VISUAL)  # last visual 1.5 -> next text ceil(1.5)+1 = 3
    assert pos.tolist() == [0, 0.5, 1.0, 1.5, 3]


def test_runs_and_continuation():
    assert image_runs([T, U, U, T, G, G, G], VISUAL) == [(1, 3), (4, 7)]
    assert next_position(4.25, True) == 6.0 and next_position(4.0, False) == 5.0
    head = sample_positions([T, U, U], [0.25], VISUAL)
    tail = sample_positions([T, T], start=next_position(float(head[-1]), True))
    whole = sample_positions([T, U, U, T, T], [0.25], VISUAL)
    assert torch.equal(torch.cat([head, tail]), whole)


def test_policy_draws_from_its_set_and_is_fixed_at_inference():
    policy = PositionPolicy(frozenset({U}), train_deltas=(1.0, 0.5, 0.25), infer_delta=0.25)
    draws = policy.draw(200, random.Random(0))
    assert set(draws) == {1.0, 0.5, 0.25}
    assert policy.draw(3, random.Random(1)) == policy.draw(3, random.Random(1))
    pos = policy.positions([T, U, U, U, U, T])
    assert pos.tolist() == [0, 0.25, 0.5, 0.75, 1.0, 2.0]
    assert not PositionPolicy().enabled and policy.enabled
