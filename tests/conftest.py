"""Shared fixtures: a tiny random Llama saved as a Hugging Face directory with a real (tiny,
trained-here) BPE tokenizer, and a hermetic data directory. Nothing is downloaded."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` run only where CUDA is present (never in CI, which has no GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


WORDS = ("the cat dog sat on a mat and ran to house tree bird sky blue green red small big "
         "river stone light dark quick slow over under near far").split()


def make_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n_words // 12)]
    return "\n".join(lines) + "\n"


def train_tokenizer(text: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def tiny_config(family: str, vocab: int):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig",
           "gemma": "GemmaConfig"}[family]
    extra = {"head_dim": 8} if family == "gemma" else {}
    return getattr(transformers, cls)(**common, **extra)


def tiny_model(family: str, vocab: int = 300, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, vocab)).eval()


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text")
    files = {}
    for name, seed, n in (("calib", 1, 6000), ("valid", 2, 3000), ("test", 3, 3000)):
        files[name] = root / f"{name}.txt"
        files[name].write_text(make_text(n, seed))
    return files


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, text_files) -> Path:
    """A saved tiny random Llama + trained tokenizer, loadable with from_pretrained."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = train_tokenizer(text_files["calib"].read_text())
    model = tiny_model("llama", vocab=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_variant(path: Path, tiny_llama_dir: Path, **config: object) -> Path:
    """A random Llama with the shared tiny model's tokenizer and config, but for `config`'s fields
    (more blocks, larger initial weights ...), saved in `path`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    cfg = tiny_config("llama", len(tokenizer))
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def one_thread():
    """Tiny matmuls on a shared, busy CPU: one thread is much faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("METRICGP_CACHE", str(cache))
    return cache
