"""AsyncLLMEngine: concurrent streams of deltas, held-back stop strings, abort, errors, stats."""

from __future__ import annotations

import asyncio

import pytest

from ember.engine import LLM, AsyncLLMEngine, RequestError, SamplingParams, SamplingParamsError

PROMPTS = ["The list type", "def f(x):\n    return", "Grüße aus", "A", "import os"]


def _engine(tiny, **kw) -> AsyncLLMEngine:
    model, tok = tiny
    return AsyncLLMEngine(LLM(model, tok, **kw).engine)


def _whole(engine: AsyncLLMEngine) -> None:
    kv = engine.engine.kv
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_blocks and not engine.engine.groups


def test_concurrent_streams_concatenate_to_the_offline_outputs(tiny) -> None:
    model, tok = tiny
    params = [SamplingParams(temperature=0, max_tokens=30, n=1 + (i == 2), logprobs=1 if i == 1 else None)
              for i in range(len(PROMPTS))]
    offline = LLM(model, tok).generate(PROMPTS, params)
    engine = _engine(tiny, max_num_batched_tokens=16, max_num_seqs=16)
    running_seen = []

    async def consume(i: int) -> dict:
        texts: dict[int, str] = {}
        ids: dict[int, list[int]] = {}
        reasons: dict[int, str] = {}
        async for delta in engine.add_request(f"r{i}", PROMPTS[i], params[i]):
            running_seen.append(engine.stats().num_running)
            for c in delta.outputs:
                texts[c.index] = texts.get(c.index, "") + c.text
                ids.setdefault(c.index, []).extend(c.token_ids)
                if c.logprobs is not None:
                    assert len(c.logprobs) == len(c.token_ids)
                reasons[c.index] = c.finish_reason
        assert delta.finished
        return dict(texts=texts, ids=ids, reasons=reasons)

    async def main():
        results = await asyncio.gather(*(consume(i) for i in range(len(PROMPTS))))
        await engine.shutdown()
        return results

    for got, want in zip(asyncio.run(main()), offline):
        for c in want.outputs:
            assert got["texts"][c.index] == c.text
            assert got["ids"][c.index] == c.token_ids
            assert got["reasons"][c.index] == c.finish_reason
    assert max(running_seen) > 1
    _whole(engine)


def test_stop_strings_are_held_back_while_streaming(tiny) -> None:
    model, tok = tiny
    full = LLM(model, tok).generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=40,
                                                                ignore_eos=True))[0].outputs[0].text
    stop = full[12:16]
    cut = full[:full.find(stop)]
    engine = _engine(tiny)

    async def main() -> list[str]:
        pieces = []
        async for delta in engine.add_request("s", PROMPTS[1], SamplingParams(temperature=0, max_tokens=40,
                                                                             stop=stop, ignore_eos=True)):
            pieces.append(delta.outputs[0].text)
            assert cut.startswith("".join(pieces))  # never a character of the stop string
        await engine.shutdown()
        return pieces

    assert "".join(asyncio.run(main())) == cut
    _whole(engine)


def test_abort_and_early_close_free_the_request(tiny) -> None:
    engine = _engine(tiny)
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main() -> tuple[list, list]:
        seen_a = []
        stream = engine.add_request("a", PROMPTS[0], long)
        async for delta in stream:
            seen_a.append(delta)
            if len(seen_a) == 3:
                engine.abort("a")
        seen_b = []
        stream = engine.add_request("b", PROMPTS[1], long)
        async for delta in stream:
            seen_b.append(delta)
            if len(seen_b) == 2:
                break  # the client went away
        await stream.aclose()
        while engine.engine.has_unfinished() or engine._pending:
            await asyncio.sleep(0.01)
        await engine.shutdown()
        return seen_a, seen_b

    seen_a, seen_b = asyncio.run(main())
    assert seen_a[-1].finished and seen_a[-1].outputs[0].finish_reason == "abort"
    assert len(seen_b) == 2
    _whole(engine)


def test_bad_requests_raise_at_add(tiny) -> None:
    engine = _engine(tiny, max_model_len=32)

    async def main() -> None:
        with pytest.raises(RequestError, match="context"):
            engine.add_request("x", list(range(3, 60)), SamplingParams())
        with pytest.raises(SamplingParamsError):
            engine.add_request("x", "hi", SamplingParams(stop_token_ids=[10 ** 6]))
        stream = engine.add_request("x", "hi", SamplingParams(max_tokens=2))
        with pytest.raises(RequestError, match="already in use"):
            engine.add_request("x", "hi", SamplingParams())
        outs = [d async for d in stream]
        assert outs[-1].finished
        await engine.shutdown()

    asyncio.run(main())
    _whole(engine)
