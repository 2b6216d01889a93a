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


# The lessons run at preset tiny as two chains, each in order on one pytest worker and in one run dir,
# as `make reproduce` runs them: 01-07, the paper's path, each reusing what the ones before it saved,
# then the worked solutions of those notebooks in the same run dir, as a learner opens a solution after
# its lesson; and 08-10, which need only a pruned model (each computes it when alone), on the other
# worker. Every other test fills the workers around them.
LESSON_CHAINS = {"paper": ("01", "02", "03", "04", "05", "06", "07"), "beyond": ("08", "09", "10")}


def lesson_chain(path: Path) -> str:
    """The chain notebook (or solution) ``path`` runs in: ``NN_name.ipynb`` by its number."""
    return next(chain for chain, numbers in LESSON_CHAINS.items() if path.name[:2] in numbers)


def in_lesson_chain(path: Path, *marks):
    """``path`` as a test parameter on its chain's worker (``xdist_group``), with ``marks`` added."""
    return pytest.param(path, marks=[pytest.mark.xdist_group(f"lessons-{lesson_chain(path)}"), *marks], id=path.stem)


@pytest.fixture(scope="session")
def lesson_run_dir(tmp_path_factory):
    """``lesson_run_dir(path)``: the run dir of ``path``'s chain, shared by every test of the chain."""
    dirs = {}

    def run_dir(path: Path) -> Path:
        chain = lesson_chain(path)
        if chain not in dirs:
            dirs[chain] = tmp_path_factory.mktemp(f"run-{chain}")
        return dirs[chain]

    return run_dir


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
