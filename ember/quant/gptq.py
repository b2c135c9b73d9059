"""GPTQ (Frantar et al. 2022): quantize a layer's columns one by one, spreading each rounding
error over the columns not yet quantized, weighted by the inverse Hessian of the layer's
squared output error on calibration inputs.

For a linear layer W (out, in) with inputs X (tokens, in), the objective is ||W X^T - Q X^T||^2
and its Hessian is H = 2 X^T X / tokens. The algorithm:

    H += damp * mean(diag H) * I                (1 % by default; dead inputs get H_ii = 1, W_:,i = 0)
    U = cholesky(H^-1)^T                        (upper: row i holds what column i's error feeds)
    for each block of 128 columns (lazy batch update):
        for column i: q = quant(w_i); e = (w_i - q) / U_ii; W[:, i+1:block_end] -= e U[i, i+1:block_end]
        W[:, block_end:] -= E U[block, block_end:]       (one matmul per block)

Group parameters (scale, zero) are fixed when the first column of a group is reached, from the
error-updated weights. With act-order, columns are visited by decreasing H_ii and the group of
each original column is recorded in g_idx (AutoGPTQ's desc_act).

    H = hessian of inputs; gq = gptq_quantize(linear.weight, H, bits=4, group_size=128)
    results = gptq_quantize_model(model, calibration_ids, QuantConfig(method="gptq"))
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ember.quant.calibration import BlockRunner, InputCapture
from ember.quant.rtn import GroupQuantized, check_bits, group_params, quantize_to_grid

log = logging.getLogger(__name__)

# Linears of a block in the order their inputs depend on each other ("true sequential"):
# a group is quantized before the inputs of the next group are collected.
SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj", "w1", "w3"),
                     ("down_proj", "w2"))


class HessianAccumulator:
    """Running H = 2 X^T X / n over every input row a layer receives."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        total = self.n + x.shape[0]
        self.H *= self.n / total
        self.H += (2.0 / total) * (x.T @ x)
        self.n = total


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128,
                  sym: bool = False, act_order: bool = False, damp_percent: float = 0.01,
                  block_size: int = 128) -> GroupQuantized:
    """GPTQ-quantize one weight (out, in) given the Hessian (in, in) of its inputs."""
    check_bits(bits)
    W = weight.detach().double().clone()
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp_percent * torch.mean(torch.diag(H)) * torch.eye(in_f, dtype=H.dtype, device=H.device)
    U = _inverse_cholesky_upper(H)

    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device)
    n_groups = -(-in_f // gs)
    scales = torch.zeros(n_groups, out_f, dtype=torch.float16, device=W.device)
    zeros = torch.zeros(n_groups, out_f, dtype=torch.int32, device=W.device)
    scale = zero = None
    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        W1 = W[:, b0:b1].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % gs == 0:
                # The group's columns from here on, as updated so far (in-block updates included).
                group = W1[:, i:i + gs]
                if group.shape[1] < gs and b1 < in_f:
                    group = torch.cat([group, W[:, b1:b1 + gs - group.shape[1]]], dim=1)
                scale, zero = group_params(group.float(), bits, sym)
                scales[col // gs], zeros[col // gs] = scale.half(), zero.int()
            w = W1[:, i]
            q = quantize_to_grid(w.float().unsqueeze(1), scale, zero, bits).squeeze(1)
            codes[:, col] = q.to(torch.uint8)
            dq = ((q - zero) * scale).double()
            err = (w - dq) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]

    # Codes and groups were produced in visiting order; map back to the layer's columns.
    inv = torch.argsort(perm)
    g_idx = (torch.arange(in_f, device=W.device) // gs)[inv].int()
    return GroupQuantized(codes[:, inv].contiguous(), scales, zeros, g_idx, bits, gs)


def _inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, damping further if H is not positive definite."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    extra = 0.0
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + extra * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        extra = max(extra * 10, 1e-2 * float(torch.mean(torch.diag(H))))
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even after extra damping")


def sequential_groups(linears: dict[str, nn.Linear]) -> list[list[str]]:
    """The block's linears (full names) in dependency order; unknown names go last, together."""
    groups, seen = [], set()
    for suffixes in SEQUENTIAL_GROUPS:
        names = [n for n in linears if n.rsplit(".", 1)[-1] in suffixes]
        if names:
            groups.append(names)
            seen.update(names)
    rest = [n for n in linears if n not in seen]
    return groups + ([rest] if rest else [])


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, input_ids: torch.Tensor, linears: dict[str, nn.Linear],
                        bits: int, group_size: int, sym: bool = False, act_order: bool = False,
                        damp_percent: float = 0.01) -> dict[str, GroupQuantized]:
    """GPTQ for every layer in `linears`, block by block and group by group.

    The model's weights are replaced by their quantized values as it goes, so every layer
    is calibrated on the inputs the quantized model will really produce.
    """
    runner = BlockRunner(model, input_ids)
    results: dict[str, GroupQuantized] = {}
    for idx, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{idx}."
        mine = {n: m for n, m in linears.items() if n.startswith(prefix)}
        for group in sequential_groups(mine):
            acc = {n: HessianAccumulator(mine[n].in_features, mine[n].weight.device) for n in group}
            with InputCapture({n: mine[n] for n in group}, lambda n, x: acc[n].add(x)):
                runner.run(layer)
            for n in group:
                if acc[n].n == 0:  # an expert no calibration token was routed to
                    log.warning("GPTQ: %s saw no calibration tokens; using round-to-nearest", n)
                    acc[n].H = torch.eye(mine[n].in_features, dtype=torch.float64)
                gq = gptq_quantize(mine[n].weight, acc[n].H, bits, group_size, sym, act_order, damp_percent)
                results[n] = gq
                mine[n].weight.copy_(gq.dequantize(mine[n].weight.dtype))
        runner.advance(layer)
        log.info("GPTQ: block %d/%d done", idx + 1, len(model.model.layers))
    return results
