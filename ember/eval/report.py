"""The quickstart's evaluation report: every stage's model in one table.

    print(lifecycle_report(state.perplexity, latest_model_dir))

Rows: the held-out perplexity each stage recorded for its model (pretrained, fine-tuned,
quantized, ... in the order they ran), then the latest model on the bundled MMLU-style sample
(acc and acc_norm with standard errors). When no stage recorded a perplexity, the latest
model's token perplexity on the bundled held-out notes (ember/eval/data/perplexity, text no
stage trains on) is computed here and recorded under the model folder's name.
"""

from __future__ import annotations

from pathlib import Path

from ember.eval.datafile import sample_data
from ember.eval.local_backend import LocalBackend
from ember.eval.results import Metric, format_table
from ember.eval.tasks import TaskOptions, run_task


def lifecycle_report(perplexity: dict[str, float], model_dir: Path) -> str:
    """Fill `perplexity` if empty (see the module docstring) and return the table."""
    backend = LocalBackend.from_dir(model_dir)
    if not perplexity:
        held_out = run_task("perplexity", backend, sample_data("perplexity/python_notes.jsonl"), TaskOptions())
        perplexity[model_dir.name] = held_out.value("token_perplexity")
    rows = [Metric(stage, "held-out perplexity", value, None, 0) for stage, value in perplexity.items()]
    mmlu = run_task("mmlu", backend, sample_data("mmlu"), TaskOptions())
    rows += [Metric(model_dir.name, f"mmlu sample {m.metric}", m.value, m.stderr, m.n) for m in mmlu.metrics]
    return format_table(rows, first_header="model")
