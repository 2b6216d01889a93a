"""Knowledge distillation and partial retraining on tiny random Llamas with a character tokenizer."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_char_tokenizer, make_tiny_llama
from shortened_llm.distill import check_same_vocab, distill, kd_loss, partial_retrain
from shortened_llm.prune import remove_blocks
from shortened_llm.subblock import remove_sublayers

TEXTS = ["the quick brown fox jumps over the lazy dog. " * 6 + str(i) for i in range(12)]
FAST = dict(preset="tiny", max_steps=2, progress=False, cpt_batch=2, cpt_micro_batch=2, cpt_block_size=32)


@pytest.fixture(scope="module")
def char_tok():
    """A ~100-token character tokenizer: keeps the LM head tiny so each training step takes milliseconds."""
    return make_char_tokenizer(bos_first=False)


def _pair(tok, n_layers=4, drop=(1,)):
    teacher = make_tiny_llama(num_layers=n_layers, vocab_size=len(tok))
    student = remove_blocks(copy.deepcopy(teacher), list(drop))
    return student, teacher


@pytest.mark.parametrize("temperature, cap", [(1.0, None), (2.0, None), (1.5, 3.0)])
@pytest.mark.parametrize("path", ["fused", "checkpointed"])
def test_chunked_kd_loss_equals_full_kl_and_its_gradients(path, temperature, cap):
    """Both paths of ``kd_loss`` (a plain linear head: fused; any other: checkpointed) give the
    full-vocabulary KL and its gradients for the hidden rows and the student's head."""
    import types

    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(8, 50, bias=False), torch.nn.Linear(8, 50, bias=False)
    head_s.weight.data *= 4  # logits large enough for the softcap to bend them
    h_s, h_t = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 3:] = False
    config = types.SimpleNamespace(final_logit_softcapping=cap)
    student = head_s if path == "fused" else torch.nn.Sequential(head_s)
    chunked = kd_loss(h_s, h_t, student, head_t, valid, config, temperature=temperature, chunk=3)
    g_chunked = torch.autograd.grad(chunked, (h_s, head_s.weight))

    def capped(x):
        return torch.tanh(x / cap) * cap if cap else x

    s, t = capped(head_s(h_s[valid])) / temperature, capped(head_t(h_t[valid])) / temperature
    full = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1).mean() * temperature**2
    g_full = torch.autograd.grad(full, (h_s, head_s.weight))
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert kd_loss(h_t, h_t, head_t, head_t, valid).item() == pytest.approx(0.0, abs=1e-6)  # same model: no loss


def test_distill_full_saves_plain_model_log_and_record(tmp_path, char_tok):
    from shortened_llm.models import load_model

    student, teacher = _pair(char_tok)
    out = tmp_path / "kd"
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = distill(student, teacher, char_tok, TEXTS, out, alpha=0.5, hidden_loss=True, temperature=2.0, **FAST)
    assert result.steps == 2 and result.method == "kd"
    assert any(not torch.equal(before[k], v) for k, v in result.model.state_dict().items())  # it trained
    assert all(p.grad is None for p in teacher.parameters()) and not any(p.requires_grad for p in teacher.parameters())
    info = json.loads((out / "training.json").read_text())
    assert info["hidden_weight"] == 1.0 and info["teacher_weights_mb"] > 0 and info["memory_peak_mb"] > 0
    assert (out / "loss_log.csv").read_text().startswith("step,")
    assert json.loads((out / "pruning.json").read_text())["removed_blocks"] == [1]
    loaded, _ = load_model(out, device="cpu")
    ids = torch.randint(4, len(char_tok), (2, 10))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, result.model(ids).logits, atol=1e-6)


def test_bad_teachers_are_refused_before_training(tmp_path, char_tok):
    student, _ = _pair(char_tok)
    other = make_tiny_llama(num_layers=4, vocab_size=len(char_tok) + 5)
    with pytest.raises(ValueError, match="same vocabulary"):
        distill(student, other, char_tok, TEXTS, tmp_path / "a", **FAST)
    unpruned = make_tiny_llama(num_layers=3, vocab_size=len(char_tok))
    with pytest.raises(ValueError, match="no pruning record"):
        distill(unpruned, make_tiny_llama(num_layers=4, vocab_size=len(char_tok)), char_tok, TEXTS, tmp_path / "b",
                hidden_loss=True, **FAST)
    other_tok = copy.deepcopy(char_tok)
    other_tok.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_vocab(student, student, char_tok, other_tok)
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.checkpoints").exists()


def test_kd_resumes_from_its_last_checkpoint(tmp_path, char_tok):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            raise KeyboardInterrupt("simulated interruption after the first checkpoint")

    class Count(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kw):
            Count.steps += 1

    student, teacher = _pair(char_tok)
    out = tmp_path / "kd"
    with pytest.raises(KeyboardInterrupt):
        distill(copy.deepcopy(student), teacher, char_tok, TEXTS, out, callbacks=[Interrupt()],
                retrain_save_steps=1, **FAST)
    assert not out.exists() and (tmp_path / "kd.checkpoints" / "checkpoint-1").is_dir()
    result = distill(copy.deepcopy(student), teacher, char_tok, TEXTS, out, callbacks=[Count()], retrain_save_steps=1,
                     **FAST)
    assert result.steps == 2 and Count.steps == 1  # only the second step ran again


def test_kd_lora_on_a_subblock_student_saves_adapter(tmp_path, char_tok):
    from shortened_llm.models import load_model

    student, teacher = _pair(char_tok)
    remove_sublayers(student, "attn", [2])
    result = distill(student, teacher, char_tok, TEXTS, tmp_path / "kdl", lora=True, hidden_loss=True, **FAST)
    assert (tmp_path / "kdl" / "adapter" / "adapter_config.json").exists()
    loaded, _ = load_model(tmp_path / "kdl", device="cpu")
    assert loaded.pruning.removed_attn == [3]  # original index of current block 2 (block 1 was removed)
    ids = torch.randint(4, len(char_tok), (1, 8))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, result.model(ids).logits, atol=1e-6)


def test_partial_trains_only_the_last_blocks_and_head(tmp_path, char_tok):
    student, _ = _pair(char_tok, n_layers=5)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = partial_retrain(student, char_tok, TEXTS, tmp_path / "p", last_k=1, **FAST)
    changed = {k for k, v in result.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith(("model.layers.3.", "lm_head", "model.norm", "model.embed_tokens"))
                           for k in changed), changed
    assert not any(k.startswith(("model.layers.0.", "model.layers.1.", "model.layers.2.")) for k in changed)
    with pytest.raises(ValueError, match="last_k=9"):
        partial_retrain(student, char_tok, TEXTS, tmp_path / "q", last_k=9, **FAST)
