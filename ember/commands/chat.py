"""Chat with a model in the terminal: each stdin line is a user turn, replies stream back.

    ember chat --model runs/quickstart/base
    echo "What is a tuple?" | ember chat --model DIR --system "Answer briefly." --temperature 0
    echo "Describe Ann, 31." | ember chat --model smollm2-135m-instruct --json-schema person.json
    echo "What is the capital of France?" | ember chat --model gemma3-270m --temperature 0   # a base model

Runs on the serving engine (paged KV cache); the conversation goes through the model's chat
template, so each turn's prompt extends the last and the prefix cache skips recomputing it.
A base model (one never taught chat turns, such as the packaged Gemma 3 270M; `--format qa` for any
other) gets the conversation as text instead: the system prompt, then each turn as
"Question: ...\nAnswer: ...", its reply cut at the end of the answer's line.
With --json-schema FILE every reply is a JSON value valid under that schema (constrained
decoding, ember/engine/grammar.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ember.checkpoint.registry import KNOWN_MODELS, MODEL_HELP, is_base_model
from ember.engine import LLM, SamplingParams
from ember.engine.spec_decode import SpeculativeConfig
from ember.engine.structured_outputs import StructuredOutputsParams
from ember.errors import EmberError
from ember.jsonfile import read_json_object


@dataclass
class ChatConfig:
    """Interactive chat: one user message per stdin line, streamed replies."""

    model: Path = field(metadata={"help": MODEL_HELP})
    tokenizer: Path | None = field(default=None, metadata={"help": "tokenizer folder (default: the model folder)"})
    adapter: Path | None = field(default=None, metadata={"help": "PEFT LoRA adapter folder to apply"})
    system: str | None = field(default=None, metadata={"help": "system prompt"})
    max_tokens: int = field(default=256, metadata={"help": "longest reply in tokens"})
    temperature: float = field(default=0.7, metadata={"help": "0 = greedy"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16"})
    kv_cache_memory: float = field(default=1.0, metadata={"help": "GiB for the KV cache"})
    int8_activations: bool = field(default=False, metadata={
        "help": "quantized models: int8 activations at batch-1 decode, as llama.cpp (faster, logits move slightly)"})
    speculative_config: str | None = field(default=None, metadata={
        "help": "speculative decoding, JSON as vLLM: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}' "
                "or '{\"method\": \"draft_model\", \"model\": PATH_OR_NAME, \"num_speculative_tokens\": 4}'"})
    json_schema: Path | None = field(default=None, metadata={
        "help": "JSON schema file: every reply is JSON valid under it (constrained decoding)"})
    tensor_parallel_size: int = field(default=1, metadata={
        "help": "split the model across this many processes (tensor parallel; ember spawns them)"})
    pipeline_parallel_size: int = field(default=1, metadata={
        "help": "pipeline stages (layer ranges), each its own processes"})
    enable_expert_parallel: bool = field(default=False, metadata={
        "help": "MoE models: whole experts per tensor-parallel rank instead of slices of each"})
    format: str = field(default="auto", metadata={
        "help": "chat: the model's chat template; qa: 'Question: ...\\nAnswer:' text for a base model; "
                "auto: qa for a known base model (gemma3-270m), else chat"})


FORMATS = ("auto", "chat", "qa")
CONFIG = ChatConfig


def qa_prompt(messages: list[dict[str, str]]) -> str:
    """A conversation as text a base model continues: the system prompt, then Question/Answer turns."""
    parts = [m["content"] + "\n\n" for m in messages if m["role"] == "system"]
    for m in messages:
        if m["role"] == "user":
            parts.append(f"Question: {m['content']}\nAnswer:")
        elif m["role"] == "assistant":
            parts.append(f" {m['content'].strip()}\n\n")
    return "".join(parts)


def main(cfg: ChatConfig) -> None:
    SpeculativeConfig.parse(cfg.speculative_config)  # a bad value fails before the model loads
    if cfg.format not in FORMATS:
        raise EmberError(f"unknown --format {cfg.format!r}: use {', '.join(FORMATS)}")
    qa = cfg.format == "qa" or (cfg.format == "auto" and is_base_model(cfg.model))
    structured = None
    if cfg.json_schema is not None:  # read before the model loads: a bad file fails fast
        schema = read_json_object(cfg.json_schema, EmberError, "give --json-schema a JSON schema file")
        structured = StructuredOutputsParams(json=schema)
    llm = LLM(cfg.model, cfg.tokenizer, dtype=cfg.dtype, adapter=cfg.adapter, kv_cache_memory=cfg.kv_cache_memory,
              int8_activations=cfg.int8_activations, speculative_config=cfg.speculative_config,
              tensor_parallel_size=cfg.tensor_parallel_size, pipeline_parallel_size=cfg.pipeline_parallel_size,
              enable_expert_parallel=cfg.enable_expert_parallel)
    engine, tok = llm.engine, llm.get_tokenizer()
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, max_tokens=cfg.max_tokens,
                            structured_outputs=structured, stop=["\n"] if qa else None)
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    interactive = sys.stdin.isatty()
    for turn, line in enumerate(iter(lambda: _prompt(interactive), None)):
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        if qa:
            ids = tok.encode(qa_prompt(messages))
        else:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        engine.add_request(f"chat-{turn}", ids, params, stream=True)
        reply = []
        while engine.has_unfinished():
            for out in engine.step():
                for c in out.outputs:
                    text = c.text.lstrip() if qa and not "".join(reply).strip() else c.text  # " Paris" -> "Paris"
                    reply.append(text)
                    sys.stdout.write(text)
                    sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def _prompt(interactive: bool) -> str | None:
    if interactive:
        sys.stdout.write("> ")
        sys.stdout.flush()
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def stage_engine(state) -> None:
    """Quickstart stage: a batch of prompts sharing a preamble through the paged engine."""
    from ember.data.sources import pydoc_topics

    llm = LLM(state.model_dir, max_num_seqs=16, kv_cache_memory=0.25)
    preamble = next(d.text for d in pydoc_topics() if len(d.text) > 400)[:400]
    starts = ["def parse(line):", "class Stack:", "import os\n", "for i in range(10):", "# Read a file",
              "A tuple is", "with open(path) as f:", "try:"]
    prompts = [preamble + "\n" + s for s in starts * (1 if state.cfg.fast else 4)]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.95, seed=state.cfg.seed,
                                                max_tokens=16 if state.cfg.fast else 64))
    dt = time.perf_counter() - t0
    s = llm.engine.stats()
    print(f"  {len(prompts)} requests with a shared {len(preamble)}-char preamble: {s.generation_tokens_total} "
          f"tokens in {dt:.1f}s ({s.generation_tokens_total / dt:.0f} tok/s); prefix cache served "
          f"{s.prefix_cache_hits}/{s.prefix_cache_queries} prompt tokens")
    print(f"  sample: {starts[0]!r} -> {outs[0].outputs[0].text[:60]!r}")


CHAT_QUESTION = "What is the capital of France?"


def stage_real_chat(state) -> None:
    """Quickstart stage: one question to the real model through the paged engine, answered greedily."""
    real = state.real_model()
    if real is None:
        return
    llm = LLM(real.model, real.tokenizer, max_num_seqs=1, kv_cache_memory=0.25)
    t0 = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=16 if state.cfg.fast else 48)
    if KNOWN_MODELS[real.name].chat:
        out = llm.chat([{"role": "user", "content": CHAT_QUESTION}], params)[0]
    else:  # a base model never learnt chat turns: the question as text, cut at the answer's line
        print("  (a base model: asked as 'Question: ...\\nAnswer:' text, not through the chat template)")
        params = SamplingParams(temperature=0.0, max_tokens=params.max_tokens, stop=["\n"])
        out = llm.generate([real.tokenizer.encode(qa_prompt([{"role": "user", "content": CHAT_QUESTION}]))], params)[0]
    dt = time.perf_counter() - t0
    print(f"  Q: {CHAT_QUESTION}")
    print(f"  A ({real.name}, {len(out.outputs[0].token_ids)} tokens in {dt:.1f}s): {out.outputs[0].text.strip()!r}")
