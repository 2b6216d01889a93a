"""Width pruning: a real, smaller model; equal size to depth pruning; known answers on a tiny Llama."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_llama
from shortened_llm.architectures import architecture_config, architecture_only_model, pruned_config
from shortened_llm.models import count_params, load_model, save_model
from shortened_llm.prune import remove_blocks
from shortened_llm.width import plan_width, unit_sizes, width_prune


pytestmark = pytest.mark.usefixtures("one_thread")


def test_unit_sizes_match_module_shapes(tiny_llama):
    sizes = unit_sizes(tiny_llama.config)
    attn, mlp = tiny_llama.model.layers[0].self_attn, tiny_llama.model.layers[0].mlp
    attn_total = sum(p.numel() for p in attn.parameters())
    mlp_total = sum(p.numel() for p in mlp.parameters())
    assert sizes["kv_group"] * sizes["kv_groups"] == attn_total
    assert sizes["channel"] * sizes["channels"] == mlp_total


@pytest.mark.parametrize("n_removed", [1, 2])
def test_width_matches_depth_param_count(n_removed):
    dense = make_tiny_llama(num_layers=4)
    depth = remove_blocks(copy.deepcopy(dense), list(range(n_removed)))
    width = width_prune(copy.deepcopy(dense), target_params=count_params(depth))
    channel = unit_sizes(dense.config)["channel"]
    assert abs(count_params(width) - count_params(depth)) <= len(width.model.layers) * channel / 2
    assert len(width.model.layers) == 4
    assert width.pruning.method == "width" and width.pruning.params_after == count_params(width)


def test_keeps_the_largest_channels_and_their_weights():
    """Known answer: zero some channels' weights; magnitude pruning must remove exactly those."""
    model = make_tiny_llama(num_layers=2)
    mlp = model.model.layers[0].mlp
    weak = [3, 10, 20]
    with torch.no_grad():
        for c in weak:
            mlp.gate_proj.weight[c] = 0
            mlp.up_proj.weight[c] = 0
            mlp.down_proj.weight[:, c] = 0
    expected_gate = torch.cat([mlp.gate_proj.weight[c : c + 1] for c in range(64) if c not in weak])
    total = count_params(model)
    plan = plan_width(model.config, 2 * 3 * unit_sizes(model.config)["channel"], kv_groups=0)
    assert plan.channels_removed == 3
    width_prune(model, target_params=total - plan.params_removed_per_block * 2, kv_groups=0)
    assert torch.equal(model.model.layers[0].mlp.gate_proj.weight, expected_gate)
    assert model.config.intermediate_size == 61


def test_removing_a_kv_group_removes_its_query_heads():
    model = make_tiny_llama(num_layers=1)  # 4 query heads, 2 KV groups, head_dim 8
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # make group 0 the weak one: its 2 query heads, its k/v head, its o columns
        attn.q_proj.weight[:16] *= 1e-3
        attn.k_proj.weight[:8] *= 1e-3
        attn.v_proj.weight[:8] *= 1e-3
        attn.o_proj.weight[:, :16] *= 1e-3
    keep_q, keep_k, keep_o = attn.q_proj.weight[16:].clone(), attn.k_proj.weight[8:].clone(), attn.o_proj.weight[:, 16:].clone()
    group = unit_sizes(model.config)["kv_group"]
    width_prune(model, target_params=count_params(model) - group, kv_groups=1)
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.weight, keep_q) and torch.equal(attn.k_proj.weight, keep_k)
    assert torch.equal(attn.o_proj.weight, keep_o)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)


def test_save_reload_plain_hf_dir(tmp_path, random_ids):
    model = width_prune(make_tiny_llama(), ratio=0.3)
    before = model(random_ids).logits
    save_model(model, None, tmp_path / "w")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "w").eval()  # no custom code
    assert torch.allclose(again(random_ids).logits, before, atol=1e-6)
    assert '"method": "width"' in (tmp_path / "w" / "pruning.json").read_text()


def test_cached_generation_equals_uncached(random_ids):
    model = width_prune(make_tiny_llama(), ratio=0.25)
    ids = random_ids[:1, :6]
    cached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"),
    ({"ratio": 0.2, "target_params": 10}, "exactly one"),
    ({"ratio": 1.5}, "ratio=1.5"),
    ({"target_params": 10**9}, "target_params"),
    ({"ratio": 0.99}, "cannot remove"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        width_prune(make_tiny_llama(), **kwargs)


# ---- architecture-only models: shipped configs give the official parameter counts ----------

OFFICIAL = {  # shared/reference/official_results.csv (params column)
    ("llama-1-7b", None): 6738415616, ("llama-1-7b", "depth"): 5524115456,
    ("vicuna-13b", None): 13015864320, ("vicuna-13b", "depth"): 10478228480,
    ("llama-3-8b", None): 8030261248,
}


@pytest.mark.parametrize("name, prune", list(OFFICIAL))
def test_architecture_param_counts(name, prune):
    model = architecture_only_model(name, device="meta", prune=prune)
    assert count_params(model) == OFFICIAL[(name, prune)]


@pytest.mark.parametrize("name", ["llama-1-7b", "llama-3-8b"])
def test_architecture_width_equals_depth_size(name):
    depth = count_params(architecture_only_model(name, device="meta", prune="depth"))
    width = architecture_only_model(name, device="meta", prune="width")
    assert abs(count_params(width) - depth) / depth < 1e-4
    assert width.config.num_hidden_layers == architecture_config(name).num_hidden_layers


def test_unknown_architecture():
    with pytest.raises(ValueError, match="Did you mean 'llama-1-7b'"):
        architecture_config("llama-1-7")
    with pytest.raises(ValueError, match="prune="):
        pruned_config(architecture_config("llama-1-7b"), "sideways")


@pytest.mark.integration
def test_embedded_width_prune_runs(tmp_path):
    model, tok = load_model("smollm2-135m", device="cpu")
    depth_params = count_params(model) - 6 * sum(p.numel() for p in model.model.layers[0].parameters())
    width_prune(model, target_params=depth_params)
    assert model.config.num_key_value_heads in (1, 2, 3)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_width_reads_the_projection_names_from_the_family_table():
    from shortened_llm.models import tiny_random_model

    qwen = width_prune(tiny_random_model("qwen2", num_layers=2), ratio=0.3)  # Llama-style names, with biases
    assert qwen.config.intermediate_size < 64 and qwen.pruning.method == "width"
    with pytest.raises(TypeError, match="model_type='phi3' has none"):  # fused qkv_proj / gate_up_proj
        width_prune(tiny_random_model("phi3", num_layers=2), ratio=0.3)
