"""TokenMasker: each step's allowed-token masks of the constrained requests, and applying them.

    masker = TokenMasker(vocab_size)
    pending = masker.start([(row, req.matcher), ...])      # before the forward pass: runs beside it
    logits = ...                                            # the model's forward
    bitmask = pending.result()                              # (rows, ceil(V / 32)) int32, bit t = allowed
    apply_token_mask(logits, rows, bitmask, eos_ids)        # disallowed -> -inf, before sampling/logprobs

A matcher's mask depends only on the tokens it has accepted, all known when the step is
scheduled, so the masks are computed on a background thread (llguidance releases the GIL and
fills the whole batch with its own thread pool) while torch runs the forward pass. A row whose
mask allows nothing (a matcher in its error state) is given EOS only, so it ends instead of
sampling from an all -inf row.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import llguidance


class TokenMasker:
    """Computes a batch of masks off the main thread; see the module docstring."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._thread: ThreadPoolExecutor | None = None
        self._executor: llguidance.LLExecutor | None = None

    def start(self, matchers: list[llguidance.LLMatcher]) -> Future:
        """Masks of these matchers, in order, as a future of a (len, words) int32 tensor."""
        if self._thread is None:
            import llguidance

            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-masks")
            self._executor = llguidance.LLExecutor()
        return self._thread.submit(self._fill, matchers)

    def _fill(self, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        bitmask = torch.zeros(len(matchers), self.words, dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                               self.words * 4, len(matchers))
        return bitmask


_BITS = torch.arange(32, dtype=torch.int32)


def unpack_mask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R, words) int32 -> (R, vocab_size) bool, True where the token is allowed."""
    bits = (bitmask.unsqueeze(-1) >> _BITS) & 1  # (R, words, 32)
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_token_mask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor,
                     eos_token_ids: list[int]) -> torch.Tensor:
    """A copy of logits (R, V) with disallowed tokens of `rows` at -inf (bitmask row j -> rows[j])."""
    allowed = unpack_mask(bitmask, logits.shape[-1]).to(logits.device)
    empty = ~allowed.any(dim=-1)
    if bool(empty.any()) and eos_token_ids:
        allowed[empty.nonzero().squeeze(1)[:, None], torch.tensor(eos_token_ids)[None, :]] = True
    out = logits.clone()
    idx = torch.tensor(rows, device=logits.device)
    out[idx] = out[idx].masked_fill(~allowed, float("-inf"))
    return out
