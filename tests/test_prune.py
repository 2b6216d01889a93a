"""Known answers and round trips for remove_blocks on a tiny random Llama (STYLE.md, "The tests")."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from shortened_llm import remove_blocks, save_model
from shortened_llm.models import get_blocks, load_model
from shortened_llm.prune import num_blocks_for_ratio, skipping_blocks
from tests.conftest import make_tiny_llama


def manual_forward(model, ids, keep):
    """Logits of the original model's hidden-state path through only the ``keep`` blocks."""
    inner = model.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    rope = inner.rotary_emb(h, position_ids=pos)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    for i in keep:
        h = inner.layers[i](h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
    return model.lm_head(inner.norm(h))


def test_removal_keeps_the_other_blocks_with_their_weights(tiny_llama):
    original = [copy.deepcopy(b.state_dict()) for b in get_blocks(tiny_llama)]
    remove_blocks(tiny_llama, [1, 2])
    blocks = get_blocks(tiny_llama)
    assert len(blocks) == 2 and tiny_llama.config.num_hidden_layers == 2
    for block, orig in zip(blocks, (original[0], original[3])):
        for name, tensor in block.state_dict().items():
            assert torch.equal(tensor, orig[name])
    assert [b.self_attn.layer_idx for b in blocks] == [0, 1]
    assert tiny_llama.pruning.removed_blocks == [1, 2] and tiny_llama.pruning.kept_blocks == [0, 3]


@torch.no_grad()
def test_pruned_logits_equal_manual_path_without_those_blocks(random_ids):
    model = make_tiny_llama(num_layers=5)
    expected = manual_forward(model, random_ids, keep=[0, 2, 4])
    remove_blocks(model, [1, 3])
    torch.testing.assert_close(model(random_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_repeated_removal_records_original_indices(tiny_llama):
    model = make_tiny_llama(num_layers=6)
    remove_blocks(model, [1])  # originals now 0,2,3,4,5
    remove_blocks(model, [1, 3])  # current 1 and 3 = originals 2 and 4
    assert model.pruning.removed_blocks == [1, 2, 4]
    assert model.pruning.kept_blocks == [0, 3, 5]


@torch.no_grad()
def test_cached_generation_equals_uncached(random_ids):
    model = make_tiny_llama(num_layers=6)
    remove_blocks(model, [0, 4])
    prompt = random_ids[:1, :8]
    kwargs = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


@torch.no_grad()
def test_save_reload_gives_identical_logits(tmp_path, random_ids):
    model = make_tiny_llama(num_layers=5)
    remove_blocks(model, [2, 3], criterion="ppl", ratio=0.4, scores=[5, 4, 1, 2, 3])
    out = save_model(model, None, tmp_path / "pruned")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # no custom code
    assert plain.config.num_hidden_layers == 3
    torch.testing.assert_close(plain(random_ids).logits, model(random_ids).logits, rtol=0, atol=0)
    record = json.loads((out / "pruning.json").read_text())
    assert record["original_num_blocks"] == 5 and record["removed_blocks"] == [2, 3]
    assert record["criterion"] == "ppl" and record["ratio"] == 0.4 and record["scores"] == [5, 4, 1, 2, 3]


def test_skipping_blocks_restores_the_model(tiny_llama, random_ids):
    with torch.no_grad():
        before = tiny_llama(random_ids).logits
        with skipping_blocks(tiny_llama, [0, 2]):
            assert len(get_blocks(tiny_llama)) == 2
            skipped = tiny_llama(random_ids).logits
        after = tiny_llama(random_ids).logits
    assert torch.equal(before, after) and not torch.allclose(before, skipped)
    assert [b.self_attn.layer_idx for b in get_blocks(tiny_llama)] == [0, 1, 2, 3]
    assert tiny_llama.config.num_hidden_layers == 4


@pytest.mark.parametrize("blocks, error, match", [([4], IndexError, r"\[4\] out of range"),
                                                  ([-1], IndexError, r"\[-1\] out of range"),
                                                  ([0, 1, 2, 3], ValueError, "would leave none")])
def test_bad_block_lists_fail_before_any_work(tiny_llama, blocks, error, match):
    with pytest.raises(error, match=match):
        remove_blocks(tiny_llama, blocks)
    assert len(get_blocks(tiny_llama)) == 4


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.2, -0.1, 0.01])
def test_bad_ratios(ratio):
    with pytest.raises(ValueError, match="ratio"):
        num_blocks_for_ratio(30, ratio)


def test_ratio_rounds_like_the_paper():
    assert num_blocks_for_ratio(32, 0.2) == 6  # LLaMA-7B: 20 % = 6 blocks
    assert num_blocks_for_ratio(30, 0.2) == 6


def test_existing_output_dir_is_refused(tmp_path, tiny_llama):
    save_model(tiny_llama, None, tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_model(tiny_llama, None, tmp_path / "m")
    save_model(tiny_llama, None, tmp_path / "m", overwrite=True)


def test_interrupted_save_leaves_nothing(tmp_path, tiny_llama, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny_llama), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        save_model(tiny_llama, None, tmp_path / "half")
    assert list(tmp_path.iterdir()) == []


def test_load_model_restores_pruning_record(tmp_path, tiny_llama):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1}, unk_token="<unk>")),
                                  bos_token="<s>", unk_token="<unk>")
    remove_blocks(tiny_llama, [3])
    save_model(tiny_llama, tok, tmp_path / "m")
    model, _ = load_model(tmp_path / "m", device="cpu")
    assert model.pruning.removed_blocks == [3] and model.config.num_hidden_layers == 3


@pytest.mark.parametrize("unit", ["block", "attn"])
def test_prune_model_is_score_choose_remove(unit, random_ids):
    """The one pipeline: the same scores, choice and record as the three steps called by hand."""
    from shortened_llm.importance import block_importance, to_remove
    from shortened_llm.pipeline import prune_model
    from shortened_llm.units import UNITS

    model = make_tiny_llama(num_layers=6)
    by_hand = copy.deepcopy(model)
    model, removed, scores = prune_model(model, random_ids, "ppl+", 2, unit=unit, keep_first=1, keep_last=1,
                                         ratio=0.3, progress=False)
    expected = block_importance(by_hand, random_ids, "ppl", unit=unit, progress=False)
    assert torch.equal(scores, expected) and removed == to_remove(expected, 2, keep_first=1, keep_last=1)
    UNITS[unit].remove(by_hand, removed)
    with torch.no_grad():
        assert torch.equal(model(random_ids).logits, by_hand(random_ids).logits)
    assert (model.pruning.criterion, model.pruning.ratio, model.pruning.scores) == ("ppl+", 0.3, scores.tolist())


@pytest.mark.parametrize("unit, n, keep, match", [("block", 6, {}, "n=6 blocks to remove would leave no block"),
                                                  ("mlp", 6, {}, "n=6 mlp halves to remove would leave no mlp"),
                                                  ("block", 3, {"keep_first": 4, "keep_last": 2}, "only 0 of 6")])
def test_prune_model_refuses_before_any_scoring(unit, n, keep, match, random_ids, monkeypatch):
    from shortened_llm import pipeline

    def never(*args, **kwargs):
        raise AssertionError("scored although the removal was impossible")

    monkeypatch.setattr(pipeline, "block_importance", never)
    model = make_tiny_llama(num_layers=6)
    with pytest.raises(ValueError, match=match):
        pipeline.prune_model(model, random_ids, "ppl", n, unit=unit, **keep)
    assert len(get_blocks(model)) == 6 and not hasattr(model, "pruning")
