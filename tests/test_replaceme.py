"""ReplaceMe: the least-squares map, folded exactly into down_proj, on tiny random models; bad input refused."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import make_tiny_llama
from shortened_llm import remove_blocks
from shortened_llm.replaceme import contiguous_spans, fit_replaceme, fold_into_model, replaceme


@pytest.fixture
def teacher_and_ids():
    teacher = make_tiny_llama(num_layers=6, seed=3)
    ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(0))  # 128 tokens > hidden 32
    return teacher, ids


def _pruned(teacher, blocks):
    student = copy.deepcopy(teacher)
    remove_blocks(student, blocks, criterion="angular")
    return student


def test_spans_are_contiguous_runs():
    assert contiguous_spans([18, 4, 13, 14, 16, 17]) == [(4, 4), (13, 14), (16, 18)]


@torch.no_grad()
def _span_2_3(teacher, ids):
    """M (block 1's down_proj output), Y = h - M and L (block 3's output) of the teacher, computed directly."""
    captured = {}
    hook = teacher.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, out: captured.update(M=out))
    hidden = teacher(ids, output_hidden_states=True).hidden_states
    hook.remove()
    M = captured["M"].reshape(-1, 32).double()
    h, L = hidden[2].reshape(-1, 32).double(), hidden[4].reshape(-1, 32).double()  # outputs of blocks 1 and 3
    return M, h - M, L


def test_t_is_the_least_squares_solution(teacher_and_ids):
    """The normal-equation residual M^T (R - M T) is zero: R - M T is orthogonal to every input column."""
    teacher, ids = teacher_and_ids
    (fit,) = fit_replaceme(teacher, _pruned(teacher, [2, 3]).pruning, ids, progress=False)
    M, Y, L = _span_2_3(teacher, ids)
    R = L - Y
    normal = M.T @ (R - M @ fit.transform)
    assert normal.abs().max() < 1e-8 * (M.T @ R).abs().max()
    assert fit.residual_after < fit.residual_before  # better than plain removal on its own calibration
    assert fit.residual_after == pytest.approx(((R - M @ fit.transform) ** 2).sum().item() / M.shape[0], rel=1e-6)
    assert fit.residual_before == pytest.approx(((L - Y - M) ** 2).sum().item() / M.shape[0], rel=1e-6)


@torch.no_grad()
def test_folded_down_proj_equals_applying_t(teacher_and_ids):
    teacher, ids = teacher_and_ids
    student = _pruned(teacher, [2, 3])
    (fit,) = fit_replaceme(teacher, student.pruning, ids, progress=False)
    before = student.model.layers[1]  # original block 1 is still block 1
    seen = {}
    hooks = [before.register_forward_hook(lambda m, a, out: seen.update(h=out[0] if isinstance(out, tuple) else out)),
             before.mlp.down_proj.register_forward_hook(lambda m, a, out: seen.update(M=out))]
    student(ids)
    expected = (seen["h"] - seen["M"]) + (seen["M"].double() @ fit.transform).float()
    params = sum(p.numel() for p in student.parameters())
    fold_into_model(student, [fit])
    student(ids)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(seen["h"], expected, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in student.parameters()) == params  # no parameter added


def test_saved_model_reloads_identically_and_records_the_fit(teacher_and_ids, tmp_path, tiny_llama_dir, embedded):
    from shortened_llm import load_model

    tokenizer = embedded[1]
    teacher, _ = load_model(tiny_llama_dir)
    student = _pruned(teacher, [1, 4])
    out = tmp_path / "replaced"
    result = replaceme(student, teacher, tokenizer, out_dir=out, n_samples=4, seq_len=16, progress=False)
    reloaded, _ = load_model(out)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, rtol=0, atol=0)
    record = json.loads((out / "pruning.json").read_text())
    assert record["removed_blocks"] == [1, 4]
    assert record["recovery"]["method"] == "replaceme"
    assert [s["span"] for s in record["recovery"]["spans"]] == [[1, 1], [4, 4]]
    assert record["recovery"]["calibration"] == {"dataset": "bookcorpus", "n_samples": 4, "seq_len": 16, "seed": 1234}


def test_bad_input_is_refused_with_the_reason(teacher_and_ids):
    teacher, ids = teacher_and_ids
    with pytest.raises(ValueError, match="starts at block 0"):
        fit_replaceme(teacher, _pruned(teacher, [0, 1]).pruning, ids, progress=False)
    with pytest.raises(ValueError, match="too few for a 32 x 32 fit: use at least 32"):
        fit_replaceme(teacher, _pruned(teacher, [2]).pruning, ids[:1, :8], progress=False)
    with pytest.raises(ValueError, match="teacher has 4 blocks but the pruned model was cut from one with 6"):
        fit_replaceme(make_tiny_llama(num_layers=4), _pruned(teacher, [2]).pruning, ids, progress=False)
    with pytest.raises(ValueError, match="which blocks were removed"):
        fit_replaceme(teacher, None, ids, progress=False)
    with pytest.raises(ValueError, match="objective='cos'"):
        fit_replaceme(teacher, _pruned(teacher, [2]).pruning, ids, objective="cos", progress=False)


def test_a_norm_after_the_mlp_is_refused():
    from shortened_llm.models import tiny_random_model

    gemma2 = tiny_random_model("gemma2", num_layers=4)
    student = _pruned(gemma2, [2])
    ids = torch.randint(3, 100, (4, 16))
    with pytest.raises(ValueError, match="post_feedforward_layernorm"):
        fit_replaceme(gemma2, student.pruning, ids, progress=False)


def test_a_singular_system_falls_back_to_ridge_with_a_warning(teacher_and_ids):
    teacher, ids = teacher_and_ids
    with torch.no_grad():
        teacher.model.layers[1].mlp.down_proj.weight[:16] = 0  # half of M's columns are zero: M^T M is singular
    with pytest.warns(RuntimeWarning, match="singular; solved with ridge"):
        (fit,) = fit_replaceme(teacher, _pruned(teacher, [2, 3]).pruning, ids, progress=False)
    assert torch.isfinite(fit.transform).all() and fit.ridge > 0


def test_cosine_objective_lowers_the_cosine_distance(teacher_and_ids):
    teacher, ids = teacher_and_ids
    record = _pruned(teacher, [2, 3]).pruning
    (plain,) = fit_replaceme(teacher, record, ids, progress=False)
    (cos,) = fit_replaceme(teacher, record, ids, objective="cosine", cosine_steps=50, cosine_lr=1e-3, progress=False)
    M, Y, L = _span_2_3(teacher, ids)

    def distance(T):
        return 1 - torch.nn.functional.cosine_similarity(Y + M @ T, L, dim=-1).mean().item()

    assert distance(cos.transform) < distance(plain.transform)
    assert cos.residual_after >= plain.residual_after - 1e-9  # least squares is the minimum of the squared residual


def test_cli_retrain_replaceme(tmp_path, tiny_llama_dir, embedded, capsys):
    from shortened_llm import load_model, save_model
    from shortened_llm.cli import main

    teacher, tokenizer = load_model(tiny_llama_dir)
    pruned = save_model(_pruned(teacher, [2, 3]), tokenizer, tmp_path / "pruned")
    out = tmp_path / "replaced"
    args = ["retrain", "replaceme", "--model", str(pruned), "--out", str(out), "--calibration-samples", "2"]
    assert main(args) == 2 and "needs --teacher" in capsys.readouterr().err
    assert main([*args, "--teacher", str(tiny_llama_dir), "--ridge", "-1"]) == 2
    assert "ridge=-1.0 must be in [0, inf)" in capsys.readouterr().err
    assert main([*args, "--teacher", str(tiny_llama_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "replaceme" and printed["steps"] == 0
    assert json.loads((out / "pruning.json").read_text())["recovery"]["calibration"]["n_samples"] == 2


def test_recovery_table_rows_replaceme_then_kd(tmp_path, tiny_llama_dir):
    """notebook 09's `recover`: ReplaceMe alone (no step) and ReplaceMe then KD (trains from the replaced model)."""
    from shortened_llm import load_model, save_model
    from shortened_llm.lessons.recovery_table import RECOVERY, recover

    teacher, tokenizer = load_model(tiny_llama_dir)
    pruned = save_model(_pruned(teacher, [2, 3]), tokenizer, tmp_path / "pruned")
    alone = recover(pruned, "replaceme", tmp_path / "rm", teacher=str(tiny_llama_dir), preset="tiny")
    both = recover(pruned, "replaceme+kd", tmp_path / "rm-kd", teacher=str(tiny_llama_dir), preset="tiny", steps=1)
    assert {"replaceme", "replaceme+lora", "replaceme+kd"} <= set(RECOVERY)
    assert alone["steps"] == 0 and alone["seconds"] > 0 and alone["params"] == both["params"]
    assert both["steps"] == 1 and both["seconds"] > alone["seconds"] / 10
    trained_from = json.loads((tmp_path / "rm-kd" / "model" / "pruning.json").read_text())
    assert trained_from["recovery"]["method"] == "replaceme"  # KD started from the replaced model, record kept


def test_a_teacher_of_another_base_model_is_refused(teacher_and_ids):
    from shortened_llm.replaceme import check_teacher

    teacher, _ = teacher_and_ids
    student = _pruned(teacher, [2, 3])
    check_teacher(student, teacher)  # its own teacher
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1e-3 * torch.randn_like(p))  # a little training changes nothing
    check_teacher(student, teacher)
    with pytest.raises(ValueError, match=r"original blocks \[0, 1, 4, 5\] do not match the teacher's"):
        check_teacher(student, make_tiny_llama(num_layers=6, seed=4))  # same shape, another init
