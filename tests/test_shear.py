"""Shearing (learned structured pruning) and dynamic batch loading, on tiny random Llamas."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_char_tokenizer, make_tiny_llama

from shortened_llm.domains import DynamicBatchLoader, update_weights
from shortened_llm.families import count_params
from shortened_llm.models import save_model
from shortened_llm.shear import (
    HardConcrete,
    ShearMasks,
    ShearSettings,
    check_target,
    masked,
    prune_to_masks,
    save_sheared,
    shape_for_ratio,
    shape_params,
    shear_model,
)

# tiny Llama: 4 layers, hidden 32, 4 heads in 2 KV groups, 64 MLP channels
TARGET = {"num_hidden_layers": 3, "hidden_size": 24, "num_key_value_heads": 1, "intermediate_size": 40}
TEXTS = ["the quick brown fox jumps over the lazy dog. " * 40, "pack my box with five dozen liquor jugs! " * 40]


def _random_masks(model, target=TARGET, seed=1):
    masks = ShearMasks(model.config, check_target(model.config, target))
    torch.manual_seed(seed)
    for gate in masks.gates.values():
        gate.log_alpha.data = torch.randn_like(gate.log_alpha)
    return masks


def test_hard_concrete_gates_have_exact_zeros_and_ones_and_the_louizos_l0():
    gate = HardConcrete((4, 1000), droprate_init=0.5)
    gate.log_alpha.data[0], gate.log_alpha.data[1] = -30.0, 30.0  # beyond the noise's log-odds (+-13.8)
    z = gate.sample()
    assert (z[0] == 0).all() and (z[1] == 1).all()  # the stretch and clamp reach 0 and 1 exactly
    assert ((z[2:] == 0) | (z[2:] == 1)).float().mean() > 0.05 and ((z > 0) & (z < 1)).any()
    # E[L0] = P(z != 0) at log_alpha = 0: sigmoid(-beta log(-l/r)) = sigmoid(2/3 log 11)
    assert gate.expected_l0()[2, 0].item() == pytest.approx(1 / (1 + 11 ** (-2 / 3)), rel=1e-5)
    assert (gate.top_k(7).sum(-1) == 7).all()


def test_masked_model_with_final_masks_equals_the_cut_model_reloaded_by_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(num_layers=4)
    masks = _random_masks(model)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), masked(model, masks, "final"):
        expected = model(ids).logits
    kept = masks.kept()
    prune_to_masks(model, masks)
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 24
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2
    assert model.config.intermediate_size == 40
    assert count_params(model) == shape_params(make_tiny_llama().config, check_target(make_tiny_llama().config, TARGET))
    save_model(model, None, tmp_path / "sheared")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "sheared")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)
    record = json.loads((tmp_path / "sheared" / "pruning.json").read_text())
    assert record["method"] == "shear" and record["removed_blocks"] == [i for i in range(4) if i not in kept["layers"]]
    assert record["kept_hidden"] == kept["hidden"] and len(record["kept_hidden"]) == 24
    assert record["kept_kv_groups"] == [kept["kv_groups"][i] for i in kept["layers"]]
    assert all(len(c) == 40 for c in record["kept_channels"])


def test_a_zero_layer_gate_is_the_block_removed():
    from shortened_llm.prune import remove_blocks

    model = make_tiny_llama(num_layers=4)
    masks = ShearMasks(model.config, check_target(model.config, {"num_hidden_layers": 3}))
    masks.gates["layers"].log_alpha.data = torch.tensor([5.0, -5.0, 5.0, 5.0])
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), masked(model, masks, "mean"):
        gated = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(remove_blocks(make_tiny_llama(num_layers=4), [1])(ids).logits, gated)


@pytest.mark.parametrize("target, match", [
    ({"num_hidden_layers": 5}, "larger than the model's 4"),
    ({"intermediate_size": 65}, "larger than the model's 64"),
    ({"num_attention_heads": 3}, "not a multiple of the 2 query heads per KV group"),
    ({"num_attention_heads": 3, "num_key_value_heads": 1}, "KV groups do not fit"),
    ({"num_attention_heads": 4, "num_key_value_heads": 1}, "KV groups do not fit"),
    ({"hidden": 16}, "unknown target key"),
    ({"hidden_size": 0}, "must be an integer >= 1"),
    ({"hidden_size": 32}, "nothing to prune"),
    ({"hidden_size": 30}, "not a multiple of num_attention_heads=4"),
    (1.5, r"ratio=1.5 must be in \(0, 1\)"),
])
def test_bad_targets_fail_before_any_data_is_read(target, match):
    # data=[] would fail in packing: the target must be refused first
    with pytest.raises(ValueError, match=match):
        shear_model(make_tiny_llama(), make_char_tokenizer(), target, steps=2, preset="tiny", data=[])


def test_masks_short_of_the_target_raise_with_the_gap_never_a_larger_model():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match=r"did not reach the target in 1 steps: .*hidden: expected .* vs target 8"):
        shear_model(model, make_char_tokenizer(), {"hidden_size": 8}, steps=1, preset="tiny", data=TEXTS,
                    settings=ShearSettings(droprate_init=0.01, weights_lr=0.0))
    assert model.config.hidden_size == 32  # nothing was cut


def test_training_reaches_the_target_and_the_multipliers_ascend(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = make_char_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    target = {"num_hidden_layers": 3, "hidden_size": 24, "intermediate_size": 48}
    settings = ShearSettings(mask_lr=0.3, lambda_lr=5.0, droprate_init=0.01, target_warmup=0.5, tolerance=0.05)
    result = shear_model(model, tok, target, steps=40, preset="tiny", data=TEXTS, settings=settings)
    assert result.model.config.hidden_size == 24 and result.model.config.num_hidden_layers == 3
    first = result.log[0]
    # expected size above the (warming-up) target at the first step: lambda_1 rose by gradient ascent,
    # and lambda_2 too (its gradient, the squared gap, is never negative)
    assert first["expected_hidden"] > 24 and first["lambda_hidden_1"] > 0 and first["lambda_hidden_2"] > 0
    assert all((result.record.expected_at_end[s] - t) / n <= 0.05 for s, t, n in
               (("hidden", 24, 32), ("layers", 3, 4), ("channels", 48, 64)))
    out = save_sheared(result, tok, tmp_path / "run")
    assert {"pruning.json", "loss_log.csv", "training.json", "config.json"} <= {p.name for p in out.iterdir()}
    ids = torch.randint(3, len(tok), (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits, result.model(ids).logits)


def test_shape_for_ratio_lands_within_two_percent_of_the_target_count():
    config = make_tiny_llama(num_layers=4, intermediate_size=128, hidden_size=64).config
    dense = shape_params(config, check_target(config, {"hidden_size": 60}) | {"hidden_size": 64})
    shape = shape_for_ratio(config, 0.2)
    assert shape["num_hidden_layers"] == 4 and shape["num_key_value_heads"] == 2
    assert 0.78 * dense <= shape_params(config, shape) <= 0.8 * dense
    assert shape["hidden_size"] % config.num_attention_heads == 0  # or transformers refuses to save the config


def test_a_domain_above_its_reference_gains_weight():
    w = update_weights(torch.tensor([0.5, 0.5]), losses=torch.tensor([3.0, 2.0]), reference=torch.tensor([2.5, 2.5]))
    assert w[0] > 0.5 > w[1] and w.sum() == pytest.approx(1.0)
    assert w[0] / w[1] == pytest.approx(torch.e ** 0.5)  # exp(max(3 - 2.5, 0)) / exp(max(2 - 2.5, 0))


def test_dynamic_batch_loader_moves_weights_and_keeps_their_history():
    tok = make_char_tokenizer()
    loader = DynamicBatchLoader(tok, {"fox": [TEXTS[0]], "box": [TEXTS[1]]}, block_size=32, val_blocks=2)
    assert loader.sample(6).shape == (6, 32)
    loader.set_reference([1.0, 1.0])
    before = loader.weights.clone()
    loader.update(10, [2.0, 0.5])
    assert loader.weights[0] > before[0] and loader.weights[1] < before[1]
    lines = loader.history_csv().splitlines()
    assert lines[0] == "step,weight_fox,weight_box,loss_fox,loss_box" and lines[2].startswith("10,")
    ref = loader.measure_reference(make_tiny_llama(vocab_size=len(tok)), micro_batch=2)
    assert ref.shape == (2,) and (ref > 0).all()


def test_a_domain_without_held_out_text_is_named():
    tok = make_char_tokenizer()
    with pytest.raises(ValueError, match="domain 'short' has no held-out text"):
        DynamicBatchLoader(tok, {"fox": [TEXTS[0]], "short": ["tiny"]}, block_size=32, val_blocks=2)
    with pytest.raises(ValueError, match="domain 'box' has no held-out text"):
        DynamicBatchLoader(tok, {"fox": [TEXTS[0]], "box": ([TEXTS[1]], [])}, block_size=32, val_blocks=2)


def test_shearing_with_dynamic_batch_loading_saves_the_weights_over_time(tmp_path):
    tok = make_char_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    result = shear_model(model, tok, {"intermediate_size": 56}, steps=4, preset="tiny",
                         domains={"fox": [TEXTS[0]], "box": [TEXTS[1]]},
                         settings=ShearSettings(domain_interval=2, target_warmup=0.0, tolerance=0.2))
    out = save_sheared(result, tok, tmp_path / "run")
    rows = (out / "domain_weights.csv").read_text().splitlines()
    assert rows[0].startswith("step,weight_fox,weight_box") and [r.split(",")[0] for r in rows[1:]] == \
        ["0", "2", "4", "reference"]


def test_cli_shear_writes_a_plain_smaller_model_and_prints_the_summary(tmp_path, capsys, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from shortened_llm.cli import main

    out = tmp_path / "sheared"
    argv = ["shear", "--model", str(tiny_llama_dir), "--target-shape", '{"intermediate_size": 56}', "--steps", "2",
            "--preset", "tiny", "--out", str(out), "--tolerance", "0.5"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target"]["intermediate_size"] == 56 and summary["steps"] == 2
    assert summary["params_after"] < summary["params_before"]
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 56
    assert main(argv) == 2  # --out exists and --overwrite was not given
    assert "--overwrite" in capsys.readouterr().err


def test_a_sheared_model_the_notebook_gets_is_the_one_its_dir_reloads(tmp_path, monkeypatch, tiny_llama_dir):
    """method_pruned("shear") learns masks over fp32 weights; what it hands back is what a re-run loads
    from its dir: the same evaluation-cache key (weights, dtype, config), so a re-run of notebook 10
    reads the first run's numbers of it instead of measuring them again."""
    from shortened_llm.eval_cache import model_key
    from shortened_llm.models import load_model
    from shortened_llm.pipeline import method_pruned

    monkeypatch.setenv("SHORTENED_LLM_DTYPE", "bfloat16")  # a half dtype whatever this CPU has
    settings = ShearSettings(lambda_lr=50, droprate_init=0.01, target_warmup=0.5, weights_lr=0)
    dense, _ = load_model(tiny_llama_dir)
    out = tmp_path / "shear"
    first, _ = method_pruned("shear", str(tiny_llama_dir), out, preset="tiny", data=TEXTS, settings=settings,
                             target_params=int(0.8 * count_params(dense)))
    again, _ = method_pruned("shear", str(tiny_llama_dir), out, preset="tiny")  # the saved dir, loaded
    assert next(first.parameters()).dtype == torch.bfloat16
    assert model_key(first) == model_key(again)


def test_the_tiny_presets_defaults_reach_a_20_percent_target_without_flags():
    """The CLI's shear defaults come from the preset (steps, batches, learning rates): at tiny they must reach the
    target, so a run without flags cuts instead of raising (on the embedded model the paper's multiplier lr, meant
    for 3200 steps, left the hidden masks 7 % above target after 40: results/shear/)."""
    tok = make_char_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    result = shear_model(model, tok, 0.2, preset="tiny", data=TEXTS)
    assert result.record.steps == 10 and count_params(result.model) < 0.81 * result.record.params_before


def test_depth_width_and_shear_are_pruning_methods_removing_the_same_parameters():
    from shortened_llm.pruning_methods import get_pruning_method, pruning_methods

    assert pruning_methods() == ("depth", "width", "shear")
    with pytest.raises(ValueError, match="Did you mean 'shear'"):
        get_pruning_method("sheer")
    tok = make_char_tokenizer()
    dense = count_params(make_tiny_llama(vocab_size=len(tok)))
    depth = get_pruning_method("depth")(make_tiny_llama(vocab_size=len(tok)), tok, ratio=0.5, preset="tiny",
                                        criterion="magnitude")
    assert depth.pruning.method == "depth" and len(depth.pruning.removed_blocks) == 2
    with pytest.raises(ValueError, match="whole blocks"):
        get_pruning_method("depth")(make_tiny_llama(vocab_size=len(tok)), tok, target_params=dense // 2)
    goal = count_params(depth)
    width = get_pruning_method("width")(make_tiny_llama(vocab_size=len(tok)), tok, target_params=goal)
    sheared = get_pruning_method("shear")(make_tiny_llama(vocab_size=len(tok)), tok, target_params=goal, preset="tiny",
                                          data=TEXTS, settings=ShearSettings(lambda_lr=50, droprate_init=0.01,
                                                                              target_warmup=0.5, weights_lr=0))
    assert sheared.pruning.method == "shear" and sheared.pruning.seconds > 0
    for model in (width, sheared):  # each within 5 % of depth's count (one hidden dim of 32 is 3 %)
        assert abs(count_params(model) / goal - 1) < 0.05, (model.pruning.method, count_params(model), goal)
