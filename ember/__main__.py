"""`ember <verb>`: the command line, one verb per lifecycle stage.

Each verb lives in `ember/commands/<verb>.py` and declares either
    CONFIG = SomeConfig (a dataclass) and main(cfg)             -> `ember <verb> [flags]`
or  SUBCOMMANDS = {"name": (SomeConfig, fn)}                     -> `ember <verb> <name> [flags]`
Flags, `--help` and `--config FILE.yaml` come from the dataclass (ember/cliconfig.py). Only the
chosen verb's module is imported, so `ember --help` is quick. Errors a user can cause
(EmberError, missing files) print one line and exit 1; anything else keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys

from ember.cliconfig import parse_config
from ember.errors import EmberError

# verb -> one-line description (the module is ember.commands.<verb>)
VERBS: dict[str, str] = {
    "tokenizer": "train a byte-level BPE or Unigram tokenizer on text files or the bundled corpus",
    "pretrain": "pretrain a model on text (packed next-token prediction; DDP/FSDP under torchrun)",
    "scaling": "scaling laws: sweep small runs, fit L(N, D), plan compute-optimal N and D",
    "finetune": "supervised fine-tuning on chat data (LoRA, QLoRA or all weights), PEFT adapters",
    "dpo": "preference tuning (DPO / IPO) with LoRA over the frozen base",
    "generate": "continue a prompt with a model (naive reference decoder)",
    "eval": "evaluate a model or an OpenAI-compatible server: perplexity, MMLU, GSM8K, TruthfulQA, MT-Bench",
    "quantize": "quantize a model (int8, nf4, rtn, gptq, awq) and compare size, perplexity and speed",
    "export": "export a model to GGUF for llama.cpp (f32, f16, q8_0, q4_0)",
    "chat": "chat with a model in the terminal (serving engine, streamed replies)",
    "rag": "retrieval-augmented generation: ingest documents, search them, answer with citations",
    "serve": "serve a model over an OpenAI-compatible HTTP API with Prometheus metrics",
    "bench": "benchmarks: `ember bench serve` loads an OpenAI-compatible server (TTFT, TPOT, tokens/s)",
    "quickstart": "run the whole pipeline end to end on the bundled Python docs and code",
}


def _usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: ember <verb> [--help] [flags]", "", "verbs:"]
    lines += [f"  {v:<{width}}  {d}" for v, d in VERBS.items()]
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from ember import __version__

        print(f"ember {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"ember: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"ember.commands.{verb}")
    prog = f"ember {verb}"
    subcommands = getattr(module, "SUBCOMMANDS", None)
    if subcommands:
        if not rest or rest[0] in ("-h", "--help"):
            print(f"usage: {prog} {{{','.join(subcommands)}}} [--help] [flags]\n\n{module.__doc__.strip()}")
            return 0 if rest else 2
        if rest[0] not in subcommands:
            print(f"{prog}: unknown subcommand {rest[0]!r}; choose one of {', '.join(subcommands)}",
                  file=sys.stderr)
            return 2
        cls, fn = subcommands[rest[0]]
        cfg = parse_config(cls, rest[1:], f"{prog} {rest[0]}")
    else:
        cls, fn = module.CONFIG, module.main
        cfg = parse_config(cls, rest, prog, module.__doc__)
    result = fn(cfg)
    return int(result) if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = sys.argv[1:] if argv is None else argv
    verb = args[0] if args else "ember"
    try:
        code = run(args)
    except EmberError as e:
        print(f"ember {verb}: error: {e}", file=sys.stderr)
        code = 1
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"ember {verb}: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"ember {verb}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
