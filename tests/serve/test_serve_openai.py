"""The official `openai` client, unchanged, against ember serve: completions, chat, streaming,
logprobs, usage, sampling fields; outputs equal the offline engine's on the same weights."""

from __future__ import annotations

import math

import httpx
import pytest

from ember.engine import LLM, SamplingParams

PROMPTS = ["def fib(n):", "A tuple is"]


@pytest.fixture(scope="module")
def offline(tiny_dir) -> LLM:
    return LLM(tiny_dir, num_kv_blocks=256)


def test_models_lists_the_served_name_and_context(client, tiny_dir) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].model_extra["max_model_len"] == 512
    assert client.models.retrieve("tiny").id == "tiny"
    # root names the served model, never the folder the server loaded it from
    cards = [models[0].model_dump(), httpx.get(str(client.base_url) + "models/tiny").json()]
    for card in cards:
        assert card["root"] == "tiny"
        assert str(tiny_dir) not in str(card)


def test_completions_match_the_offline_engine(client, offline, tokenizer) -> None:
    want = offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, n=2))
    got = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=12, temperature=0, n=2)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]  # choice i * n + j
    for c in got.choices:
        out = want[c.index // 2].outputs[c.index % 2]
        assert c.text == out.text and c.finish_reason == out.finish_reason
    n_prompt = sum(len(tokenizer.encode(p)) for p in PROMPTS)
    n_out = sum(len(o.token_ids) for w in want for o in w.outputs)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (n_prompt, n_out)
    assert got.usage.total_tokens == n_prompt + n_out


def test_token_id_prompts_and_echo(client, tokenizer) -> None:
    ids = [tokenizer.encode(p) for p in PROMPTS]
    by_text = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    one = client.completions.create(model="tiny", prompt=ids[0], max_tokens=6, temperature=0, echo=True)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert one.choices[0].text == tokenizer.decode(ids[0]) + by_text.choices[0].text


def test_streaming_concatenates_to_the_whole_response(client) -> None:
    whole = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_whole_and_streamed(client, offline) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    want = offline.chat(messages, SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10, temperature=0)
    assert whole.choices[0].message.content == want.text and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_content_parts_render_like_a_string(client) -> None:
    common = dict(model="tiny", max_tokens=6, temperature=0)
    a = client.chat.completions.create(messages=[{"role": "user", "content": "Hi there"}], **common)
    b = client.chat.completions.create(messages=[{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}],
                                       **common)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(client) -> None:
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go on."}],
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 512


def test_completion_logprobs_legacy_shape(client, hf_model, tokenizer) -> None:
    import torch

    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=3,
                                  echo=True)
    lp = r.choices[0].logprobs
    ids = tokenizer.encode(PROMPTS[0])
    n = len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n + 4
    assert "".join(lp.tokens[:n]) == tokenizer.decode(ids)
    assert lp.text_offset[1] == len(lp.tokens[0])
    for i in range(1, n + 4):
        top = lp.top_logprobs[i]
        # the chosen token + the top 3, keyed by text (ids decoding to the same text share a key)
        assert 1 <= len(top) <= 4 and lp.token_logprobs[i] <= max(top.values()) + 1e-6
    for i in range(n, n + 4):  # greedy: each generated token is its position's best
        assert lp.token_logprobs[i] == pytest.approx(max(lp.top_logprobs[i].values()))
    with torch.no_grad():  # the echoed prompt's log-probabilities are transformers'
        logp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1)
    ref = [logp[i - 1, ids[i]].item() for i in range(1, n)]
    assert lp.token_logprobs[1:n] == pytest.approx(ref, abs=1e-4)


def test_chat_logprobs_openai_shape(client) -> None:
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode())
        values = [x.logprob for x in t.top_logprobs]
        assert values == sorted(values, reverse=True) and t.logprob == pytest.approx(values[0])
        assert all(math.isfinite(v) and v <= 0 for v in values)


def test_sampling_fields_reach_the_engine(client, tokenizer) -> None:
    def text(**kw) -> str:
        body = dict(model="tiny", prompt="import os\n", max_tokens=12)
        return client.completions.create(**{**body, **kw}).choices[0].text

    greedy = text(temperature=0)
    assert text(temperature=1.0, seed=7) == text(temperature=1.0, seed=7)
    assert len({text(temperature=1.0, seed=s) for s in range(4)}) > 1
    assert text(temperature=1.0, extra_body={"top_k": 1}) == greedy  # vLLM's extra names
    forced = tokenizer.encode(" x", add_special_tokens=False)[-1]
    r = client.completions.create(model="tiny", prompt="a", max_tokens=5, temperature=0,
                                  logit_bias={str(forced): 100})
    assert tokenizer.encode(r.choices[0].text, add_special_tokens=False) == [forced] * 5
    stop = greedy[3:6]
    r = client.completions.create(model="tiny", prompt="import os\n", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == greedy[:greedy.find(stop)] and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    first = tokenizer.encode(greedy, add_special_tokens=False)[2]
    r = client.completions.create(model="tiny", prompt="import os\n", max_tokens=12, temperature=0,
                                  extra_body={"stop_token_ids": [first], "include_stop_str_in_output": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == first


def test_tokenize_and_detokenize(server, tokenizer, client) -> None:
    r = httpx.post(server.url + "/tokenize", json={"prompt": "def f(x):", "return_token_strs": True}).json()
    assert r["tokens"] == tokenizer.encode("def f(x):") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 512 and len(r["token_strs"]) == r["count"]
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "def f(x):"
    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    usage = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens


def test_streamed_choices_of_several_prompts_and_n(client) -> None:
    body = dict(model="tiny", prompt=PROMPTS, max_tokens=8, temperature=0.9, seed=3, n=2)
    whole = client.completions.create(**body)
    texts: dict[int, str] = {}
    finished = set()
    for chunk in client.completions.create(**body, stream=True):
        (c,) = chunk.choices  # one choice per chunk, as OpenAI streams them
        texts[c.index] = texts.get(c.index, "") + c.text
        if c.finish_reason:
            finished.add(c.index)
    assert finished == {0, 1, 2, 3}
    assert texts == {c.index: c.text for c in whole.choices}


def test_streamed_logprobs(client) -> None:
    messages = [{"role": "user", "content": "Name a loop."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2)
    streamed = [t for c in client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                          logprobs=True, top_logprobs=2, stream=True)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in whole.choices[0].logprobs.content]
    echo = [c.choices[0] for c in client.completions.create(model="tiny", prompt="x = 1", max_tokens=3, temperature=0,
                                                            logprobs=1, echo=True, stream=True) if c.choices]
    assert echo[0].logprobs.token_logprobs[0] is None  # the echoed prompt comes first
    offsets = [o for c in echo for o in c.logprobs.text_offset]
    assert offsets == sorted(offsets) and "".join(c.text for c in echo).startswith("x = 1")
