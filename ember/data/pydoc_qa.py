"""The quickstart's own fine-tuning data: questions about the Python docs answered by the docs.

Every section of the bundled `pydoc_data.topics` (ember.data.sources.pydoc_topics) becomes a
question and an answer:

    user:       What does the Python documentation say about Boolean operations?
    assistant:  Boolean operations: In the context of Boolean operations, and also when expressions
                are used by control flow statements, the following values are interpreted as false: ...

(the section's title, then the first sentences of its prose, code and lists left out; sections
whose prose does not mention the title's words are dropped, so every answer is about its
question, and an answer names what it answers, as a good reply restates the subject). The
instruction set asks each question in several phrasings. The preference set pairs each question's
brief answer (title and first sentence; chosen) with the brief answers of several other sections
(rejected), balanced so that every answer is rejected as often as it is chosen: the only thing
that tells chosen from rejected is whether the answer is about the question. Short answers keep
the comparison on the topic rather than on forty tokens of section-specific wording, which a
small model would otherwise memorise (measured in README, "DPO"). Topics that pretraining holds out
(ember.data.shards) are left out. Sections are split into train
and held-out before anything is built, so held-out questions and answers are never trained on;
held-out pairs draw their rejecteds from held-out sections only.

    write_pydoc_sets("runs/quickstart/data", seed=0)   # sft_{train,val}.jsonl, dpo_{train,val}.jsonl
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ember.atomic import atomic_write_text
from ember.data.shards import VAL_FRACTION, holdout_key
from ember.data.sources import pydoc_topics

PHRASINGS = ("What does the Python documentation say about {}?",
             "Explain {} in Python.",
             "Summarize the Python reference on {}.")
_UNDERLINE = re.compile(r"([*=\-~^])\1{2,}")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"])")
_NOT_PROSE = re.compile(r"(\d+\.|\*|-) |New in|Changed in|Deprecated")


@dataclass(frozen=True)
class Section:
    title: str
    answer: str  # the first sentences of the section's prose

    @property
    def reply(self) -> str:
        return f"{self.title}: {self.answer}"

    @property
    def brief_reply(self) -> str:
        """The title and the answer's first sentence: what the preference pairs compare."""
        return f"{self.title}: {_SENTENCE_END.split(self.answer)[0]}"


def _paragraphs(lines: list[str]) -> list[str]:
    """Unindented paragraphs joined into single lines (indented lines are grammar or code)."""
    paras, current = [], []
    for line in [*lines, ""]:
        if not line.strip() or line.startswith(" "):
            if current:
                paras.append(" ".join(current))
                current = []
        else:
            current.append(line.strip())
    return paras


def _answer(paragraphs: list[str], max_chars: int) -> str:
    answer = ""
    for para in paragraphs:
        if _NOT_PROSE.match(para):
            continue
        para = para[:-1] + "." if para.endswith(":") else para  # "... is equivalent to:" + a code block
        for sentence in _SENTENCE_END.split(para):
            if answer and len(answer) + len(sentence) >= max_chars:
                return answer
            answer = f"{answer} {sentence}".strip()
        if len(answer) >= max_chars // 3:
            break
    return answer


def _about(title: str, answer: str) -> bool:
    stems = [w.lower().rstrip("s") for w in re.findall(r"[A-Za-z_]{4,}", title)]
    return any(s in answer.lower() for s in stems)


def pydoc_sections(max_chars: int = 280) -> list[Section]:
    """One (title, answer) per distinctly titled documentation section, in a stable order."""
    sections: dict[str, str] = {}
    for doc in pydoc_topics():
        if holdout_key(doc.text) < VAL_FRACTION:
            continue  # pretraining's held-out text, on which the quickstart measures every model
        lines = doc.text.split("\n")
        heads = [i for i in range(len(lines) - 1) if lines[i].strip() and not lines[i].startswith(" ")
                 and _UNDERLINE.fullmatch(lines[i + 1].strip())]
        for j, h in enumerate(heads):
            title = lines[h].strip()
            end = heads[j + 1] if j + 1 < len(heads) else len(lines)
            answer = _answer(_paragraphs(lines[h + 2:end]), max_chars)
            if title not in sections and len(answer) >= 40 and _about(title, answer):
                sections[title] = answer
    return [Section(t, a) for t, a in sections.items()]


def split_sections(sections: list[Section], held_out: float, seed: int) -> tuple[list[Section], list[Section]]:
    shuffled = sections[:]
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * held_out))
    return shuffled[n_val:], shuffled[:n_val]


def instruction_records(sections: list[Section], phrasings: int = len(PHRASINGS)) -> list[dict]:
    """OpenAI-format chat records: each section asked in the first `phrasings` ways."""
    return [{"messages": [{"role": "user", "content": q.format(s.title)},
                          {"role": "assistant", "content": s.reply}]}
            for s in sections for q in PHRASINGS[:phrasings]]


def preference_records(sections: list[Section], seed: int, per_section: int = 2) -> list[dict]:
    """prompt/chosen/rejected records: each section's brief reply against `per_section` other sections'.

    Round k pairs section i with section i + offset_k (distinct random offsets), so every reply is
    the chosen `per_section` times and the rejected as often: no reply is good or bad on its own,
    only as the answer to its own question. Rejecteds come from the same list, so held-out pairs
    never show a trained answer.
    """
    if len(sections) < 2:
        raise ValueError("preference pairs need at least two sections")
    offsets = random.Random(seed).sample(range(1, len(sections)), min(per_section, len(sections) - 1))
    return [{"prompt": PHRASINGS[(i + k) % len(PHRASINGS)].format(s.title),
             "chosen": s.brief_reply, "rejected": sections[(i + offset) % len(sections)].brief_reply}
            for i, s in enumerate(sections) for k, offset in enumerate(offsets)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def write_pydoc_sets(out: str | Path, seed: int = 0, held_out: float = 0.15,
                     max_sections: int | None = None) -> dict[str, Path]:
    """Write sft_train/sft_val (chat) and dpo_train/dpo_val (preference) jsonl files into `out`."""
    out = Path(out)
    sections = pydoc_sections()
    if max_sections is not None:
        sections = random.Random(seed).sample(sections, min(max_sections, len(sections)))
    train, val = split_sections(sections, held_out, seed)
    return {"sft_train": write_jsonl(out / "sft_train.jsonl", instruction_records(train)),
            "sft_val": write_jsonl(out / "sft_val.jsonl", instruction_records(val, phrasings=1)),
            # 8 rejecteds per question: more distinct pairs to learn the rule from, fewer to memorise;
            # 12 per held-out question: ~290 held-out pairs, so accuracy is not a 24-sample coin.
            "dpo_train": write_jsonl(out / "dpo_train.jsonl", preference_records(train, seed, per_section=8)),
            "dpo_val": write_jsonl(out / "dpo_val.jsonl", preference_records(val, seed + 1, per_section=12))}
