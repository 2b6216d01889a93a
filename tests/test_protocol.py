"""``--preset paper`` follows the official protocol (issue 21): block counts, Taylor in fp32, zero-shot BOS."""
from __future__ import annotations

import copy
import json
import os
from dataclasses import replace

import pytest
import torch
from conftest import make_char_tokenizer, make_tiny_llama

from shortened_llm.architectures import (architecture_config, block_count_params, n_blocks_for, official_counts,
                                         param_share, removal_counts)
from shortened_llm.cli import main
from shortened_llm.importance import block_importance
from shortened_llm.models import save_model, tiny_random_model
from shortened_llm.presets import PRESETS, get_preset
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


# ---- 4. the LoRA procedure -----------------------------------------------------------------------

_RUN = dict(lr=1e-4, batch=64, micro=4, max_steps=None, epochs=2.0, warmup=100, scheduler="linear", seed=1234,
            accum=16, steps_planned=1600, evaluate=True, progress=False)


def _lora_args(preset, tmp_path, cuda):
    from shortened_llm.retrain import lora_procedure
    from shortened_llm.trainer import training_arguments

    options = {k: v for k, v in lora_procedure(PRESETS[preset]).items() if k != "padding_side"}  # the collator's
    return training_arguments(tmp_path, **_RUN, **options, cuda=cuda)


def test_paper_trains_lora_by_the_official_procedure(tmp_path):
    args = _lora_args("paper", tmp_path, cuda=True)
    assert (args.eval_strategy, args.eval_steps, args.save_steps) == ("steps", 100, 200)
    assert (args.load_best_model_at_end, args.metric_for_best_model, args.greater_is_better) == (True, "eval_loss", False)
    assert args.fp16 and not args.bf16  # fp16 autocast + GradScaler (loss scaling) over fp32 master weights
    assert not _lora_args("paper", tmp_path, cuda=False).fp16  # no fp16 AMP on a CPU: fp32 there
    from shortened_llm.retrain import lora_procedure

    assert lora_procedure(PRESETS["paper"])["padding_side"] == "left"


@pytest.mark.parametrize("preset", ["tiny", "smoke", "cpu"])
def test_cpu_presets_keep_the_simpler_lora_procedure(preset, tmp_path):
    args = _lora_args(preset, tmp_path, cuda=False)
    assert args.eval_steps == _RUN["steps_planned"]  # before the first and after the last step only
    assert args.save_steps == PRESETS[preset].retrain_save_steps
    assert not args.load_best_model_at_end and args.metric_for_best_model is None and not args.fp16
    assert (args.weight_decay, args.adam_beta2) == (0.0, 0.999)  # what every CPU run trained with before


def test_left_padding_masks_the_left():
    from shortened_llm.trainer import padding_collator

    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    left, right = padding_collator(0, "left")(rows), padding_collator(0)(rows)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert left["labels"][1].tolist() == [-100, -100, 8] and left["attention_mask"][1].tolist() == [0, 0, 1]


def test_paper_split_is_datasets_train_test_split_clamped_on_the_pack():
    from datasets import Dataset

    from shortened_llm.prompts import load_instructions
    from shortened_llm.retrain import _instruction_split

    tok = make_char_tokenizer()
    records = load_instructions("alpaca")[:200]
    with pytest.warns(UserWarning, match="lora_val_size=2000 is more than 10% of the 200 records: holding out 20"):
        train, val = _instruction_split(tok, records, PRESETS["paper"], seed=1234)
    official = Dataset.from_list(records).train_test_split(test_size=20, shuffle=True, seed=42)
    from shortened_llm.prompts import tokenize_record

    assert val == [tokenize_record(tok, dict(r), PRESETS["paper"].lora_cutoff) for r in official["test"]]
    assert len(train) == 180


def test_lora_keeps_the_best_checkpoint_when_asked(tmp_path):
    from shortened_llm.retrain import lora_retrain

    tok = make_char_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    result = lora_retrain(model, tok, tmp_path / "lora", preset="tiny", progress=False, max_steps=3, lora_cutoff=256,
                          lora_eval_steps=1, retrain_save_steps=1, lora_best_checkpoint=True, lora_split="train_test_split",
                          lora_split_seed=42, lora_padding_side="left", lora_lr=5e-2)
    evals = {row["step"]: row["eval_loss"] for row in result.log if "eval_loss" in row}
    assert sorted(evals) == [0, 1, 2, 3]  # every step, as the official every-100 at this scale
    info = json.loads((tmp_path / "lora" / "training.json").read_text())
    best = min((s for s in evals if s > 0), key=evals.get)
    assert info["kept"] == f"best eval loss (step {best})" and info["lora_padding_side"] == "left"


# ---- 5. CPT data ---------------------------------------------------------------------------------

def test_paper_pretrains_on_slimpajama_streamed_and_cpu_presets_on_the_packs_c4(monkeypatch):
    import inspect

    import shortened_llm.data as data
    from shortened_llm.recovery import get_recovery
    from shortened_llm.retrain import continued_pretrain

    spec = data.DATASETS[PRESETS["paper"].cpt_data]
    assert (spec.hub, spec.split, spec.field, spec.local) == (("cerebras/SlimPajama-627B",), "train", "text", "")
    assert {PRESETS[p].cpt_data for p in ("tiny", "smoke", "cpu")} == {"c4"}
    # the CLI passes RecoveryMethod.data; None lets the preset's cpt_data decide
    assert get_recovery("cpt").data is None and inspect.signature(continued_pretrain).parameters["data"].default is None
    seen = []

    def load_dataset(*args, split, streaming=False):
        seen.append((args, split, streaming))
        return iter({"text": f"row {i}"} for i in range(10**9))  # endless, as a stream is

    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    monkeypatch.setitem(data.DATASETS, "slimpajama", replace(spec, stream_rows=3))
    data._load.cache_clear()
    try:
        assert data.load_texts("slimpajama") == ["row 0", "row 1", "row 2"]  # the first rows, never the whole
    finally:
        data._load.cache_clear()
    assert seen == [(("cerebras/SlimPajama-627B",), "train", True)]


@pytest.mark.parametrize("preset, optimizer", [("paper", (0.1, 0.95, 512)), ("smoke", (0.0, 0.999, 8))])
def test_cpt_trains_with_the_presets_optimizer(preset, optimizer, monkeypatch, tmp_path):
    """paper: the authors' CPT model cards (AdamW weight decay 0.1, beta2 0.95, global batch 512); the
    CPU presets keep what they trained with. Checked where run_on_cpt_budget hands them to run_trainer."""
    import shortened_llm.trainer as trainer

    seen = {}
    monkeypatch.setattr(trainer, "run_trainer", lambda *args, **kwargs: seen.update(kwargs))
    trainer.run_on_cpt_budget(None, None, [], [], PRESETS[preset], out_dir=tmp_path, max_steps=1, seed=0,
                              resume=False, progress=False, callbacks=())
    assert (seen["weight_decay"], seen["adam_beta2"], seen["batch"]) == optimizer
    args = trainer.training_arguments(tmp_path, **_RUN, save_steps=200, weight_decay=seen["weight_decay"],
                                      adam_beta2=seen["adam_beta2"])
    assert (args.weight_decay, args.adam_beta2) == optimizer[:2]


# ---- 6. the efficiency protocol ------------------------------------------------------------------

class _Recorder:
    """Stands in for ``model.generate``: records each call's kwargs, returns the forced length."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, input_ids, attention_mask, generation_config):
        self.calls.append({"input_ids": input_ids.tolist(), "config": generation_config})
        new = torch.zeros(input_ids.shape[0], generation_config.max_new_tokens, dtype=torch.long)
        return torch.cat([input_ids, new], dim=1)


def _timed(monkeypatch, seconds):
    """``_Timer`` returning ``seconds`` in turn for the timed runs (then 0.1 s for each prefill)."""
    from shortened_llm import efficiency

    values = iter([*seconds, *[0.1] * 100])

    def fake(self, fn):
        fn()
        return next(values)

    monkeypatch.setattr(efficiency._Timer, "__call__", fake)


def test_paper_timing_settings_reach_generate(monkeypatch):
    from shortened_llm.efficiency import generation_protocol, sweep_generation

    tok, model = make_char_tokenizer(), make_tiny_llama(vocab_size=100)
    model.generate = recorder = _Recorder(model)
    _timed(monkeypatch, [1.0, 2.0, 6.0])
    paper = get_preset("paper", batch_sizes=(2,), new_tokens=(3,), repeats=3, timing_warmup=2, timing_dtype="float32")
    table = sweep_generation({"m": model}, tokenizer=tok, progress=False, **generation_protocol(paper))
    prompt = tok(["The Leaning Tower of Pisa is known for"] * 2).input_ids
    assert len(recorder.calls) == 2 + 3 + 3  # warm-up, timed, prefill
    assert all(c["input_ids"] == prompt for c in recorder.calls)
    config = recorder.calls[0]["config"]
    assert (config.do_sample, config.top_k, config.top_p, config.use_cache) == (True, 50, 0.95, True)
    assert config.min_new_tokens == config.max_new_tokens == 3
    row = table.iloc[0]
    assert row.latency_s == 3.0 and row.statistic == "mean" and row.decoding == "sampling"  # the median is 2.0
    assert row.prompt_len == len(prompt[0])
    with pytest.raises(ValueError, match="the protocol times float16 models, this one is in torch.float32"):
        sweep_generation({"m": model}, tokenizer=tok, progress=False, **generation_protocol(get_preset(paper, timing_dtype="float16")))
    official = generation_protocol(PRESETS["paper"])
    assert (official["batch_sizes"], official["new_tokens"], official["warmup"], official["repeats"]) == \
           ((1, 8, 16, 32, 64, 128, 256), (128, 512), 10, 20)
    assert (official["dtype"], official["util_period"]) == ("float16", 0.5)


def test_cpu_presets_keep_the_cheap_timing(monkeypatch):
    from shortened_llm.efficiency import generation_protocol, speedup_table, sweep_generation

    model = make_tiny_llama(vocab_size=100)
    model.generate = recorder = _Recorder(model)
    _timed(monkeypatch, [1.0, 0.1, 2.0, 0.1, 6.0, 0.1, 3.0, 0.1, 4.0])  # a round: one timed call, one prefill
    smoke = get_preset("smoke", batch_sizes=(1,))
    assert smoke.repeats == 5  # five timed calls: enough for the figures' spread
    table = sweep_generation({"m": model}, progress=False, **generation_protocol(smoke))
    assert len(recorder.calls) == 1 + 5 + 5 and recorder.calls[0]["config"].do_sample is False  # warm-up, timed, prefill
    assert len(recorder.calls[0]["input_ids"][0]) == smoke.prompt_len  # random ids, no tokenizer needed
    assert list(table["round"]) == [0, 1, 2, 3, 4] and set(table.statistic) == {"median"}  # a call per round
    assert speedup_table(table, baseline="m").latency_s.iloc[0] == 3.0  # the median of the five calls, as before


def test_cpu_presets_interleave_the_calls_of_every_model():
    """dense, depth, dense, depth, ...: a neighbour's busy spell cannot land on one model's calls only."""
    from shortened_llm.efficiency import generation_protocol, sweep_generation

    class Named(_Recorder):
        def __call__(self, input_ids, attention_mask, generation_config):
            order.append((self.name, generation_config.max_new_tokens))
            return super().__call__(input_ids, attention_mask, generation_config)

    order, models = [], {name: make_tiny_llama(vocab_size=100) for name in ("dense", "depth")}
    for name, m in models.items():
        m.generate = Named(m)
        m.generate.name = name
    smoke = get_preset("smoke", batch_sizes=(1,), repeats=3)
    sweep_generation(models, progress=False, **generation_protocol(smoke))
    timed = [name for name, new in order if new == smoke.new_tokens[0]]  # the prefill calls make 1 token
    assert timed == ["dense", "dense", "depth", "depth"] + ["dense", "depth"] * 2  # warm-up + call 1, then a call each
    official = generation_protocol(get_preset("paper", batch_sizes=(1,), repeats=3))
    assert (official["repeats"], official.get("rounds", 1)) == (3, 1)  # the official order: a model's runs in a row


# ---- 7. substitute data --------------------------------------------------------------------------

def test_paper_refuses_the_packs_stand_ins_in_one_line_unless_allowed(monkeypatch):
    from shortened_llm.data import check_original_data

    assert os.environ.get("SHORTENED_LLM_DATA")  # the tests run on the offline pack
    monkeypatch.delenv("SHORTENED_LLM_ALLOW_SUBSTITUTE", raising=False)
    with pytest.raises(ValueError) as refused:
        check_original_data(PRESETS["paper"])
    text = str(refused.value)
    assert "\n" not in text and "BookCorpus" in text and "HellaSwag" in text and "--allow-substitute-data" in text
    assert set(check_original_data(get_preset("paper", allow_substitute_data=True))) == {"bookcorpus", "hellaswag"}
    assert set(check_original_data(PRESETS["smoke"])) == {"bookcorpus", "hellaswag"}  # CPU presets: never refused
    monkeypatch.setenv("SHORTENED_LLM_ALLOW_SUBSTITUTE", "1")
    assert check_original_data(PRESETS["paper"])
    monkeypatch.delenv("SHORTENED_LLM_DATA")
    assert check_original_data(PRESETS["paper"]) == {}  # the hub's originals: nothing to refuse


def test_reproduce_writes_the_card_or_refuses_before_any_notebook(monkeypatch, tmp_path):
    from shortened_llm.reproduce import run_notebooks

    monkeypatch.delenv("SHORTENED_LLM_ALLOW_SUBSTITUTE", raising=False)
    empty = tmp_path / "notebooks"
    empty.mkdir()
    with pytest.raises(ValueError, match="substitutes bookcorpus"):
        run_notebooks("paper", "llama-1-7b", tmp_path / "run", folder=empty, figures_dir=None)
    assert not (tmp_path / "run" / "protocol.json").exists()
    assert run_notebooks("paper", "llama-1-7b", tmp_path / "run", folder=empty, figures_dir=None,
                         allow_substitute_data=True) == []
    card = json.loads((tmp_path / "run" / "protocol.json").read_text())
    assert card["substitute_data"] and card["data_note"] == "substitute data"
    assert "SHORTENED_LLM_ALLOW_SUBSTITUTE" not in os.environ  # the opt-in lasted the run only
    assert {r["setting"]: r["status"] for r in card["rows"]}["calibration data"].startswith("differs: the offline pack")


# ---- 8. tokenizers -------------------------------------------------------------------------------

def test_fast_and_slow_llama_tokenizers_agree_on_calibration_and_ppl_text(tmp_path):
    """No LLaMA tokenizer.model ships offline, so a sentencepiece model is trained with LLaMA's trainer
    settings (BPE, byte fallback, split digits, identity normaliser, dummy prefix); the slow tokenizer's
    ids are sentencepiece's own (BOS + ``encode``), the fast one is transformers' conversion of the same file."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")  # transformers' sentencepiece -> tokenizers conversion reads the proto
    from transformers import AutoTokenizer

    from shortened_llm.data import load_texts
    from shortened_llm.protocol import FAST_TOKENIZER_IDS_AGREE

    books, wiki = load_texts("bookcorpus")[:300], load_texts("wikitext2")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(books + wiki[:2000]))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=4000, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=100000, minloglevel=2, num_threads=1)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tokenizer.model").rename(tmp_path / "tok" / "tokenizer.model")
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "legacy": True}))
    slow = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "tokenizer.model"))
    fast = AutoTokenizer.from_pretrained(tmp_path / "tok")

    def same(text):
        return fast(text).input_ids == [slow.bos_id()] + slow.encode(text)

    assert all(same(row) for row in books)  # calibration rows
    assert same("\n\n".join(wiki))  # the PPL text, joined as evaluate.py joins it
    assert FAST_TOKENIZER_IDS_AGREE
    assert not same(" = Robert Boulter = ")  # the comparison can fail: a leading space is where they part


# ---- the protocol card ---------------------------------------------------------------------------

# Each point of issue 21 and the official value the card must show for LLaMA-7B / Vicuna-13B
CARD = {
    "blocks removed": {"llama-1-7b": [6, 9, 11], "vicuna-13b": [8, 11, 15]},
    "Taylor gradients in": "float32", "zero-shot BOS": False,
    "LoRA evaluation every": 100, "LoRA checkpoint every": 200, "LoRA model kept": "best eval loss",
    "LoRA held-out split": "train_test_split(test_size=2000, seed=42)", "LoRA padding side": "left",
    "LoRA precision": "fp16", "CPT corpus": "cerebras/SlimPajama-627B",
    "timing prompt": "The Leaning Tower of Pisa is known for", "timing batch sizes": [1, 8, 16, 32, 64, 128, 256],
    "timing output tokens (forced)": [128, 512], "timing decoding": "sampling top-k 50, top-p 0.95",
    "timing dtype": "float16", "timing KV cache": "on", "timing runs: warm-up + timed": [10, 20],
    "timing call order": "each model's runs in a row",
    "timing statistic": "mean", "timing VRAM": "max_memory_allocated", "GPU utilisation sampled every (s)": 0.5,
    "calibration data": "BookCorpus", "HellaSwag": "HellaSwag", "LLaMA tokenizer ids": "slow (sentencepiece) ids",
}


@pytest.mark.parametrize("arch", ["llama-1-7b", "vicuna-13b"])
def test_paper_card_is_the_official_protocol_on_the_papers_models(arch):
    from shortened_llm.protocol import protocol_card

    card = protocol_card("paper", architecture_config(arch), cuda=True, standins={})
    rows = {r["setting"]: r for r in card["rows"]}
    assert {r["point"] for r in card["rows"]} == set(range(9))  # all eight points, and the settings matched before
    for setting, official in CARD.items():
        want = official[arch] if isinstance(official, dict) else official
        assert rows[setting]["official"] == want, setting
        assert rows[setting]["ours"] == want and rows[setting]["status"] == "same", rows[setting]
    assert all(r["status"] == "same" for r in card["rows"] if r["controlled"]), \
        [r for r in card["rows"] if r["controlled"] and r["status"] != "same"]
    budget = rows["CPT token budget"]  # a budget, not a protocol: days on 8 H100s
    assert not budget["controlled"] and budget["status"].startswith("differs") and "not confirmed" in budget["official"]
    assert (card["architecture"], card["substitute_data"], card["data_note"]) == (arch, False, "")


def test_card_names_what_the_environment_changes_and_what_cpu_presets_cut():
    from shortened_llm.protocol import protocol_card

    llama = architecture_config("llama-1-7b")
    on_cpu = {r["setting"]: r for r in protocol_card("paper", llama, cuda=False, standins={}, dtype="float32")["rows"]}
    assert on_cpu["LoRA precision"]["ours"] == "fp32" and on_cpu["LoRA precision"]["status"].startswith("differs: fp16")
    bf16_cpu = protocol_card("paper", llama, cuda=False, standins={}, dtype="bfloat16")["rows"]
    assert {r["setting"]: r["ours"] for r in bf16_cpu}["LoRA precision"] == "bf16 autocast"  # trainer.master_weights
    bf16_gpu = protocol_card("paper", llama, cuda=True, standins={}, dtype="bfloat16")["rows"]
    assert {r["setting"]: r["ours"] for r in bf16_gpu}["LoRA precision"] == "fp16"  # the official AMP wins on CUDA
    packed = protocol_card("paper", llama, cuda=True, standins={"bookcorpus": "novels"})
    assert packed["substitute_data"] and packed["data_note"] == "substitute data"
    assert {r["setting"]: r["status"] for r in packed["rows"]}["calibration data"] == \
           "differs: the offline pack's stand-in (substitute data)"
    smoke = {r["setting"]: r for r in protocol_card("smoke", llama, cuda=False, standins={})["rows"]}
    for setting in ("blocks removed", "LoRA model kept", "timing prompt", "timing statistic", "CPT corpus"):
        assert smoke[setting]["status"].startswith("differs: "), smoke[setting]
    other = {r["setting"]: r for r in protocol_card("paper", architecture_config("llama-3-8b"), cuda=True, standins={})["rows"]}
    assert other["blocks removed"]["status"].startswith("n/a")  # the official scripts prune no such shape
