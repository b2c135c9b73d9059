"""`ember serve --adapter`: the served model is the base with the PEFT adapter applied.

The reference is the naive decoder over `ember.load_model(base, adapter=...)`; the server must
give the same greedy tokens, and they must differ from the base model's (an adapter that is
silently dropped would pass an equality test against the base otherwise).
"""

from __future__ import annotations

import shutil

import openai
import pytest
import torch
import torch.nn as nn

import ember
from ember.adapters.lora import LoRAConfig, apply_lora, lora_layers
from ember.checkpoint.peft import save_adapter
from ember.commands.serve import ServeConfig, ServeConfigError, build
from ember.model.generate import generate
from ember.quant import QuantConfig, quantize_model
from ember.serve import running
from tests.serve.conftest import make_app

PROMPT = "The for statement"
N = 12


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir, tmp_path_factory):
    model = ember.load_model(tiny_dir)
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    torch.manual_seed(3)
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.5)
    out = tmp_path_factory.mktemp("adapter")
    save_adapter(model, out, base_model_name_or_path=str(tiny_dir))
    return out


def naive(model_dir, tokenizer, adapter=None) -> str:
    model = ember.load_model(model_dir, adapter=adapter)
    ids = tokenizer.encode(PROMPT)
    out = generate(model, torch.tensor([ids]), N)
    return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def served(app) -> str:
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=N, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text


def test_served_adapter_matches_the_naive_decoder(tiny_dir, tokenizer, adapter_dir) -> None:
    want = naive(tiny_dir, tokenizer, adapter_dir)
    assert want != naive(tiny_dir, tokenizer)  # the adapter changes what the model says
    assert served(make_app(tiny_dir, adapter=adapter_dir)) == want


def test_adapter_over_a_quantized_base_stays_unmerged_and_matches(tiny_dir, tokenizer, adapter_dir, tmp_path) -> None:
    qdir = tmp_path / "nf4"
    ember.save_model(quantize_model(ember.load_model(tiny_dir), QuantConfig(method="nf4")), qdir)
    for f in tiny_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, qdir / f.name)
    model = ember.load_model(qdir, adapter=adapter_dir)
    assert len(list(lora_layers(model))) > 0  # load_model applies adapters to quantized bases too
    want = naive(qdir, tokenizer, adapter_dir)
    assert want != naive(qdir, tokenizer)
    assert served(make_app(qdir, adapter=adapter_dir)) == want


def test_generate_command_keeps_the_adapter_unmerged_over_a_quantized_base(tiny_dir, adapter_dir, tmp_path,
                                                                           capsys) -> None:
    from ember.commands.generate import GenerateConfig, main

    qdir = tmp_path / "int8"
    ember.save_model(quantize_model(ember.load_model(tiny_dir), QuantConfig(method="int8")), qdir)
    for f in tiny_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, qdir / f.name)
    main(GenerateConfig(model=qdir, adapter=adapter_dir, prompt=PROMPT, max_tokens=N))  # no merge error
    with_adapter = capsys.readouterr().out
    main(GenerateConfig(model=qdir, prompt=PROMPT, max_tokens=N))
    assert capsys.readouterr().out != with_adapter


def test_missing_adapter_folder_is_one_clear_error(tiny_dir, tmp_path) -> None:
    with pytest.raises(ServeConfigError, match="--adapter .* is not a folder"):
        build(ServeConfig(model=tiny_dir, adapter=tmp_path / "nope"))
