"""The eval package's HTTP-backend acceptance, run against the real `ember serve` instead of the
in-test fake: the eval tests themselves, with their fixtures, but `server_url` is ember's server
(tests/serve/conftest.py). Log-likelihoods equal transformers' within 1e-4 through
/v1/completions (echo + logprobs on token ids), and each task gives the same numbers in process
and over HTTP."""

from __future__ import annotations

import pytest

from tests.eval import test_backends, test_eval_cli


def test_pair_loglikelihoods_match_transformers(request, hf_model, tiny_dir) -> None:
    test_backends.test_pair_loglikelihoods_match_transformers("remote", request, hf_model, tiny_dir)


def test_rolling_loglikelihood_matches_transformers(request, hf_model, tokenizer) -> None:
    test_backends.test_rolling_loglikelihood_matches_transformers("remote", request, hf_model, tokenizer)


def test_windowed_rolling_is_the_same_in_process_and_served(local, remote) -> None:
    test_backends.test_windowed_rolling_is_the_same_through_both_backends(local, remote)


def test_greedy_generation_is_the_same_in_process_and_served(local, remote) -> None:
    test_backends.test_greedy_generation_is_the_same_through_both_backends(local, remote)


@pytest.mark.parametrize("task, extra", test_eval_cli.TASKS, ids=[t for t, _ in test_eval_cli.TASKS])
def test_tasks_give_the_same_numbers_in_process_and_served(task, extra, tiny_dir, server_url, tmp_path,
                                                           capsys) -> None:
    test_eval_cli.test_in_process_and_http_give_the_same_numbers(task, extra, tiny_dir, server_url, tmp_path, capsys)


def test_max_tokens_zero_with_echo_scores_the_prompt(server_url, tokenizer) -> None:
    import httpx

    ids = tokenizer.encode("A list is an ordered sequence.")
    body = {"prompt": [ids], "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    zero = httpx.post(server_url + "/v1/completions", json=body).json()
    one = httpx.post(server_url + "/v1/completions", json={**body, "max_tokens": 1}).json()
    lp0, lp1 = zero["choices"][0]["logprobs"], one["choices"][0]["logprobs"]
    assert zero["choices"][0]["text"] == tokenizer.decode(ids) and zero["usage"]["completion_tokens"] == 0
    assert len(lp0["token_logprobs"]) == len(ids) and lp0["token_logprobs"] == lp1["token_logprobs"][:len(ids)]
