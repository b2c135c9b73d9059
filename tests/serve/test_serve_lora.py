"""`ember serve --lora-modules`: adapters as models of their own, picked by `model`, many in one batch.

Answers through the official openai client must equal the engine serving each adapter alone
(merged, tests/engine/test_multi_lora.py's reference); /v1/models lists the adapters with the
base as parent; adapters load and unload at run time behind --allow-runtime-lora-updating.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from ember.commands.serve import ServeConfig, ServeConfigError
from ember.engine import LLM, SamplingParams
from ember.serve import running
from tests.engine.test_multi_lora import adapters  # noqa: F401
from tests.serve.conftest import make_app

PROMPT = "The for statement"
N = 8


def alone(tiny_dir, adapter=None) -> str:
    llm = LLM(tiny_dir, adapter=adapter, num_kv_blocks=128)
    return llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=N, ignore_eos=True))[0].outputs[0].text


@pytest.fixture(scope="module")
def lora_server(tiny_dir, adapters):  # noqa: F811
    app = make_app(tiny_dir, lora_modules={"a0": adapters[0], "a1": adapters[1]}, max_loras=2, max_lora_rank=8,
                   allow_runtime_lora_updating=True)
    with running(app) as url:
        yield url


def test_models_lists_each_adapter_with_the_base_as_parent(lora_server) -> None:
    client = openai.OpenAI(base_url=lora_server + "/v1", api_key="unused", max_retries=0)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "a0", "a1"}
    assert cards["tiny"].parent is None and cards["a0"].parent == "tiny" and cards["a1"].parent == "tiny"
    assert client.models.retrieve("a1").root == "a1"  # the served name, never the adapter's folder


def test_concurrent_requests_for_different_adapters_match_each_alone(lora_server, tiny_dir, adapters) -> None:  # noqa: F811
    client = openai.AsyncOpenAI(base_url=lora_server + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def ask(model: str):
        return await client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0,
                                               extra_body={"ignore_eos": True})

    async def all_at_once():
        return await asyncio.gather(*(ask(m) for m in ["a0", "tiny", "a1", "a0", "a1", "tiny"]))

    outs = asyncio.run(all_at_once())
    want = {"a0": alone(tiny_dir, adapters[0]), "a1": alone(tiny_dir, adapters[1]), "tiny": alone(tiny_dir)}
    assert len(set(want.values())) == 3  # each adapter says something else
    for out in outs:
        assert out.choices[0].text == want[out.model]
    chat = openai.OpenAI(base_url=lora_server + "/v1", api_key="unused", max_retries=0).chat.completions.create(
        model="a1", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model == "a1"


def test_unknown_model_is_404_naming_what_is_served(lora_server) -> None:
    client = openai.OpenAI(base_url=lora_server + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="`a9` does not exist: this server serves `tiny`, `a0`, `a1`"):
        client.completions.create(model="a9", prompt="x", max_tokens=2)


def test_adapters_load_and_unload_at_run_time(lora_server, tiny_dir, adapters, tmp_path) -> None:  # noqa: F811
    post = lambda route, body: httpx.post(f"{lora_server}/v1/{route}", json=body, timeout=60)  # noqa: E731
    r = post("load_lora_adapter", {"lora_name": "a5", "lora_path": str(adapters[5])})
    assert r.status_code == 200 and "a5" in r.text
    client = openai.OpenAI(base_url=lora_server + "/v1", api_key="unused", max_retries=0, timeout=120)
    out = client.completions.create(model="a5", prompt=PROMPT, max_tokens=N, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == alone(tiny_dir, adapters[5])
    for body, param, words in [({"lora_name": "a5", "lora_path": str(adapters[6])}, "lora_name", "already in use"),
                               ({"lora_name": "tiny", "lora_path": str(adapters[6])}, "lora_name", "already in use"),
                               ({"lora_name": "x", "lora_path": str(tmp_path / "none")}, "lora_path", "not a folder"),
                               ({"lora_name": "x", "lora_path": str(tmp_path)}, "lora_path", "adapter_config.json")]:
        r = post("load_lora_adapter", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param and words in r.json()["error"]["message"]
    assert post("unload_lora_adapter", {"lora_name": "a5"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="a5", prompt="x", max_tokens=2)
    r = post("unload_lora_adapter", {"lora_name": "a5"})
    assert r.status_code == 404 and "cannot be found" in r.json()["error"]["message"]
    # the name can come back with another adapter: a new id, so nothing of the old one is reused
    assert post("load_lora_adapter", {"lora_name": "a5", "lora_path": str(adapters[6])}).status_code == 200
    out = client.completions.create(model="a5", prompt=PROMPT, max_tokens=N, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == alone(tiny_dir, adapters[6])


def test_runtime_routes_need_the_flag(server) -> None:
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"})
    assert r.status_code == 404


def test_lora_modules_flag_errors(tiny_dir, tmp_path) -> None:  # noqa: F811
    for value, words in [("noequals", "NAME=PATH"), ("a=" + str(tmp_path / "none"), "not a folder")]:
        with pytest.raises(ServeConfigError, match=words):
            ServeConfig(model=tiny_dir, lora_modules=[value])
    with pytest.raises(ServeConfigError, match="twice"):
        ServeConfig(model=tiny_dir, lora_modules=[f"a={tmp_path}", f"a={tmp_path}"])


def test_openapi_documents_the_lora_routes(lora_server) -> None:
    doc = httpx.get(lora_server + "/openapi.json").json()
    body = doc["paths"]["/v1/load_lora_adapter"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].rsplit("/", 1)[1] in doc["components"]["schemas"]
    assert "enum" not in doc["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["anyOf"][0]


def test_runtime_updates_are_refused_with_replicas(tiny_dir) -> None:  # noqa: F811
    with pytest.raises(ServeConfigError, match="one replica's adapters only"):
        ServeConfig(model=tiny_dir, replicas=2, allow_runtime_lora_updating=True)


def test_lora_with_tensor_parallel_is_refused() -> None:
    from ember.engine.config import EngineConfig, EngineConfigError

    with pytest.raises(EngineConfigError, match="enable_lora with tensor or pipeline parallel"):
        EngineConfig(enable_lora=True, tensor_parallel_size=2)
