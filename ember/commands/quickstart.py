"""The whole pipeline end to end on the bundled Python documentation and code.

    ember quickstart                    # everything under runs/quickstart/
    ember quickstart --fast             # tiny settings (used by the tests)

Stages run in order, each reading what the earlier ones produced from QuickstartState:
  1. tokenizer   train a byte-level BPE tokenizer on the bundled prose + code
  2. model       build the quickstart-10m model for that vocabulary, save it (HF layout) with
                 the tokenizer, reload it and check the logits round-trip
  3. pretrain    pretrain it on the bundled corpus (70 % prose / 30 % code, a few minutes on
                 two CPU cores), print validation perplexity before and after, save to pretrained/
  4. finetune    LoRA SFT on questions about the Python docs answered by the docs (ember.data.pydoc_qa);
                 held-out assistant-token loss before/after; the merged model becomes the latest
  5. dpo         DPO (LoRA, reference = adapters disabled) on preference pairs from the same docs;
                 held-out reward accuracy before/after; the merged model becomes the latest
  6. quantize    GPTQ 4-bit of the latest model; size, held-out perplexity, decode speed vs fp32
  7. engine      serve a batch of prompts sharing a preamble through the paged engine
                 (continuous batching, prefix cache); report throughput and cache hits
  8. rag         index the Python documentation topics (all-MiniLM-L6-v2, LanceDB) in rag-index/
                 and answer one question with the latest model, citing the retrieved sources
  9. serve       the OpenAI-compatible server on the model, asked through the openai client
                 (whole, streamed, and grounded in the rag index); a few Prometheus figures
  eval (last)    one table: the held-out perplexity each stage recorded in state.perplexity,
                 and the latest model on the bundled MMLU-style sample
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember.checkpoint.hf import load_model, save_model
from ember.commands.chat import stage_engine
from ember.commands.dpo import stage_dpo
from ember.commands.finetune import stage_finetune
from ember.commands.quantize import stage_quantize
from ember.commands.serve import stage_serve
from ember.config import preset
from ember.data.sources import bundled_documents
from ember.model.transformer import Transformer
from ember.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)


@dataclass
class QuickstartConfig:
    """Run every ember stage on the bundled corpus (minutes on a laptop CPU)."""

    out: Path = field(default=Path("runs/quickstart"), metadata={"help": "folder for every artifact"})
    fast: bool = field(default=False, metadata={"help": "tiny model and data (a smoke test in seconds)"})
    seed: int = field(default=0, metadata={"help": "random seed"})


@dataclass
class QuickstartState:
    """What the stages have produced so far."""

    cfg: QuickstartConfig
    tokenizer_dir: Path | None = None
    model_dir: Path | None = None  # the latest stage's model (HF layout, tokenizer alongside)
    quantized_dir: Path | None = None  # the quantize stage's GPTQ model
    # stage name -> held-out perplexity, filled by the stages that train or change the model
    perplexity: dict[str, float] = field(default_factory=dict)

    @property
    def tokenizer(self) -> Tokenizer:
        assert self.tokenizer_dir is not None, "the tokenizer stage has not run"
        return load_tokenizer(self.tokenizer_dir)


def stage_tokenizer(state: QuickstartState) -> None:
    fast = state.cfg.fast
    vocab = 512 if fast else 8192
    texts = (d.text for d in bundled_documents(code_bytes=200_000 if fast else 4_000_000))
    tok = train_tokenizer(texts, vocab_size=vocab, kind="bpe", show_progress=not fast)
    state.tokenizer_dir = state.cfg.out / "tokenizer"
    tok.save(state.tokenizer_dir)
    sample = "def greet(name):\n    return f'Hello, {name}!'"
    ids = tok.encode(sample)
    print(f"  vocab {tok.vocab_size}; {len(sample)} chars of code -> {len(ids)} tokens; "
          f"round-trip exact: {tok.decode(ids) == sample}")


def stage_model(state: QuickstartState) -> None:
    tok = state.tokenizer
    eos = tuple(i for i in (tok.eos_token_id, tok.token_to_id("<|im_end|>")) if i is not None)
    cfg = preset("tiny" if state.cfg.fast else "quickstart-10m", vocab_size=tok.vocab_size,
                 bos_token_id=tok.bos_token_id, eos_token_id=eos)
    torch.manual_seed(state.cfg.seed)
    model = Transformer(cfg).eval()
    out = state.cfg.out / "base"
    save_model(model, out)
    tok.save(out)
    reloaded = load_model(out)
    ids = torch.tensor([tok.encode("import os\nprint(os.getcwd())")])
    with torch.no_grad():
        diff = (model(ids) - reloaded(ids)).abs().max().item()
    state.model_dir = out
    print(f"  {cfg.num_params() / 1e6:.1f}M parameters, {cfg.num_layers} layers, d={cfg.hidden_size}, "
          f"{cfg.num_heads} heads ({cfg.n_kv_heads} kv); saved to {out}; reload max |Δlogit| = {diff:.1e}")


def stage_pretrain(state: QuickstartState) -> None:
    from ember.train.pretrain import PretrainConfig, pretrain

    fast = state.cfg.fast
    # Full run: 150 steps of 16 x 128 tokens (~0.3M tokens, ~3 minutes on two idle cores);
    # fast: a tiny model for seconds.
    cfg = PretrainConfig(out=state.cfg.out / "pretrain-run", model=str(state.model_dir),
                         tokenizer=state.tokenizer_dir, data=["bundled"], code_bytes=200_000 if fast else 4_000_000,
                         seq_len=64 if fast else 128, batch_size=8 if fast else 16, micro_batch_size=8 if fast else 16,
                         max_steps=25 if fast else 150, warmup_steps=3 if fast else 10, lr=1e-2 if fast else 3e-3,
                         eval_every=0 if fast else 50, save_every=0 if fast else 50, val_sequences=8 if fast else 24,
                         val_fraction=0.05, seed=state.cfg.seed, progress=not fast,
                         final_model=state.cfg.out / "pretrained")
    # The quickstart rebuilds every artifact: never resume a previous quickstart's pretraining.
    shutil.rmtree(cfg.out / "checkpoints", ignore_errors=True)
    result = pretrain(cfg)
    before, after = result.ppl_before, result.ppl_after
    print(f"  validation perplexity {before:.0f} -> {after:.1f} ({before / after:.1f}x lower) after "
          f"{result.train.step} steps; loss curve {cfg.out / 'loss.png'}; model saved to {result.model_dir}")
    state.model_dir = result.model_dir
    state.perplexity["initial"] = before
    state.perplexity["pretrained"] = after


RAG_QUESTION = "When is the else clause of a while loop executed?"
RAG_FAST_TOPICS = ("while", "for", "break", "continue", "if", "try")


def stage_rag(state: QuickstartState) -> None:
    from ember.engine.llm import LLM
    from ember.rag import Answer, Index, generate_text, ground, ingest

    assert state.model_dir is not None, "the model stage has not run"
    fast = state.cfg.fast
    paths = [f"pydoc:{t}" for t in RAG_FAST_TOPICS] if fast else ["pydoc"]
    llm = LLM(state.model_dir, max_num_seqs=1, kv_cache_memory=0.25)
    max_tokens = 32 if fast else 64
    with Index.open(state.cfg.out / "rag-index", create=True) as idx:
        report = ingest(idx, paths, progress=not fast)
        print(f"  {report.summary()}")
        grounded = ground(idx.retriever(), [{"role": "user", "content": RAG_QUESTION}], llm.get_tokenizer(),
                          context_length=llm.engine.max_model_len, max_tokens=max_tokens)
    answer = Answer(generate_text(llm, grounded.messages, max_tokens), grounded.sources)
    print(f"  Q: {RAG_QUESTION}")
    for s in answer.sources:
        print(f"  [{s.n}] {s.label()}  (score {s.score:.4f}{', truncated to fit' if s.truncated else ''})")
    where = state.model_dir.relative_to(state.cfg.out) if state.model_dir.is_relative_to(state.cfg.out) \
        else state.model_dir
    print(f"  A ({where}, {grounded.prompt_tokens}-token prompt; a 10M-parameter model trained for minutes "
          f"mostly repeats itself): {answer.text[:200]!r}")


def stage_eval(state: QuickstartState) -> None:
    from ember.eval.report import lifecycle_report

    assert state.model_dir is not None, "the model stage has not run"
    print(lifecycle_report(state.perplexity, state.model_dir))


STAGES: list[tuple[str, Callable[[QuickstartState], None]]] = [
    ("tokenizer", stage_tokenizer),
    ("model", stage_model),
    ("pretrain", stage_pretrain),
    ("finetune", stage_finetune),
    ("dpo", stage_dpo),
    ("quantize", stage_quantize),
    ("engine", stage_engine),
    ("rag", stage_rag),
    ("serve", stage_serve),
    ("eval", stage_eval),  # stays last: it reports on every earlier stage's model
]


def main(cfg: QuickstartConfig) -> QuickstartState:
    state = QuickstartState(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, (name, stage) in enumerate(STAGES, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(STAGES)}] {name}", flush=True)
        stage(state)
        print(f"  done in {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"quickstart finished in {time.perf_counter() - start:.0f}s; artifacts in {cfg.out}")
    return state


CONFIG = QuickstartConfig
