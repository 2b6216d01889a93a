"""Retraining: prompts and labels, bad input, LoRA outputs and merge, atomic outputs and resume."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from conftest import make_tiny_llama
from shortened_llm.prompts import alpaca_prompt, load_instructions, response_of, tokenize_record
from shortened_llm.prune import remove_blocks
from shortened_llm.retrain import (apply_adapter, checkpoints_dir, continued_pretrain, cpt_then_lora, lora_retrain,
                                   pack_blocks, retrain_or_load)

FAST = dict(preset="tiny", progress=False, cpt_block_size=32, lora_cutoff=48)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from shortened_llm.models import _embedded_checkpoint

    return AutoTokenizer.from_pretrained(_embedded_checkpoint("smollm2-135m"))


def tiny(tok, removed=(1,), seed=0):
    model = make_tiny_llama(vocab_size=len(tok), seed=seed)
    return remove_blocks(model, list(removed), criterion="test", ratio=0.25)


def test_prompt_template_and_labels_mask_the_prompt(tok):
    rec = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
    prompt = alpaca_prompt(rec["instruction"])
    assert prompt.endswith("### Instruction:\nAdd 2 and 3.\n\n### Response:\n") and "### Input" not in prompt
    assert "### Input:\nx\n\n" in alpaca_prompt("Do.", "x")
    assert response_of(prompt + " 5 ") == "5"
    row = tokenize_record(tok, rec, cutoff=256)
    n_prompt = len(tok(prompt).input_ids)
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:] and row["input_ids"][-1] == tok.eos_token_id
    assert len(tokenize_record(tok, rec, cutoff=8)["input_ids"]) == 8
    with pytest.raises(ValueError, match="cutoff=0"):
        tokenize_record(tok, rec, cutoff=0)


def test_pack_blocks_keeps_every_token_in_order(tok):
    blocks = pack_blocks(tok, ["one two three", "four five"], block_size=3)
    flat = sum((tok(t).input_ids + [tok.eos_token_id] for t in ["one two three", "four five"]), [])
    assert blocks.flatten().tolist() == flat[: blocks.numel()] and blocks.shape[1] == 3


def test_bad_inputs_are_clear_errors(tmp_path, tok):
    bad = tmp_path / "data.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(ValueError, match=r"record 1 .* lacks field\(s\) \['output'\]"):
        load_instructions(bad)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(ValueError, match="not a causal LM"):
        lora_retrain(str(bert), out_dir=tmp_path / "out", **FAST)
    with pytest.raises(ValueError, match="lora_cutoff=0"):
        lora_retrain(tiny(tok), tok, tmp_path / "out", preset="tiny", lora_cutoff=0)
    assert not (tmp_path / "out").exists()


def test_lora_saves_adapter_and_trainable_merged_model(tmp_path, tok):
    from shortened_llm import load_model

    out = tmp_path / "lora"
    result = lora_retrain(tiny(tok), tok, out, max_steps=1, **FAST)
    assert {"adapter", "config.json", "pruning.json", "loss_log.csv", "training.json"} <= {p.name for p in out.iterdir()}
    assert not checkpoints_dir(out).exists()
    assert all(p.requires_grad for p in result.model.parameters())  # merge_and_unload left them frozen
    assert type(result.model).__name__ == "LlamaForCausalLM" and result.model.pruning.removed_blocks == [1]
    assert json.loads((out / "training.json").read_text())["steps"] == 1
    assert "loss" in (out / "loss_log.csv").read_text().splitlines()[0]
    reloaded, _ = load_model(out, device="cpu")
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits)
        # the adapter on the base it was trained on gives the merged model back
        adapted = apply_adapter(tiny(tok), out).eval()
        torch.testing.assert_close(adapted(ids).logits, result.model(ids).logits, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="different base model"):
        apply_adapter(tiny(tok, removed=(2,)), out)


def test_cpt_then_lora_reports_both_stages_and_prints_no_step_logs(tmp_path, tok, capsys):
    out = tmp_path / "cpt-lora"
    result = cpt_then_lora(tiny(tok), tok, out, cpt_steps=1, lora_steps=1, **FAST)
    info = json.loads((out / "training.json").read_text())
    cpt = json.loads((tmp_path / "cpt-lora.cpt" / "training.json").read_text())
    assert info["method"] == "cpt-lora" and info["cpt_seconds"] == pytest.approx(cpt["seconds"], abs=0.01) and cpt["seconds"] > 0
    assert info["seconds"] == pytest.approx(info["lora_seconds"] + info["cpt_seconds"]) == pytest.approx(result.seconds)
    # a notebook that reloads the finished run sees the same cost as the one that trained it
    *_, reloaded = retrain_or_load("cpt-lora", None, None, out)
    assert reloaded["seconds"] == pytest.approx(result.seconds)
    assert "'loss'" not in capsys.readouterr().out  # progress=False: no Trainer log dicts in a notebook


class Interrupt(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):  # right after checkpoint-1 is written
        if state.global_step == 1:
            raise KeyboardInterrupt


def test_interrupted_cpt_leaves_no_output_and_resumes_to_the_same_weights(tmp_path, tok):
    full = continued_pretrain(tiny(tok), tok, tmp_path / "full", max_steps=2, **FAST).model
    out = tmp_path / "cpt"
    with pytest.raises(KeyboardInterrupt):
        continued_pretrain(tiny(tok), tok, out, max_steps=2, retrain_save_steps=1, callbacks=[Interrupt()], **FAST)
    assert not out.exists() and any(p.name.startswith("checkpoint-1") for p in checkpoints_dir(out).iterdir())
    resumed = continued_pretrain(tiny(tok), tok, out, max_steps=2, retrain_save_steps=1, **FAST)
    assert out.exists() and resumed.steps == 2
    for (name, a), b in zip(full.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        continued_pretrain(tiny(tok), tok, out, max_steps=1, **FAST)


class SavedAt(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_save(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_no_checkpoint_after_the_last_step_unless_checkpoints_are_kept(tmp_path, tok):
    """A checkpoint every 2 of 3 steps: step 2's is saved (a resume needs it), the Trainer's extra one
    after step 3 only with ``keep_checkpoints``; the weights are the same either way."""
    dropped, kept = SavedAt(), SavedAt()
    a = continued_pretrain(tiny(tok), tok, tmp_path / "a", max_steps=3, retrain_save_steps=2, callbacks=[dropped], **FAST)
    b = continued_pretrain(tiny(tok), tok, tmp_path / "b", max_steps=3, retrain_save_steps=2, callbacks=[kept],
                           keep_checkpoints=True, **FAST)
    assert dropped.steps == [2] and kept.steps == [2, 3]
    assert sorted(p.name for p in checkpoints_dir(tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not checkpoints_dir(tmp_path / "a").exists()
    for (name, x), y in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(x, y, msg=name)


def test_an_fp16_model_trains_all_in_fp32_and_goes_back_to_fp16(tmp_path, tok):
    """fp16 weights on a CPU (no fp16 autocast there) train in fp32, exactly like the fp32 copy of the same
    weights, and come back fp16."""
    half = tiny(tok).to(torch.float16)
    same = tiny(tok).to(torch.float16).float()  # the same rounded weights, in fp32
    a = continued_pretrain(half, tok, tmp_path / "half", max_steps=2, **FAST)
    b = continued_pretrain(same, tok, tmp_path / "fp32", max_steps=2, **FAST)
    assert [r["loss"] for r in a.log if "loss" in r] == [r["loss"] for r in b.log if "loss" in r]
    assert a.model.dtype == torch.float16 and b.model.dtype == torch.float32
    w = b.model.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(a.model.model.layers[0].mlp.down_proj.weight, w.to(torch.float16), rtol=0, atol=0)


class _SeenInTraining(TrainerCallback):
    """Records, at each step, the dtypes of the trainable and the frozen weights, and whether a
    block's forward ran under CPU autocast."""

    def __init__(self):
        self.trainable, self.frozen, self.autocast = set(), set(), []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        for p in model.parameters():
            (self.trainable if p.requires_grad else self.frozen).add(p.dtype)
        if not getattr(self, "_hooked", False):
            block = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
            block.register_forward_hook(lambda *_: self.autocast.append(torch.is_autocast_enabled("cpu")))
            self._hooked = True


def test_a_bf16_model_trains_fp32_master_weights_under_bf16_autocast(tmp_path, tok):
    """bf16 weights (dtype="auto" on a bf16 CPU): what the optimizer updates is fp32, the forward runs
    under bf16 autocast, the loss stays within bf16's error of the fp32 run, and the model comes back bf16."""
    seen = _SeenInTraining()
    a = continued_pretrain(tiny(tok).to(torch.bfloat16), tok, tmp_path / "half", max_steps=2, callbacks=[seen], **FAST)
    b = continued_pretrain(tiny(tok).to(torch.bfloat16).float(), tok, tmp_path / "fp32", max_steps=2, **FAST)
    assert seen.trainable == {torch.float32} and seen.autocast and all(seen.autocast)
    loss_a, loss_b = ([r["loss"] for r in run.log if "loss" in r] for run in (a, b))
    assert loss_a != loss_b  # not the fp32 run in disguise
    torch.testing.assert_close(torch.tensor(loss_a), torch.tensor(loss_b), rtol=2e-2, atol=0)
    assert a.model.dtype == torch.bfloat16 and b.model.dtype == torch.float32
    assert json.loads((tmp_path / "half" / "training.json").read_text())["training_precision"] == \
        "bf16 autocast, fp32 master weights"


@pytest.mark.parametrize("mixed_precision, cuda, autocast", [("none", False, True), ("fp16", False, True),
                                                             ("fp16", True, False)])
def test_master_weights_follow_the_one_autocast_rule(tok, mixed_precision, cuda, autocast):
    """fp16 AMP wins only where it runs (CUDA; then all weights go fp32 under it); on a CPU a preset that
    asks for it (paper) trains a bf16 model under bf16 autocast, as its protocol card says."""
    from shortened_llm.trainer import master_weights

    model = tiny(tok).to(torch.bfloat16)
    model.model.embed_tokens.requires_grad_(False)
    assert master_weights(model, mixed_precision, cuda=cuda) == (torch.bfloat16, autocast)
    frozen = model.model.embed_tokens.weight.dtype
    assert frozen == (torch.bfloat16 if autocast else torch.float32)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.parametrize("method", ["lora", "cpt"])
def test_a_model_trained_in_bf16_is_in_memory_what_its_saved_dir_loads(method, tmp_path, tok):
    """A bf16 model as load_model gives it keeps RoPE's inv_freq in fp32; training must hand it back so,
    or a number measured on the trained model in memory differs from one measured on its reload (the
    run that trained first would score otherwise than the runs that reuse its dir)."""
    from shortened_llm import load_model, save_model
    from shortened_llm.eval_cache import weights_digest

    base, _ = load_model(save_model(tiny(tok), tok, tmp_path / "base"), dtype="bfloat16", device="cpu")
    buffers = {name: b.dtype for name, b in base.named_buffers()}
    assert torch.float32 in buffers.values()  # what from_pretrained keeps in fp32 whatever the dtype
    run = {"lora": lora_retrain, "cpt": continued_pretrain}[method]
    out = run(base, tok, tmp_path / method, max_steps=1, **FAST)
    reloaded, _ = load_model(tmp_path / method, dtype="bfloat16", device="cpu")
    assert {name: b.dtype for name, b in out.model.named_buffers()} == buffers
    assert {p.dtype for p in out.model.parameters()} == {torch.bfloat16}
    assert weights_digest(out.model) == weights_digest(reloaded)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(out.model(ids).logits, reloaded(ids).logits, rtol=0, atol=0)


def test_lora_on_a_bf16_base_keeps_the_base_bf16_and_the_adapters_fp32(tmp_path, tok):
    """The frozen base is not copied to fp32 (half the memory, and bf16 products), the adapters train in fp32."""
    seen = _SeenInTraining()
    out = lora_retrain(tiny(tok).to(torch.bfloat16), tok, tmp_path / "lora", max_steps=1, callbacks=[seen], **FAST)
    assert seen.trainable == {torch.float32} and seen.frozen == {torch.bfloat16} and all(seen.autocast)
    assert out.model.dtype == torch.bfloat16


def test_trainer_primitives_on_tiny_known_answers(tmp_path, tok):
    """trainer.py's public pieces: the global batch split, the padding, the fingerprint check."""
    from shortened_llm.trainer import accumulation_steps, check_fingerprint, fingerprint, padding_collator

    assert accumulation_steps(64, 4, 1, "lora") == 16 and accumulation_steps(64, 4, 2, "lora") == 8
    with pytest.raises(ValueError, match=r"cpt_batch=6 is not a multiple of cpt_micro_batch=4 x 1 process"):
        accumulation_steps(6, 4, 1, "cpt")
    batch = padding_collator(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]  # padding never counts in the loss
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    model = tiny(tok)
    assert fingerprint(model)["removed_blocks"] == [1] and fingerprint(model)["num_blocks"] == 3
    (tmp_path / "base.json").write_text(json.dumps(fingerprint(model)))
    check_fingerprint(model, tmp_path / "base.json", "x", "fix")  # its own fingerprint passes
    with pytest.raises(ValueError, match=r"x belongs to a different base model \(removed_blocks: \[1\] there, \[2\] here\)"):
        check_fingerprint(tiny(tok, removed=(2,)), tmp_path / "base.json", "x", "fix")


def test_retrain_or_load_runs_a_training_free_method_once_then_loads_it(tmp_path, tok, monkeypatch):
    """Any registered method, not only the paper's three: ReplaceMe's dir is finished once its model is saved."""
    from shortened_llm.models import save_model

    teacher = make_tiny_llama(vocab_size=len(tok), num_layers=6)
    pruned = save_model(remove_blocks(make_tiny_llama(vocab_size=len(tok), num_layers=6), [3]), tok, tmp_path / "p")
    out = tmp_path / "rm"
    model, _, log, info = retrain_or_load("replaceme", str(pruned), None, out, teacher=teacher, n_samples=2,
                                          progress=False)
    assert log.empty and info["method"] == "replaceme" and info["calibration"]["n_samples"] == 2
    import shortened_llm.replaceme as rm

    monkeypatch.setattr(rm, "fit_replaceme", lambda *a, **k: pytest.fail("a finished dir must load, not refit"))
    again, _, _, info_again = retrain_or_load("replaceme", str(pruned), None, out, teacher=teacher)
    assert info_again == info
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
