"""Label grouping: one stable sort turns every query's positives into a segment.

After sorting the batch by label, the positives of the query at sorted position
p are exactly the sorted positions [lo_p, hi_p) (its class, itself included),
and its negatives are every other position. The kernels therefore need no
labels at all: a column k is a negative of row p iff k < lo_p or k >= hi_p.

Everything here is built from fixed-shape device ops (sort, cummax, cummin), so
grouping never synchronises the host with the GPU and is CUDA-graph capturable.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Groups", "group_labels"]


class Groups(NamedTuple):
    perm: torch.Tensor      # sorted position -> original index (int64, B)
    inv_perm: torch.Tensor  # original index -> sorted position (int64, B)
    lo: torch.Tensor        # first sorted position of the row's class (int32, B, sorted order)
    hi: torch.Tensor        # one past its last (int32, B, sorted order)
    valid: torch.Tensor     # query has a positive besides itself (bool, B, original order)


def group_labels(labels: torch.Tensor) -> Groups:
    """Group a 1-D integer label tensor into per-query positive segments."""
    n = labels.shape[0]
    device = labels.device
    sorted_labels, perm = torch.sort(labels.to(torch.int64), stable=True)
    pos = torch.arange(n, device=device, dtype=torch.int64)
    boundary = sorted_labels[1:] != sorted_labels[:-1]
    true1 = torch.ones(1, dtype=torch.bool, device=device)
    is_first = torch.cat([true1, boundary])
    is_last = torch.cat([boundary, true1])
    # lo: the latest class start at or before p; hi: the earliest class end after p.
    lo = torch.cummax(torch.where(is_first, pos, torch.zeros_like(pos)), dim=0).values
    ends = torch.where(is_last, pos + 1, torch.full_like(pos, n))
    hi = torch.flip(torch.cummin(torch.flip(ends, [0]), dim=0).values, [0])
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = pos
    valid_sorted = (hi - lo) >= 2
    valid = valid_sorted[inv_perm]
    return Groups(perm, inv_perm, lo.to(torch.int32), hi.to(torch.int32), valid)
