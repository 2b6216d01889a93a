"""Sub-block pruning: known answers (a removed half = a zero residual update), round trips, cache."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import make_tiny_llama
from shortened_llm.models import count_params, load_model, save_model
from shortened_llm.prune import remove_blocks
from shortened_llm.importance import criteria_for
from shortened_llm.importance import sublayer_importance
from shortened_llm.lessons.unit_comparison import kv_cache_bytes, n_for_equal_params
from shortened_llm.pipeline import prune_unit
from shortened_llm.subblock import SEALED_MODEL_TYPE, remove_sublayers, removed_sublayers, skipping_sublayers, unit_params


def _zeroed(model, unit, blocks):
    """The known answer: a half whose output projection is zero adds nothing to the residual stream."""
    ref = copy.deepcopy(model)
    for i in blocks:
        layer = ref.model.layers[i]
        proj = layer.self_attn.o_proj if unit == "attn" else layer.mlp.down_proj
        torch.nn.init.zeros_(proj.weight)
    return ref


@pytest.mark.parametrize("unit", ["attn", "mlp"])
def test_removed_half_equals_zero_update(unit, random_ids):
    model = make_tiny_llama(num_layers=4)
    ref = _zeroed(model, unit, [1, 2])
    remove_sublayers(model, unit, [1, 2])
    with torch.no_grad():
        assert torch.allclose(model(random_ids).logits, ref(random_ids).logits, atol=1e-6)
    assert removed_sublayers(model, unit) == [1, 2]
    assert count_params(model) == count_params(ref) - 2 * unit_params(ref, unit)
    assert model.pruning.kept_blocks == [0, 1, 2, 3]
    assert (model.pruning.removed_attn if unit == "attn" else model.pruning.removed_mlp) == [1, 2]


def test_cached_generation_and_kv_cache_shrink(random_ids):
    model = make_tiny_llama(num_layers=4)
    dense_kv = kv_cache_bytes(model, 16)
    remove_sublayers(model, "attn", [0, 2])
    remove_sublayers(model, "mlp", [3])
    assert [b.self_attn.layer_idx for b in model.model.layers] == [None, 0, None, 1]  # renumbered cache slots
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(random_ids, **kw), model.generate(random_ids, use_cache=False, **kw))
    assert kv_cache_bytes(model, 16) * 2 == dense_kv  # 2 of 4 attentions hold keys and values


def test_save_load_identical_and_plain_transformers_refuses(tmp_path, random_ids, embedded):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(num_layers=5, vocab_size=len(embedded[1]))
    remove_blocks(model, [4])
    remove_sublayers(model, "attn", [1])
    remove_sublayers(model, "mlp", [0, 3])
    out = save_model(model, embedded[1], tmp_path / "sub")
    loaded, _ = load_model(out, device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(random_ids).logits, model(random_ids).logits)
    assert loaded.pruning.removed_attn == [1] and loaded.pruning.removed_mlp == [0, 3]
    assert loaded.pruning.removed_blocks == [4]
    assert json.loads((out / "config.json").read_text())["model_type"] == SEALED_MODEL_TYPE
    assert "load_model" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match=SEALED_MODEL_TYPE):
        AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("unit", ["attn", "mlp"])
def test_removing_every_half_is_refused_before_any_change(unit, random_ids):
    model = make_tiny_llama(num_layers=3)
    remove_sublayers(model, unit, [0])
    with pytest.raises(ValueError, match=f"no {unit}"):
        remove_sublayers(model, unit, [1, 2])
    assert removed_sublayers(model, unit) == [0]
    with pytest.raises(ValueError, match=f"no {unit}"):
        prune_unit(model, None, unit, n=2, criterion="reverse")


@pytest.mark.parametrize("criterion", criteria_for("mlp"))
def test_criteria_shape_and_removed_halves_infinite(criterion, random_ids):
    model = make_tiny_llama(num_layers=4)
    remove_sublayers(model, "mlp", [2])
    options = {"n": 1, "progress": False} if criterion == "sleb" else {}
    options.update({"progress": False} if criterion in ("ppl", "bi") else {})
    scores = sublayer_importance(model, random_ids, "mlp", criterion, **options)
    assert scores.shape == (4,) and torch.isinf(scores[2]) and torch.isfinite(scores[[0, 1, 3]]).all()


def test_ppl_score_is_the_ppl_without_that_half(random_ids):
    from shortened_llm.evaluate import shifted_nll

    model = make_tiny_llama(num_layers=4)
    scores = sublayer_importance(model, random_ids, "attn", "ppl", progress=False)
    with skipping_sublayers(model, "attn", [2]), torch.no_grad():
        nll = shifted_nll(model(random_ids).logits, random_ids).double().mean()
    assert scores[2].item() == pytest.approx(torch.exp(nll).item(), rel=1e-6)
    assert removed_sublayers(model, "attn") == []  # the context manager restored everything
    greedy = sublayer_importance(model, random_ids, "attn", "sleb", n=1, progress=False)
    assert int(torch.argmin(greedy)) == int(torch.argmin(scores))  # first greedy removal = one-shot minimum


def test_equal_params_and_unknown_names():
    model = make_tiny_llama(num_layers=4)  # block: attn 32*32*2+32*16*2 (+norm), mlp 3*32*64 (+norm)
    n_mlp = n_for_equal_params(model, "mlp", 1)
    assert n_mlp == round(unit_params(model, "block") / unit_params(model, "mlp"))
    with pytest.raises(ValueError, match="attn halves"):
        n_for_equal_params(model, "attn", 3)
    with pytest.raises(ValueError, match="Did you mean 'ppl'"):
        sublayer_importance(model, torch.zeros(1, 4, dtype=torch.long), "attn", "ppll")
    with pytest.raises(ValueError, match="unit='head'"):
        remove_sublayers(model, "head", [0])


def test_cli_prune_unit_attn(tmp_path, tiny_llama_dir, capsys):
    from shortened_llm.cli import main

    out = tmp_path / "attn"
    assert main(["prune", "--model", str(tiny_llama_dir), "--unit", "attn", "--criterion", "bi", "--ratio", "0.34",
                 "--preset", "tiny", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["unit"] == "attn" and len(printed["removed"]) == 2
    model, _ = load_model(out, device="cpu")
    assert removed_sublayers(model, "attn") == printed["removed"]


def test_relative_to_compares_each_model_with_dense_at_the_same_context():
    import pandas as pd

    from shortened_llm.lessons.unit_comparison import relative_to

    speed = pd.DataFrame({"model": ["dense", "attn", "dense", "attn"], "context": [128, 128, 2048, 2048],
                          "latency_s": [2.0, 1.0, 10.0, 8.0], "kv_cache_mb": [4.0, 1.0, 64.0, 16.0]})
    out = relative_to(speed)
    assert out.speedup.tolist() == [1.0, 2.0, 1.0, 1.25] and out.kv_vs_dense.tolist() == [1.0, 0.25, 1.0, 0.25]


@pytest.mark.parametrize("unit", ["block", "attn", "mlp"])
def test_every_unit_skipping_gives_the_logits_of_removing(unit, random_ids):
    """The unit interface's round trip: scoring runs the model as removal leaves it, and restores it."""
    from shortened_llm.units import UNITS

    model = make_tiny_llama(num_layers=4)
    dense = copy.deepcopy(model)
    with torch.no_grad():
        before = model(random_ids).logits
        with UNITS[unit].skipping(model, [1, 2]):
            skipped = model(random_ids).logits
        assert torch.equal(model(random_ids).logits, before)  # restored on exit
        removed = UNITS[unit].remove(copy.deepcopy(model), [1, 2], criterion="reverse", ratio=0.5)
        assert torch.equal(removed(random_ids).logits, skipped)
    assert UNITS[unit].alive(removed) == ([0, 1] if unit == "block" else [0, 3])
    assert removed.pruning.criterion == "reverse" and removed.pruning.ratio == 0.5
    assert count_params(dense) - count_params(removed) == 2 * UNITS[unit].params(dense)


def test_unknown_unit_gets_did_you_mean():
    from shortened_llm.units import get_unit

    with pytest.raises(ValueError, match="Unknown unit 'atn'. Did you mean 'attn'"):
        get_unit("atn")


def test_equal_param_models_prunes_each_unit_to_the_parameters_of_k_blocks(tiny_llama_dir, embedded):
    """Block 9280 params, attn half 3104, MLP half 6176: one block ~ 3 attention halves ~ 2 MLP halves."""
    from shortened_llm.lessons.unit_comparison import equal_param_models

    dense = count_params(load_model(tiny_llama_dir, device="cpu")[0])
    ids = torch.randint(3, len(embedded[1]), (2, 12), generator=torch.Generator().manual_seed(0))
    found = equal_param_models(str(tiny_llama_dir), ids, n_blocks=1, criterion="reverse")  # deepest first
    assert {u: found[u][2] for u in ("block", "attn", "mlp")} == {"block": [5], "attn": [3, 4, 5], "mlp": [4, 5]}
    assert removed_sublayers(found["attn"][0], "attn") == [3, 4, 5]
    cut = {u: dense - count_params(found[u][0]) for u in ("block", "attn", "mlp")}
    assert cut == {"block": 9280, "attn": 3 * 3104, "mlp": 2 * 6176}
