"""One matmul for several nn.Linear modules that read the same input (q/k/v, gate/up).

At decode shapes a matmul is bound by streaming its weight from memory, and one wide weight
streams faster than three narrow ones (ember/engine/weight_layout.py has the measurements).
`FusedLinears.fuse(modules, linear, column_major)` moves the modules' weights into one buffer
(row-major, or column-major for BLAS's matvec) and points each module's Parameter at its slice
of it, so memory is not duplicated and the modules keep working on their own (state_dict,
LoRA, quantization see the same tensors). `linear` is the F.linear-compatible function the
fused call uses (the engine passes its native matvec).

The fused call is used only without autograd (the buffer is not the modules' Parameters, so
gradients must go through the modules) and while it is still valid: every module is the same
plain nn.Linear object whose weight (and bias) still lives at its slice. Swapping a module (LoRA,
a quantized layer), assigning a new weight or hooking a module (quantizers' calibration does)
falls back to calling the modules one by one.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

LinearFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class FusedLinears:
    """y_1, ..., y_n = m_1(x), ..., m_n(x) as one F.linear over a shared weight buffer."""

    def __init__(self, modules: tuple[nn.Linear, ...], weight: torch.Tensor, bias: torch.Tensor | None,
                 linear: LinearFn) -> None:
        self.modules = modules
        self.weight = weight  # (sum of out_features, in_features)
        self.bias = bias
        self.linear = linear
        self.sizes = [m.out_features for m in modules]
        starts = [sum(self.sizes[:i]) for i in range(len(modules))]
        # Where each module's weight and bias must still live for the fused call to be valid.
        self.expected = [(weight[s].data_ptr(), weight.stride(), None if bias is None else bias[s].data_ptr())
                         for s in starts]

    @classmethod
    def fuse(cls, modules: tuple[nn.Module, ...], linear: LinearFn = F.linear,
             column_major: bool = True) -> "FusedLinears | None":
        """Fuse plain CPU nn.Linear modules with one input size and dtype; None if they cannot be."""
        if not all(type(m) is nn.Linear for m in modules):
            return None
        ws = [m.weight for m in modules]
        if len({(w.shape[1], w.dtype, w.device) for w in ws}) != 1 or ws[0].device.type != "cpu":
            return None
        has_bias = [m.bias is not None for m in modules]
        if any(has_bias) != all(has_bias):
            return None
        with torch.no_grad():
            if column_major:  # (in, sum out) contiguous, viewed as (sum out, in)
                weight = torch.cat([w.detach().t() for w in ws], dim=1).t()
            else:
                weight = torch.cat([w.detach() for w in ws], dim=0)
            bias = torch.cat([m.bias.detach() for m in modules]) if all(has_bias) else None
            start = 0
            for m in modules:
                end = start + m.out_features
                m.weight.data = weight[start:end]
                if bias is not None:
                    m.bias.data = bias[start:end]
                start = end
        return cls(tuple(modules), weight, bias, linear)

    def usable(self, modules: tuple[nn.Module, ...]) -> bool:
        """Whether to make the fused call now: still valid, and no autograd (the shared buffer is
        not the modules' Parameters, so gradients must go through the modules themselves)."""
        return not torch.is_grad_enabled() and self.valid(modules)

    def valid(self, modules: tuple[nn.Module, ...]) -> bool:
        """Whether `modules` are still exactly the fused ones, with weights in the shared buffer."""
        for m, mine, (w_ptr, w_stride, b_ptr) in zip(modules, self.modules, self.expected):
            if m is not mine or m._forward_hooks or m._forward_pre_hooks:
                return False
            params = m._parameters  # not m.weight: nn.Module's attribute lookup costs a decode step ~0.2 ms
            w, b = params["weight"], params.get("bias")
            if w.data_ptr() != w_ptr or w.stride() != w_stride:
                return False
            if b_ptr is not None and (b is None or b.data_ptr() != b_ptr):
                return False
        return True

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))
