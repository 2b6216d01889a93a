"""Every supported decoder family, pruned on a tiny random model built offline from its config class.

Per family (``shortened_llm.models.FAMILIES``): layer count and renumbered cache slots,
per-layer config lists that follow the removal, greedy generation with KV cache equal to
generation without it, pruned logits equal to the unpruned model with those blocks
bypassed, save -> ``from_pretrained`` -> identical logits, every registered criterion,
perplexity and the family's BOS default. Llama basics (record, ratios, atomic save) are in
test_prune.py; zero-shot (lm-eval) on every family is tested here too, GGUF per family in test_export.py.
"""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from shortened_llm import remove_blocks, save_model
from shortened_llm.data import calibration_batches, load_texts
from shortened_llm.evaluate import default_bos, perplexity, ppl_segments
from shortened_llm.importance import CRITERIA, block_importance
from shortened_llm.models import FAMILIES, TINY_CONFIGS, family_of, get_blocks, num_blocks, tiny_random_model
from shortened_llm.prune import skipping_blocks

FAMILY_NAMES = sorted(FAMILIES)
N_BLOCKS = 6
REMOVE = [1, 4]  # Gemma-2 S F S F S F -> S S F F; Gemma-3 (period 3) S S F S S F -> S F S F
KEEP = [i for i in range(N_BLOCKS) if i not in REMOVE]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: one thread is faster, and with a busy CPU two threads spin-wait (seen here: 50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(n=2, t=12, vocab=128, seed=0):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _pair(model_type, **kw):
    """(original, pruned copy) of one tiny random model."""
    original = tiny_random_model(model_type, num_layers=N_BLOCKS, **kw)
    return original, remove_blocks(copy.deepcopy(original), REMOVE)


def _index_holders(block):
    """Every module of a block that carries a KV-cache index."""
    return [m for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def _sliding_windows(model):
    """Per block: the sliding window its attention uses (None = global), where the family has one."""
    attn = family_of(model).attn
    return [getattr(getattr(b, attn), "sliding_window", "n/a") for b in get_blocks(model)]


@torch.no_grad()
def _logits(model, ids):
    return model(ids, use_cache=False).logits


# ---- the table itself ------------------------------------------------------------------------

def test_every_family_has_a_tiny_config_with_the_table_paths():
    assert set(TINY_CONFIGS) == set(FAMILIES)
    for name in FAMILY_NAMES:
        model = tiny_random_model(name, num_layers=2)
        assert model.config.model_type == name and num_blocks(model) == 2
        for block in get_blocks(model):
            for path in family_of(model).index_paths:
                assert hasattr(block.get_submodule(path) if path else block, "layer_idx"), (name, path)
            # the table names every module holding a cache index, none is left out of renumbering
            assert len(_index_holders(block)) == len(family_of(model).index_paths), name


def test_unknown_tiny_model_type_suggests_a_name():
    with pytest.raises(ValueError, match="Did you mean 'gemma2'.*Available: .*qwen3"):
        tiny_random_model("gemma_2")


# ---- pruning: structure and config -----------------------------------------------------------

@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_prune_count_cache_indices_and_per_layer_config(name):
    original, pruned = _pair(name)
    assert num_blocks(pruned) == pruned.config.num_hidden_layers == len(KEEP)
    assert pruned.pruning.kept_blocks == KEEP
    for new_idx, block in enumerate(get_blocks(pruned)):
        assert {m.layer_idx for m in _index_holders(block)} == {new_idx}
    family = family_of(pruned)
    for attr in family.layer_lists:
        before = getattr(original.config, attr)
        assert getattr(pruned.config, attr) == [before[i] for i in KEEP]
    # the kept attention modules still use the window their config entry says
    windows = _sliding_windows(pruned)
    assert windows == [_sliding_windows(original)[i] for i in KEEP]
    if getattr(pruned.config, "layer_types", None) is not None and windows[0] != "n/a":
        assert [w is not None for w in windows] == [t == "sliding_attention" for t in pruned.config.layer_types]
    # Qwen: the list the config would rebuild from max_window_layers is the pruned list
    for attr in family.first_k_counts:
        k, cfg = getattr(pruned.config, attr), pruned.config
        rebuilt = ["sliding_attention" if cfg.sliding_window is not None and i >= k else "full_attention"
                   for i in range(len(KEEP))]
        assert rebuilt == cfg.layer_types


@pytest.mark.parametrize("name", FAMILY_NAMES)
@torch.no_grad()
def test_cached_greedy_generation_equals_uncached(name):
    _, pruned = _pair(name)
    prompt = _ids(n=1, t=10)  # 10 + 12 new tokens > the sliding window of 8
    with_cache = pruned.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    without = pruned.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    # and the cache holds one layer per kept block, sliding where the block slides
    out = pruned(prompt, use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    assert len(cache.layers) == len(KEEP)
    if getattr(pruned.config, "layer_types", None) is not None:
        assert cache.is_sliding == [t == "sliding_attention" for t in pruned.config.layer_types]


def _bypass(block):
    """A forward hook that makes ``block`` hand on its input unchanged."""
    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return block.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_pruned_logits_equal_the_unpruned_model_bypassing_those_blocks(name):
    original, pruned = _pair(name)
    ids = _ids(t=16)
    hooks = [_bypass(get_blocks(original)[i]) for i in REMOVE]
    try:
        expected = _logits(original, ids)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(_logits(pruned, ids), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(original, ids), expected)  # the bypass did change something


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_save_then_plain_from_pretrained_gives_identical_logits(name, tmp_path):
    _, pruned = _pair(name)
    save_model(pruned, None, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert num_blocks(reloaded) == len(KEEP)
    for attr in ("num_hidden_layers", *family_of(pruned).layer_lists, *family_of(pruned).first_k_counts):
        assert getattr(reloaded.config, attr) == getattr(pruned.config, attr), attr
    assert _sliding_windows(reloaded) == _sliding_windows(pruned)
    ids = _ids(t=16)
    assert torch.equal(_logits(reloaded, ids), _logits(pruned, ids))


def test_gemma3_pattern_is_dropped_when_the_pruned_layout_has_no_period(tmp_path):
    model = tiny_random_model("gemma3_text", num_layers=N_BLOCKS)  # S S F S S F, pattern 3
    remove_blocks(model, [0])  # S F S S F: no "every k-th is global" any more
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention",
                                         "sliding_attention", "full_attention"]
    assert "sliding_window_pattern" not in model.config.to_dict()
    save_model(model, None, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert reloaded.config.layer_types == model.config.layer_types
    assert _sliding_windows(reloaded) == _sliding_windows(model)


def test_heterogeneous_per_layer_config_follows_its_blocks():
    """transformers' per_layer_config (per-layer head counts): overrides move with their block."""
    from shortened_llm.prune import _subset_config
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                         per_layer_config={1: {"num_key_value_heads": 1}, 3: {"intermediate_size": 48}})
    _subset_config(config, [0, 2, 3], 4)
    assert config.num_hidden_layers == 3
    assert config.to_dict()["per_layer_config"] == {"2": {"intermediate_size": 48}}
    _subset_config(config, [0, 1], 3)
    assert not config.is_heterogeneous


def test_a_list_that_only_happens_to_have_n_entries_is_left_alone():
    """Llama-3 has eos_token_id=[a, b, c]; in a 3-block model that is not a per-layer list."""
    model = tiny_random_model("llama", num_layers=3, eos_token_id=[2, 3, 4])
    remove_blocks(model, [1])
    assert model.config.eos_token_id == [2, 3, 4]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_skipping_blocks_restores_config_and_indices(name):
    model, pruned = _pair(name)
    ids = _ids()
    before, config_before = _logits(model, ids), model.config.to_dict()
    with skipping_blocks(model, REMOVE):
        assert num_blocks(model) == len(KEEP)
        assert model.config.to_dict() == pruned.config.to_dict()
        assert torch.equal(_logits(model, ids), _logits(pruned, ids))
    assert model.config.to_dict() == config_before
    assert torch.equal(_logits(model, ids), before)
    for i, block in enumerate(get_blocks(model)):
        assert {m.layer_idx for m in _index_holders(block)} == {i}


# ---- criteria, perplexity, BOS ---------------------------------------------------------------

_SCORED: dict = {}  # one model per family, shared by its criteria: each must leave it as it found it


def _scored_model(name):
    if name not in _SCORED:
        model = tiny_random_model(name, num_layers=4)
        ids = _ids(t=16)
        _SCORED[name] = (model, ids, _logits(model, ids), model.config.to_dict())
    return _SCORED[name]


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_criterion_scores_every_block_and_leaves_the_model_intact(name, criterion):
    model, ids, logits_before, config_before = _scored_model(name)
    scores = block_importance(model, ids, criterion)
    assert scores.shape == (4,) and torch.isfinite(torch.as_tensor(scores)).all()
    assert model.config.to_dict() == config_before
    assert torch.equal(_logits(model, ids), logits_before)
    for p in model.parameters():
        assert p.grad is None  # gradient criteria clean up after themselves


@pytest.fixture(scope="module")
def word_tokenizer():
    """A word-level tokenizer trained offline on a few calibration passages (BOS=1, EOS=2, PAD=0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(load_texts("bookcorpus")[:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_perplexity_follows_the_family_bos_and_accepts_an_override(name, word_tokenizer):
    tok = word_tokenizer
    model = tiny_random_model(name, num_layers=4, tokenizer=tok)
    bos_every = family_of(model).bos_every
    assert bos_every == name.startswith("gemma")
    assert default_bos(model) == ("per-segment" if bos_every else "once")
    kw = {"dataset": "ptb", "seq_len": 16, "max_segments": 2, "progress": False}
    ppl_default = perplexity(model, tok, **kw)
    ppl_same = perplexity(model, tok, bos=default_bos(model), **kw)
    other = "once" if bos_every else "per-segment"
    ppl_other = perplexity(model, tok, bos=other, **kw)
    assert 1 < ppl_default < 10 * len(tok) and ppl_default == ppl_same and ppl_other != ppl_default
    segments = ppl_segments(tok, "ptb", 16, default_bos(model), max_segments=2)
    assert bool((segments[:, 0] == tok.bos_token_id).all()) == bos_every
    # pruned model: still a finite perplexity
    remove_blocks(model, [1])
    assert 1 < perplexity(model, tok, **kw) < float("inf")
    # calibration as the CLI and claims build it follows the family; the caller can override
    calib = calibration_batches(tok, n_samples=2, seq_len=16, bos_every=bos_every)
    assert bool((calib[:, 0] == tok.bos_token_id).all()) == bos_every
    overridden = calibration_batches(tok, n_samples=2, seq_len=16, bos_every=not bos_every)
    assert bool((overridden[:, 0] == tok.bos_token_id).all()) == (not bos_every)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_zero_shot_runs_on_the_pruned_model_of_every_family(name, word_tokenizer):
    """lm-eval's HFLM scores a pruned model of each family: a real accuracy over the documents asked for."""
    from shortened_llm.zeroshot import zero_shot

    model = remove_blocks(tiny_random_model(name, num_layers=4, tokenizer=word_tokenizer), [1])
    table = zero_shot(model, word_tokenizer, tasks=("piqa",), limit=3, batch_size=3, average=False, progress=False)
    row = table.set_index("task").loc["piqa"]
    assert row.n_docs == 3 and row.value in (0.0, 1 / 3, 2 / 3, 1.0), row.to_dict()


# ---- bad input -------------------------------------------------------------------------------

def _bert():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=8, num_hidden_layers=2, num_attention_heads=1,
                                      intermediate_size=8))


def _vit():
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=1, intermediate_size=8,
                              image_size=8, patch_size=4))


@pytest.mark.parametrize("make", [_bert, _vit], ids=["encoder-only", "vision-only"])
def test_models_without_decoder_blocks_are_refused_before_any_work(make):
    model = make()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: get_blocks(model), lambda: remove_blocks(model, [0]),
                 lambda: block_importance(model, _ids(vocab=64), "ppl"), lambda: default_bos(model)):
        with pytest.raises(ValueError, match=r"not a supported decoder-only family.*Supported: gemma, gemma2"):
            call()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not hasattr(model, "pruning")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_removing_every_block_is_refused(name):
    model = tiny_random_model(name, num_layers=2)
    with pytest.raises(ValueError, match="would leave none"):
        remove_blocks(model, [0, 1])
    with pytest.raises(ValueError, match="would leave none"):
        with skipping_blocks(model, [0, 1]):
            pass
    assert num_blocks(model) == model.config.num_hidden_layers == 2


def test_the_ground_floor_imports_nothing_of_the_package_but_errors():
    import ast
    import sys
    from pathlib import Path

    import shortened_llm.families as families

    tree = ast.parse(Path(families.__file__).read_text())
    relative = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    absolute = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    absolute |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and not node.level}
    third_party = absolute - set(sys.stdlib_module_names)
    assert relative == {"errors"} and third_party <= {"torch", "transformers"}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_sublayer_and_width_names_point_at_real_modules(name):
    """One table says where everything lives: each name it gives exists in that family's blocks."""
    from torch import nn

    family = FAMILIES[name]
    block = get_blocks(tiny_random_model(name, num_layers=1))[0]
    if family.sublayers is not None:
        s = family.sublayers
        for path in (s.attn, *s.attn_norms, s.mlp, *s.mlp_norms):
            assert isinstance(block.get_submodule(path), nn.Module), path
    if family.width is not None:
        w = family.width
        for path in [f"{w.attn}.{p}" for p in (*w.qkv, w.out)] + [f"{w.mlp}.{p}" for p in (*w.gate_up, w.down)]:
            assert isinstance(block.get_submodule(path), nn.Linear), path
    assert (family.sublayers is None) == (name not in ("llama", "mistral", "phi3"))
