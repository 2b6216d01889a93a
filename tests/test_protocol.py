"""``--preset paper`` follows the official protocol (issue 21): block counts, Taylor in fp32, zero-shot BOS."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_char_tokenizer, make_tiny_llama

from shortened_llm.architectures import (architecture_config, block_count_params, n_blocks_for, official_counts,
                                         param_share, removal_counts)
from shortened_llm.cli import main
from shortened_llm.importance import block_importance
from shortened_llm.models import save_model, tiny_random_model
from shortened_llm.presets import PRESETS
from shortened_llm.prune import num_blocks_to_remove
from shortened_llm.reference import reference_table
from shortened_llm.zeroshot import _lm


# ---- 1. block counts ----------------------------------------------------------------------------

def test_n_blocks_is_the_alternative_to_ratio():
    assert num_blocks_to_remove(40, n_blocks=15) == 15
    assert num_blocks_to_remove(40, ratio=0.35) == 14  # what rounding gives for Vicuna-13B's "37 %"
    for both_or_neither in ({}, {"ratio": 0.35, "n_blocks": 15}):
        with pytest.raises(ValueError, match="exactly one"):
            num_blocks_to_remove(40, **both_or_neither)
    for bad in (0, 40, 2.0, True):
        with pytest.raises(ValueError, match=r"n_blocks=.* must be a whole number in 1\.\.39"):
            num_blocks_to_remove(40, n_blocks=bad)


# Official script/prune.sh: ratio it names the model by -> blocks removed
OFFICIAL = {"llama-1-7b": {0.20: 6, 0.27: 9, 0.35: 11}, "vicuna-13b": {0.21: 8, 0.29: 11, 0.37: 15}}


@pytest.mark.parametrize("arch", sorted(OFFICIAL))
def test_paper_preset_gives_the_official_counts_for_the_papers_models(arch):
    paper, config = PRESETS["paper"], architecture_config(arch)
    assert {c.ratio: c.n_blocks for c in official_counts(paper, config)} == OFFICIAL[arch]
    assert {r: n_blocks_for(paper, config, r) for r in OFFICIAL[arch]} == OFFICIAL[arch]
    assert removal_counts(paper, config) == sorted(OFFICIAL[arch].values())


def test_official_counts_differ_from_rounding_where_the_script_does():
    vicuna = architecture_config("vicuna-13b")
    assert n_blocks_for(PRESETS["paper"], vicuna, 0.29) == 11
    assert n_blocks_for(PRESETS["smoke"], vicuna, 0.29) == 12  # round(0.29 * 40): no official table there


def test_other_models_keep_rounding_in_the_paper_preset():
    paper = PRESETS["paper"]
    llama3 = architecture_config("llama-3-8b")  # 32 blocks like LLaMA-7B, another shape
    assert official_counts(paper, llama3) == ()
    assert removal_counts(paper, llama3) == [round(r * 32) for r in paper.ratios]
    pruned = type(llama3).from_dict({**architecture_config("llama-1-7b").to_dict(), "num_hidden_layers": 26})
    assert official_counts(paper, pruned) == ()  # counts are for the dense model only


def test_official_counts_give_the_official_parameter_counts_and_shares():
    paper = PRESETS["paper"]
    official = dict(zip(*reference_table("official_results")[["model", "params"]].T.values))
    counts = {(c.architecture, c.n_blocks): c for c in paper.block_counts}
    assert block_count_params(counts["llama-1-7b", 6]) == (official["llama-1-7b"], official["st-llama-1-5.5b-ppl"])
    assert block_count_params(counts["vicuna-13b", 8])[1] == official["st-vicuna-v1.3-10.5b-ppl"]
    shares = {key: round(param_share(c), 3) for key, c in counts.items()}
    assert shares == {("llama-1-7b", 6): 0.180, ("llama-1-7b", 9): 0.270, ("llama-1-7b", 11): 0.330,
                      ("vicuna-13b", 8): 0.195, ("vicuna-13b", 11): 0.268, ("vicuna-13b", 15): 0.366}


@pytest.fixture(scope="module")
def bos_tok():
    """A character tokenizer that prepends BOS by default, as LLaMA's does."""
    return make_char_tokenizer(bos_first=True)


def _prune(capsys, *argv):
    code = main([str(a) for a in ("prune", "--criterion", "magnitude", *argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prune_takes_n_blocks(capsys, tmp_path, bos_tok):
    model_dir = save_model(make_tiny_llama(num_layers=6, vocab_size=len(bos_tok)), bos_tok, tmp_path / "tiny")
    code, out, _ = _prune(capsys, "--model", model_dir, "--n-blocks", 2, "--out", tmp_path / "p")
    assert code == 0
    result = json.loads(out)
    assert (result["n_blocks"], result["ratio"], result["num_blocks"]) == (2, None, 4)
    assert len(json.loads((tmp_path / "p" / "pruning.json").read_text())["removed_blocks"]) == 2
    code, out, _ = _prune(capsys, "--model", model_dir, "--ratio", 0.5, "--out", tmp_path / "q")
    assert code == 0 and json.loads(out)["n_blocks"] == 3  # a ratio still rounds for a non-paper shape
    code, _, err = _prune(capsys, "--model", model_dir, "--n-blocks", 6, "--out", tmp_path / "r")
    assert code == 2 and "n_blocks=6 must be a whole number in 1..5" in err
    code, _, err = _prune(capsys, "--model", model_dir, "--n-blocks", 2, "--method", "width", "--out", tmp_path / "w")
    assert code == 2 and "--n-blocks 2 counts whole blocks" in err
    code, _, err = _prune(capsys, "--model", model_dir, "--n-blocks", 2, "--ratio", 0.2, "--out", tmp_path / "b")
    assert code == 2 and "not allowed with argument" in err  # argparse: one or the other


# ---- 2. Taylor in fp32 --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"gradient_checkpointing": True}, {"batch_size": 1}])
def test_half_precision_taylor_scores_are_the_fp32_models(dtype, options, random_ids, one_thread):
    low = make_tiny_llama(num_layers=6).to(dtype)
    before = {k: v.clone() for k, v in low.state_dict().items()}
    want = block_importance(copy.deepcopy(low).float(), random_ids, "taylor", progress=False, **options)
    got = block_importance(low, random_ids, "taylor", progress=False, **options)
    assert torch.equal(got, want)
    after = low.state_dict()  # the model is back as it was: same dtype, same bits, no gradients
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert all(p.grad is None for p in low.parameters())


def test_taylor_in_the_models_dtype_is_what_fp32_corrects(random_ids, one_thread):
    """fp32=False is the old behaviour: fp16 gradients, scores off by digits (the check above can fail)."""
    low = make_tiny_llama(num_layers=6).half()
    fp32 = block_importance(low, random_ids, "taylor", progress=False)
    own = block_importance(low, random_ids, "taylor", fp32=False, progress=False)
    assert not torch.equal(own, fp32)
    assert torch.allclose(own, fp32, rtol=1e-2)


# ---- 3. zero-shot BOS ---------------------------------------------------------------------------

def _context_ids_seen(lm, context="Paris is in", continuation=" France") -> list[int]:
    """The token ids the model is run on for one loglikelihood request."""
    from lm_eval.api.instance import Instance

    seen = []
    hook = lm.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (args[0] if args else kwargs["input_ids"])[0].tolist()), with_kwargs=True)
    try:
        lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)], disable_tqdm=True)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("model_type, bos", [("llama", False), ("mistral", False), ("gemma", True), ("gemma2", True)])
def test_zero_shot_bos_follows_the_family_not_the_tokenizer(model_type, bos, bos_tok):
    assert bos_tok("Paris").input_ids[0] == bos_tok.bos_token_id  # the tokenizer alone would add it
    lm = _lm(tiny_random_model(model_type, tokenizer=bos_tok), bos_tok, batch_size=1)
    assert lm.add_bos_token is bos
    text = bos_tok("Paris is in France", add_special_tokens=False).input_ids
    assert _context_ids_seen(lm) == [bos_tok.bos_token_id] * bos + text[:-1]  # the last token is only predicted
