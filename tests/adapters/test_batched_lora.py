"""BatchedLoRALinear against a row-by-row reference: every way a step's rows can be grouped (long
runs, one adapter, interleaved adapters padded into batched matmuls) gives each row base(x) plus
its own adapter's update, and rows without an adapter exactly base(x)."""

from __future__ import annotations

import pytest
import torch

from ember.adapters.batched_lora import LoRABatch, BatchedLoRALinear


@pytest.mark.parametrize("slots, kind", [
    ([0] * 20 + [1] * 20 + [-1] * 5 + [2] * 17, "runs"),    # prefill-like: long runs, views only
    ([0, 1, -1, 2, 0, 2, 1, 1, -1, 0], "bmm"),              # decode-like: interleaved, padded groups
    ([1, 1, -1, 1], "single"),                              # one adapter: rows gathered
    ([-1, -1, -1], "none"),
])
def test_each_row_gets_its_own_adapter(slots, kind) -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 48)
    batch = LoRABatch()
    layer = BatchedLoRALinear(base, 4, 4, batch)
    updates = {}
    for s, r in enumerate([4, 2, 3]):  # slot 3 never filled: its weights stay zero
        a, b, scaling = torch.randn(r, 32), torch.randn(48, r), 0.5 + s
        layer.set_slot(s, a, b, scaling)
        updates[s] = lambda x, a=a, b=b, scaling=scaling: (x @ a.t()) @ b.t() * scaling
    layer.set_slot(0, torch.randn(4, 32), torch.randn(48, 4), 9.0)  # refilled: the old weights must go
    a0, b0 = torch.randn(2, 32), torch.randn(48, 2)
    layer.set_slot(0, a0, b0, 1.5)
    updates[0] = lambda x: (x @ a0.t()) @ b0.t() * 1.5
    x = torch.randn(len(slots), 32)
    batch.set_rows(slots, torch.device("cpu"))
    got = {"runs": batch.runs is not None, "single": batch.single is not None, "none": not batch.active}
    assert got.get(kind, batch.index is not None)
    y = layer(x)
    with torch.no_grad():
        plain = base(x)
    for i, s in enumerate(slots):
        want = plain[i] if s < 0 else plain[i] + updates[s](x[i])
        if s < 0:
            assert torch.equal(y[i], want)
        else:
            torch.testing.assert_close(y[i], want, rtol=1e-5, atol=1e-4)  # values ~30: fp32 rounding
    batch.clear()
    assert torch.equal(layer(x), plain)  # after the step: the base layer alone
