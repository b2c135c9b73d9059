"""Mixtures: the spec syntax, exact token shares, and a schedule state that resumes."""

from __future__ import annotations

import pytest

from ember.data.mixture import MixtureSchedule, parse_mixture, prepare_mixture
from ember.data.sources import DataSourceError


def test_bundled_is_seventy_percent_prose_thirty_code() -> None:
    prose, code = parse_mixture(["bundled"])
    assert (prose.paths, prose.weight, code.paths, code.weight) == (("bundled-prose",), 0.7, ("bundled-code",), 0.3)
    a, b = parse_mixture(["docs/@2", "src/,x.jsonl@1"])
    assert a.paths == ("docs/",) and b.paths == ("src/", "x.jsonl") and (a.weight, b.weight) == (2, 1)


@pytest.mark.parametrize("items, needle", [
    (["a/@0.5", "b/"], "every data item or to none"),
    (["a/@much"], "must be a number"),
    (["a/@-1"], "must be positive"),
    ([], "no data given"),
])
def test_bad_mixture_specs(items, needle) -> None:
    with pytest.raises(DataSourceError, match=needle):
        parse_mixture(items)


def test_schedule_shares_are_exact_and_resume() -> None:
    s = MixtureSchedule([0.7, 0.3])
    picks = [s.next() for _ in range(1000)]
    for k in range(1, 1001):
        assert abs(picks[:k].count(0) - 0.7 * k) < 1  # exact up to rounding at every prefix
    state = s.state_dict()
    ahead = [s.next() for _ in range(50)]
    t = MixtureSchedule([0.7, 0.3])
    t.load_state_dict(state)
    assert [t.next() for _ in range(50)] == ahead
    with pytest.raises(DataSourceError, match="same --data"):
        MixtureSchedule([1.0]).load_state_dict(state)


def test_prepared_shards_are_reused_until_the_source_changes(corpus, tok, tmp_path) -> None:
    prose, code = corpus
    comps = parse_mixture([f"{prose}@0.7", f"{code}@0.3"])
    first = prepare_mixture(comps, tok, tmp_path, show_progress=False)
    stamp = (first[0] / "manifest.json").stat().st_mtime_ns
    prepare_mixture(comps, tok, tmp_path, show_progress=False)
    assert (first[0] / "manifest.json").stat().st_mtime_ns == stamp  # reused
    (prose / "new.txt").write_text("A new document appears in the prose folder.\n")
    try:
        prepare_mixture(comps, tok, tmp_path, show_progress=False)
        assert (first[0] / "manifest.json").stat().st_mtime_ns != stamp  # rebuilt
    finally:
        (prose / "new.txt").unlink()
