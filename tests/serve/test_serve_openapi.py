"""/openapi.json describes the API: request and response bodies of every route, server-specific
bounds; schemathesis (bounded in examples and time) finds no 5xx and no schema mismatch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest


def test_every_route_declares_its_bodies(server) -> None:
    doc = httpx.get(server.url + "/openapi.json").json()
    paths = doc["paths"]
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        ref = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[-1] in doc["components"]["schemas"]
        assert "200" in paths[path]["post"]["responses"] and "400" in paths[path]["post"]["responses"]
    for path in ("/v1/models", "/tokenizer_info", "/version"):
        assert "$ref" in paths[path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert {"response_format", "tools", "tool_choice", "guided_json", "structured_outputs"} <= set(chat)
    assert schemas["CompletionRequest"]["properties"]["model"]["anyOf"][0]["enum"] == ["tiny"]
    assert schemas["CompletionRequest"]["properties"]["n"]["maximum"] == 128


def test_tokenizer_info(server) -> None:
    info = httpx.get(server.url + "/tokenizer_info").json()
    tok = server.serving.tokenizer
    assert info["eos_token"] == tok.eos_token and info["eos_token_id"] == tok.eos_token_id
    assert info["vocab_size"] == tok.vocab_size and info["model_max_length"] == 512


SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="schemathesis not installed (pip install schemathesis)")
def test_schemathesis_finds_no_server_error(server, tmp_path) -> None:
    exe = str(SCHEMATHESIS)
    out = subprocess.run([exe, "run", server.url + "/openapi.json", "--max-examples", "15",
                          "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
                          "--generation-deterministic", "--workers", "1", "--phases", "examples,coverage,fuzzing",
                          "--request-timeout", "60"],
                         capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)  # schemathesis writes its cache into the working directory
    print(out.stdout[-6000:], out.stderr[-2000:], file=sys.stderr)
    assert out.returncode == 0, out.stdout[-4000:]
    assert "Schema validation mismatch" not in out.stdout
