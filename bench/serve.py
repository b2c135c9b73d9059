"""Serving benchmark: `ember serve` under load against the offline engine, measured in the same run.

    PYTHONPATH=. python bench/serve.py                         # bench-50m, random weights (~10 min on 2 cores)
    PYTHONPATH=. python bench/serve.py --preset quickstart-10m --num-prompts 32 --output-len 64

1. overhead    the same random workload (--num-prompts prompts of --input-len tokens, exactly
               --output-len output tokens each, greedy, ignore_eos) sent all at once through an
               `ember serve` subprocess (streamed over HTTP by `ember bench serve`'s load generator)
               and run through `ember.LLM` offline: the server's output tokens/s as a fraction of
               the offline engine's (target: >= 85 %).
               Repeated --repeat times (server and offline alternate); the median ratio is reported,
               with the CPU time of the offline run over that of the server process (engine + HTTP)
               during the load, which other jobs on a shared machine disturb less.
2. latency     the saturation request rate (everything at once), then Poisson arrivals at
               --fraction (0.8) of it with fresh prompts (a cold prefix cache; its hit rate is
               printed): TTFT / TPOT / ITL / E2E percentiles, P95 TTFT reported.
The model is --preset with random weights and a byte-level BPE tokenizer trained here on the
bundled corpus (vocabulary as the preset's, when the corpus has that many merges). Server and
offline run with the same engine settings and --threads torch threads; the load generator runs
in this process on the remaining core. Timings on a shared machine vary; compare within a run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.checkpoint.hf import save_model  # noqa: E402
from ember.commands.bench import BenchServeConfig, bench_serve  # noqa: E402
from ember.config import preset  # noqa: E402
from ember.data.sources import bundled_documents  # noqa: E402
from ember.model.transformer import Transformer  # noqa: E402
from ember.tokenizer import train_tokenizer  # noqa: E402


def make_model_dir(name: str, out: Path) -> Path:
    """The preset with random weights and a BPE tokenizer of (up to) its vocabulary size."""
    cfg = preset(name)
    t0 = time.perf_counter()
    tok = train_tokenizer((d.text for d in bundled_documents(code_bytes=3_000_000)), vocab_size=cfg.vocab_size,
                          show_progress=False)
    torch.manual_seed(0)
    model = Transformer(preset(name, vocab_size=tok.vocab_size, eos_token_id=(tok.eos_token_id,))).eval()
    save_model(model, out)
    tok.save(out)
    print(f"[setup] {name}: {model.config.num_params() / 1e6:.1f}M parameters, vocabulary {tok.vocab_size} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench-50m")
    ap.add_argument("--model", type=Path, help="use this model folder instead of a random preset")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fraction", type=float, default=0.8)
    ap.add_argument("--repeat", type=int, default=3, help="overhead: server/offline pairs to run")
    ap.add_argument("--only", nargs="+", choices=["overhead", "latency"], default=["overhead", "latency"])
    ap.add_argument("--save-result", type=Path, help="JSON of every run (per overhead/latency)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model_dir(args.preset, Path(tmp) / "model")
        common = dict(model=model, num_prompts=args.num_prompts, input_len=args.input_len,
                      output_len=args.output_len, max_num_seqs=args.max_num_seqs, threads=args.threads,
                      kv_cache_memory=1.0, seed=0)
        if "overhead" in args.only:
            print("[overhead] all at once: ember serve vs offline LLM", flush=True)
            ratios, cpu = [], []
            for i in range(args.repeat):
                out = bench_serve(BenchServeConfig(offline=True, save_result=_path(args, f"overhead{i}"), **common))
                ratios.append(out["server_over_offline"])
                cpu.append(out.get("cpu_offline_over_server", float("nan")))
                print(f"[overhead] run {i + 1}: server {out['runs'][-1]['output_throughput']:.1f} tok/s / offline "
                      f"{out['offline']['output_throughput']:.1f} tok/s = {ratios[-1]:.1%} (CPU time: offline / "
                      f"server process = {cpu[-1]:.1%})", flush=True)
            print(f"[overhead] server / offline output tokens/s: median {statistics.median(ratios):.1%} of "
                  f"{len(ratios)} runs ({', '.join(f'{r:.1%}' for r in ratios)}; target >= 85%); CPU-time ratio "
                  f"median {statistics.median(cpu):.1%}", flush=True)
        if "latency" in args.only:
            print(f"[latency] saturation, then Poisson arrivals at {args.fraction:.0%} of it", flush=True)
            out = bench_serve(BenchServeConfig(saturation_fraction=args.fraction,
                                               save_result=_path(args, "latency"), **common))
            sat, run = out["runs"]
            hit = run.get("prefix_cache_hit_rate", float("nan"))
            print(f"[latency] saturation {sat['request_throughput']:.2f} req/s; at {run['request_rate']:.2f} req/s "
                  f"(fresh prompts, prefix-cache hit rate {hit:.1%}): P95 TTFT {run['ttft_ms']['p95']:.0f} ms "
                  f"(median {run['ttft_ms']['median']:.0f}), P95 TPOT {run['tpot_ms']['p95']:.1f} ms, "
                  f"{run['failed']} failed", flush=True)


def _path(args: argparse.Namespace, part: str) -> Path | None:
    return args.save_result.with_name(f"{args.save_result.stem}-{part}.json") if args.save_result else None


if __name__ == "__main__":
    main()
