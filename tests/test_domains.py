"""Dynamic batch loading inside the HF Trainer: the dataset draws by the weights, the callback moves them, CPT saves them."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import make_char_tokenizer, make_tiny_llama

from shortened_llm.domains import WEIGHTS_FILE, DomainMixture, DynamicBatchLoader, DynamicBatchLoadingCallback
from shortened_llm.prune import remove_blocks
from shortened_llm.retrain import continued_pretrain

TEXTS = {"fox": ["the quick brown fox jumps over the lazy dog. " * 40],
         "box": ["pack my box with five dozen liquor jugs! " * 40]}


def _loader():
    return DynamicBatchLoader(make_char_tokenizer(), TEXTS, block_size=32, val_blocks=2)


def test_the_mixture_draws_rows_by_the_weights_of_the_moment_and_repeats_an_index():
    loader = _loader()
    mixture = DomainMixture(loader, seed=3)
    fox, box = (set(map(tuple, d.train.tolist())) for d in loader.domains)
    loader.weights = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert all(tuple(mixture[i]["input_ids"]) in fox for i in range(20))
    loader.weights = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert all(tuple(mixture[i]["input_ids"]) in box for i in range(20))
    assert mixture[7] == mixture[7] and mixture[7]["labels"] == mixture[7]["input_ids"]
    assert len(mixture) == sum(len(d.train) for d in loader.domains)


def test_the_callback_moves_weight_to_the_domain_above_its_reference_every_m_steps():
    loader = _loader()
    model = make_tiny_llama(vocab_size=len(make_char_tokenizer()))
    losses = loader.held_out_losses(model, 2)
    loader.set_reference([losses[0] - 1.0, losses[1] + 1.0])  # fox is 1 nat above its reference, box below
    callback, before = DynamicBatchLoadingCallback(loader, interval=3, micro_batch=2), loader.weights.clone()
    model.train()
    callback.on_step_end(None, SimpleNamespace(global_step=2), None, model=model)
    assert torch.equal(loader.weights, before) and len(loader.history) == 1  # not an update step
    callback.on_step_end(None, SimpleNamespace(global_step=3), None, model=model)
    assert loader.weights[0] > before[0] and loader.weights[1] < before[1] and model.training
    assert loader.history[-1]["step"] == 3


def test_cpt_with_dynamic_batch_loading_saves_the_weights_over_time(tmp_path, monkeypatch):
    import shortened_llm.data

    # the preset's domain names, each a short text (the pack's books take 16 s to tokenize)
    monkeypatch.setattr(shortened_llm.data, "load_texts", lambda name, **_: TEXTS["fox" if name == "bookcorpus" else "box"])
    tok = make_char_tokenizer()
    dense = make_tiny_llama(vocab_size=len(tok))
    pruned = remove_blocks(copy.deepcopy(dense), [1, 2])
    with pytest.raises(ValueError, match="reference_model"):
        continued_pretrain(pruned, tok, tmp_path / "no-reference", preset="tiny", cpt_dynamic_batch_loading=True)
    result = continued_pretrain(pruned, tok, tmp_path / "cpt", preset="tiny", max_steps=2, progress=False, reference_model=dense, cpt_dynamic_batch_loading=True)
    saved = json.loads((result.out_dir / WEIGHTS_FILE).read_text())
    assert saved["domains"] == ["bookcorpus", "c4"] and saved["update_every_steps"] == 1  # tiny: every step
    assert [row["step"] for row in saved["history"]] == [0, 1, 2]
    assert all(sum(row["weights"].values()) == pytest.approx(1.0) for row in saved["history"])
    assert set(saved["reference"]) == {"bookcorpus", "c4"} and saved["history"][-1]["losses"] is not None
    assert json.loads((result.out_dir / "training.json").read_text())["cpt_dynamic_batch_loading"] is True


def test_cli_retrain_cpt_takes_dynamic_batch_loading_and_the_reference(tmp_path, monkeypatch, capsys, tiny_llama_dir):
    import shortened_llm.data
    from shortened_llm.cli import main

    monkeypatch.setattr(shortened_llm.data, "load_texts", lambda name, **_: TEXTS["fox" if name == "bookcorpus" else "box"])
    out = tmp_path / "cpt"
    argv = ["retrain", "cpt", "--model", str(tiny_llama_dir), "--out", str(out), "--preset", "tiny", "--max-steps", "1",
            "--dynamic-batch-loading", "--reference-model", str(tiny_llama_dir)]
    assert main(argv) == 0
    assert [row["step"] for row in json.loads((out / WEIGHTS_FILE).read_text())["history"]] == [0, 1]
    assert main(argv[:-3] + ["--overwrite"]) == 0 and not (out / WEIGHTS_FILE).exists()  # off unless asked
