"""`ember chat`: stdin turns through the chat template, streamed replies equal LLM.chat's."""

from __future__ import annotations

import io

from ember.checkpoint.hf import save_model
from ember.commands.chat import ChatConfig, main
from ember.engine import LLM, SamplingParams


def test_chat_streams_replies_turn_by_turn(tiny, tmp_path, monkeypatch, capsys) -> None:
    model, tok = tiny
    save_model(model, tmp_path)
    tok.save(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is a tuple?\n\nAnd a list?\n"))
    main(ChatConfig(model=tmp_path, system="Be brief.", max_tokens=12, temperature=0, kv_cache_memory=0.05))
    out = capsys.readouterr().out
    llm, params = LLM(model, tok), SamplingParams(temperature=0, max_tokens=12)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tuple?"}]
    first = llm.chat(conv, params)[0].outputs[0].text
    conv += [{"role": "assistant", "content": first}, {"role": "user", "content": "And a list?"}]
    second = llm.chat(conv, params)[0].outputs[0].text
    assert out == f"{first}\n{second}\n"  # the empty line was skipped
