"""A server with --speculative-config: answers as without it (greedy), and /metrics counts drafts."""

from __future__ import annotations

import json

import openai
import pytest

from ember.engine.spec_decode import SpeculativeConfigError
from ember.serve import running
from tests.serve.conftest import make_app, metric

SPEC = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1})


def test_speculative_server_matches_and_counts(tiny_dir, server) -> None:
    prompt = "def add(a, b): return a + b\ndef add(a, b): return a + b\ndef add("
    plain = openai.OpenAI(base_url=server.url + "/v1", api_key="x").completions.create(
        model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    app = make_app(tiny_dir, speculative_config=SPEC)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x")
        spec = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
        drafted = metric(url, "ember:spec_decode_num_draft_tokens_total")
        accepted = metric(url, "ember:spec_decode_num_accepted_tokens_total")
        steps = metric(url, "ember:spec_decode_num_drafts_total")
        rate = metric(url, "ember:spec_decode_draft_acceptance_rate")
    assert spec.choices[0].text == plain.choices[0].text
    assert spec.usage.completion_tokens == plain.usage.completion_tokens == 24
    assert drafted > 0 and steps > 0 and 0 <= accepted <= drafted
    assert rate == pytest.approx(accepted / drafted)


def test_a_bad_speculative_config_fails_the_app(tiny_dir) -> None:
    with pytest.raises(SpeculativeConfigError, match="method must be one of"):
        make_app(tiny_dir, speculative_config='{"method": "medusa", "num_speculative_tokens": 2}')
