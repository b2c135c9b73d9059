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


def test_chat_json_schema_constrains_every_reply(tiny, tmp_path, monkeypatch, capsys) -> None:
    import json

    import jsonschema
    import pytest

    pytest.importorskip("llguidance")
    from tests.engine.json_schemas import SCHEMAS

    model, tok = tiny
    save_model(model, tmp_path)
    tok.save(tmp_path)
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMAS[0]))
    monkeypatch.setattr("sys.stdin", io.StringIO("Who?\nAnd who else?\n"))
    main(ChatConfig(model=tmp_path, max_tokens=200, temperature=0, kv_cache_memory=0.05,
                    json_schema=tmp_path / "schema.json"))
    replies = capsys.readouterr().out.splitlines()
    assert len(replies) == 2
    for reply in replies:
        jsonschema.validate(json.loads(reply), SCHEMAS[0])


def test_chat_json_schema_file_errors_are_one_line(tmp_path) -> None:
    import pytest

    from ember.errors import EmberError

    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(EmberError, match="must hold a JSON object"):
        main(ChatConfig(model=tmp_path, json_schema=tmp_path / "bad.json"))
    with pytest.raises(EmberError, match="not found"):
        main(ChatConfig(model=tmp_path, json_schema=tmp_path / "missing.json"))


def test_chat_qa_format_asks_a_base_model_as_text(tiny, tmp_path, monkeypatch, capsys) -> None:
    """--format qa: the conversation as Question/Answer text, each reply cut at its line's end."""
    from ember.commands.chat import qa_prompt

    model, tok = tiny
    save_model(model, tmp_path)
    tok.save(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is a tuple?\nAnd a list?\n"))
    main(ChatConfig(model=tmp_path, system="Python notes.", max_tokens=12, temperature=0, kv_cache_memory=0.05,
                    format="qa"))
    out = capsys.readouterr().out
    llm, params = LLM(model, tok), SamplingParams(temperature=0, max_tokens=12, stop=["\n"])
    conv = [{"role": "system", "content": "Python notes."}, {"role": "user", "content": "What is a tuple?"}]
    assert qa_prompt(conv) == "Python notes.\n\nQuestion: What is a tuple?\nAnswer:"
    first = llm.generate([tok.encode(qa_prompt(conv))], params)[0].outputs[0].text.lstrip()
    conv += [{"role": "assistant", "content": first}, {"role": "user", "content": "And a list?"}]
    assert qa_prompt(conv).endswith(f"Answer: {first.strip()}\n\nQuestion: And a list?\nAnswer:")
    second = llm.generate([tok.encode(qa_prompt(conv))], params)[0].outputs[0].text.lstrip()
    assert out == f"{first}\n{second}\n" and "\n" not in first + second


def test_chat_format_is_checked(tmp_path) -> None:
    import pytest

    from ember.errors import EmberError

    with pytest.raises(EmberError, match="unknown --format 'ChatML'"):
        main(ChatConfig(model=tmp_path, format="ChatML"))


def test_chat_answers_a_factual_question_on_gemma3(gemma3_file, monkeypatch, capsys) -> None:
    """The packaged Gemma 3 270M is a base model: `ember chat --model gemma3-270m` asks it as text."""
    from ember.checkpoint.registry import is_base_model

    assert is_base_model("gemma3-270m") and is_base_model(gemma3_file) and not is_base_model("smollm2-135m-instruct")
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n"))
    main(ChatConfig(model="gemma3-270m", max_tokens=8, temperature=0, kv_cache_memory=0.1))
    assert capsys.readouterr().out == "Paris\n"
