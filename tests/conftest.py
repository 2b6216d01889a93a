"""Shared fixtures: a tiny random Llama for fast unit tests, the embedded model for integration."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The offline pack: CI sets SHORTENED_LLM_DATA; a checkout beside shared/ finds it too
os.environ.setdefault("SHORTENED_LLM_DATA", str((ROOT.parent / "shared" / "data").resolve()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SHORTENED_LLM_DTYPE", "float32")  # tiny known answers are fp32; tests/test_dtype.py tests "auto"

# per-test time limits by kind, and a --dist loadgroup that survives a dead worker
from run_limits import pytest_collection_modifyitems, pytest_xdist_make_scheduler  # noqa: E402,F401


def make_tiny_llama(num_layers: int = 4, seed: int = 0, vocab_size: int = 128, **overrides):
    """``models.tiny_random_model("llama")``: a random Llama with GQA, every test on it takes milliseconds."""
    from shortened_llm.models import tiny_random_model

    return tiny_random_model("llama", num_layers=num_layers, vocab_size=vocab_size, seed=seed, **overrides)


def make_char_tokenizer(bos_first: bool = False):
    """A ~100-token character tokenizer (tiny LM heads: each training step takes milliseconds).

    ``bos_first`` prepends BOS to every encoding, as LLaMA's tokenizer does.
    """
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if bos_first:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of many tiny forward passes: two spinning threads slow them down."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def random_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 128, (3, 16), generator=g)


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M; converted once per cache dir."""
    from shortened_llm import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded):
    """A tiny random Llama saved with the embedded tokenizer: runs the CLI on real text in seconds."""
    from shortened_llm import save_model

    model = make_tiny_llama(num_layers=6, vocab_size=len(embedded[1]))
    return save_model(model, embedded[1], tmp_path_factory.mktemp("tiny") / "tiny-llama")
