"""The one rule every check compares two computations of the same numbers with."""

from __future__ import annotations

import torch

from neuronpatch.tolerance import CHECK_RTOL, agree, check_rtol, close


def test_the_tolerance_is_relative_to_the_wanted_scale_plus_one():
    want = torch.tensor([0.0, 1000.0])
    # 1000 + 1 of scale: 0.09 is within 1e-4 of it, 0.11 is not (and is returned).
    assert agree(want, want + torch.tensor([0.09, 0.0])) is None
    assert agree(want, want + torch.tensor([0.11, 0.0])) == torch.tensor(0.11).item()
    # Near zero the "+ 1" keeps float32 rounding of small numbers from failing a check.
    assert agree(torch.zeros(3), torch.full((3,), 5e-5)) is None


def test_close_never_broadcasts_a_wrong_shape():
    want = torch.ones(2, 3)
    assert close(want, torch.ones(2, 3))
    assert not close(want, torch.ones(3))  # would broadcast and agree
    assert not close(want, torch.ones(1, 2, 3))


def test_reduced_precision_widens_to_four_epsilons_of_the_dtype():
    assert check_rtol(torch.float32) == check_rtol(torch.float64) == CHECK_RTOL
    assert check_rtol(torch.bfloat16) == 4 * torch.finfo(torch.bfloat16).eps == 0.03125
    assert check_rtol(torch.float16) == 4 * torch.finfo(torch.float16).eps
