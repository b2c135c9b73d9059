"""Prompt lookup: the longest tail n-gram's latest earlier match, its continuation as the draft."""

from __future__ import annotations

from ember.engine.spec_decode.ngram import NgramProposer


def test_latest_earlier_match_of_the_longest_tail() -> None:
    p = NgramProposer(1, 3)
    #        0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [5, 6, 7, 1, 5, 6, 8, 2, 9, 5, 6]
    # tail [5, 6] (3-gram [9, 5, 6] has no earlier match): latest earlier match at 4 -> 8, 2, 9
    assert p.propose(tokens, 3) == [8, 2, 9]
    assert p.propose(tokens, 10) == [8, 2, 9, 5, 6]  # a continuation runs into the tail itself
    tokens = [1, 9, 5, 6, 3, 4, 9, 5, 6, 7, 7, 9, 5, 6]
    assert p.propose(tokens, 2) == [7, 7]  # [9, 5, 6] matches twice: the latest wins


def test_no_draft_without_an_earlier_match_or_below_the_minimum() -> None:
    assert NgramProposer(1, 3).propose([1, 2, 3, 4], 4) == []
    assert NgramProposer(2, 3).propose([1, 2, 3, 1, 4, 1], 4) == []  # only 1-grams repeat
    assert NgramProposer(1, 3).propose([1, 2, 3, 1, 4, 1], 2) == [4, 1]
    assert NgramProposer(1, 3).propose([7], 4) == [] and NgramProposer(1, 3).propose([1, 1, 1], 0) == []


def test_token_ids_that_share_bytes_do_not_match_across_tokens() -> None:
    # 256 = bytes 00 01 00 00, 1 = 01 00 00 00: an unaligned byte match must not count
    p = NgramProposer(1, 1)
    assert p.propose([256, 0, 7, 1], 2) == []
    assert p.propose([1, 3, 256, 0, 7, 1], 2) == [3, 256]
