"""NgramProposer: prompt-lookup drafts, no model involved.

For n from prompt_lookup_max down to prompt_lookup_min, take the sequence's last n tokens and find
their latest earlier occurrence in prompt + output; the k tokens that followed it are the draft.
Workloads that copy from their input (answers quoting retrieved passages, code edits) continue
such matches for many tokens, and a wrong draft costs only its verification rows. The draft is a
deterministic function of the tokens, so its proposal distribution q is a point mass.

The search runs in C: the tokens as int32 bytes, `bytes.rfind` of the tail's bytes, keeping only
hits aligned to a token.
"""

from __future__ import annotations

from array import array


class NgramProposer:
    """Drafts up to k tokens by prompt lookup (see the module docstring)."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.lo, self.hi = prompt_lookup_min, prompt_lookup_max

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """The continuation of the longest tail n-gram's latest earlier match ([] when none)."""
        L = len(token_ids)
        if k < 1 or L < self.lo + 1:
            return []
        data = array("i", token_ids).tobytes()
        for n in range(min(self.hi, L - 1), self.lo - 1, -1):
            tail = data[4 * (L - n):]
            end = 4 * (L - 1)  # a match must end before the last token: the tail itself is not earlier
            while True:
                at = data.rfind(tail, 0, end)
                if at < 0:
                    break
                if at % 4 == 0:
                    start = at // 4 + n
                    return list(token_ids[start:start + k])
                end = at + len(tail) - 1
        return []
