"""dtype="auto" and its overrides (precision.py), the metadata that records the choice, and fp32 block scoring.

The hardware is patched (AMX, AVX512-BF16, CUDA with and without bf16, MPS), so every branch runs
on any machine; conftest sets SHORTENED_LLM_DTYPE=float32 for the rest of the suite, and these
tests remove it where they test what comes after it.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import make_tiny_llama
from shortened_llm import precision
from shortened_llm.cli import main
from shortened_llm.importance import block_importance
from shortened_llm.models import load_model, save_model
from shortened_llm.precision import ENV_VAR, choose_dtype, forced_dtype, hardware_dtype, parse_dtype
from shortened_llm.presets import PRESETS, Preset, get_preset
from shortened_llm.prune import PruningRecord, remove_blocks


@pytest.fixture
def hardware(monkeypatch):
    """Set what the machine has: ``hardware(amx=..., avx512_bf16=..., cuda=..., cuda_bf16=...)``; env var removed."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(precision, "_announced", set())
    asked = {}

    def set_(amx=False, avx512_bf16=False, amx_fp16=False, cuda=False, cuda_bf16=False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: amx_fp16)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")

        def is_bf16_supported(including_emulation=True):
            asked["including_emulation"] = including_emulation
            return cuda_bf16

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        return asked

    return set_


# ---- the hardware rule ----------------------------------------------------------------------

@pytest.mark.parametrize("amx, avx, want, unit", [
    (True, False, torch.bfloat16, "AMX"),
    (False, True, torch.bfloat16, "AVX512-BF16"),
    (True, True, torch.bfloat16, "AMX and AVX512-BF16"),
    (False, False, torch.float32, "neither"),
])
def test_cpu_picks_bf16_only_with_bf16_units(hardware, amx, avx, want, unit):
    hardware(amx=amx, avx512_bf16=avx)
    choice = choose_dtype("auto", device="cpu")
    assert choice.dtype == want and choice.source == "hardware"
    assert unit in choice.reason and choice.reason.startswith("bf16: " if want == torch.bfloat16 else "fp32: ")


def test_avx512_bf16_reason_is_one_line(hardware):
    hardware(avx512_bf16=True)
    assert hardware_dtype("cpu").reason == "bf16: this CPU has AVX512-BF16"


@pytest.mark.parametrize("bf16, want", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_picks_bf16_where_native_else_fp16(hardware, bf16, want):
    asked = hardware(cuda=True, cuda_bf16=bf16, avx512_bf16=True)
    choice = choose_dtype()  # device=None: CUDA when present, as load_model places the model
    assert choice.dtype == want and "CUDA" in choice.reason and "Test GPU" in choice.reason
    assert asked["including_emulation"] is False  # an emulated bf16 (pre-Ampere) is slower than fp16


def test_mps_picks_fp16_and_says_why(hardware):
    hardware(avx512_bf16=True)
    choice = hardware_dtype("mps")
    assert choice.dtype == torch.float16 and "MPS" in choice.reason and "macOS 14" in choice.reason


def test_the_reason_is_printed_once_per_process(hardware, capsys):
    hardware(avx512_bf16=True)
    for _ in range(3):
        choose_dtype(device="cpu")
    out, err = capsys.readouterr()
    assert out == "" and err.count("bf16: this CPU has AVX512-BF16") == 1  # stderr: the CLI's JSON stays clean


# ---- overrides, strongest first ---------------------------------------------------------------

def test_env_var_beats_the_hardware_and_the_preset(hardware, monkeypatch):
    hardware(avx512_bf16=True)
    monkeypatch.setenv(ENV_VAR, "fp32")
    choice = choose_dtype("auto", preset=Preset(dtype="bfloat16"), device="cpu")
    assert choice.dtype == torch.float32 and choice.source == "environment" and ENV_VAR in choice.reason


@pytest.mark.parametrize("preset", [Preset(name="p", dtype="float32"), "tiny"])
def test_preset_field_beats_the_hardware(hardware, preset, monkeypatch):
    hardware(avx512_bf16=True)
    if isinstance(preset, str):  # a preset name: its field, overridden for this test
        monkeypatch.setitem(PRESETS, preset, get_preset(preset, dtype="float32"))
    choice = choose_dtype("auto", preset=preset, device="cpu")
    assert choice.dtype == torch.float32 and choice.source == "preset" and "preset" in choice.reason


def test_every_preset_defaults_to_auto():
    assert {p.dtype for p in PRESETS.values()} == {"auto"}


def test_explicit_argument_wins(hardware, monkeypatch):
    hardware(avx512_bf16=True)
    monkeypatch.setenv(ENV_VAR, "bfloat16")
    choice = choose_dtype(torch.float32, preset=Preset(dtype="bfloat16"), device="cpu")
    assert choice.dtype == torch.float32 and choice.source == "argument"
    with forced_dtype("float32"):  # the CLI's --dtype: the same rank, for loads deep inside a command
        assert choose_dtype("auto", preset=Preset(dtype="bfloat16"), device="cpu").dtype == torch.float32
        assert choose_dtype("bfloat16", device="cpu").dtype == torch.bfloat16  # an argument still beats it
    assert choose_dtype("auto", device="cpu").dtype == torch.bfloat16  # forcing ends with the block


@pytest.mark.parametrize("name, want", [("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16), ("fp16", torch.float16),
                                        ("half", torch.float16), ("torch.float32", torch.float32),
                                        (torch.bfloat16, torch.bfloat16), ("auto", None)])
def test_names_and_aliases(name, want):
    assert parse_dtype(name) == want


def test_unknown_names_list_the_valid_ones(hardware, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"Unknown dtype 'bfloat'\. Did you mean 'bfloat16'\? Available: auto, float32"):
        parse_dtype("bfloat")
    with pytest.raises(ValueError, match="not a floating dtype"):
        parse_dtype(torch.int64)
    with pytest.raises(ValueError, match=r"Unknown Preset.dtype 'fp33'\. Did you mean 'fp32'\?"):
        Preset(dtype="fp33")
    hardware()
    monkeypatch.setenv(ENV_VAR, "floot32")
    with pytest.raises(ValueError, match=f"Unknown {ENV_VAR} 'floot32'.*Did you mean 'float32'"):
        choose_dtype(device="cpu")
    assert main(["eval", "ppl", "--dtype", "bf61"]) == 2  # refused by argparse before any model loads
    assert "Unknown --dtype 'bf61'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_half_precision_on_a_cpu_without_its_units_warns(hardware, name):
    hardware()  # no AMX, no AVX512-BF16, no AMX-FP16
    with pytest.warns(UserWarning, match=f"{name} on a CPU without .* slower than float32"):
        assert choose_dtype(name, device="cpu").dtype == parse_dtype(name)


def test_bf16_on_a_bf16_cpu_does_not_warn(hardware, recwarn):
    hardware(avx512_bf16=True)
    choose_dtype("bfloat16", device="cpu")
    assert not [w for w in recwarn if "slower" in str(w.message)]


# ---- load_model and the recorded metadata --------------------------------------------------

def test_load_model_auto_explicit_and_checkpoint_dtype(hardware, tiny_llama_dir):
    hardware(avx512_bf16=True, amx_fp16=True)  # fp16 below without the slow-CPU warning
    model, _ = load_model(tiny_llama_dir)  # default "auto"
    assert model.dtype == torch.bfloat16 and model.precision == {"dtype": "bfloat16",
                                                                 "reason": "bf16: this CPU has AVX512-BF16"}
    for explicit, want in [(torch.float16, torch.float16), ("float32", torch.float32), (None, torch.float32)]:
        model, _ = load_model(tiny_llama_dir, dtype=explicit)  # None: the checkpoint's own dtype, as before
        assert model.dtype == want and model.precision["dtype"] == str(want).removeprefix("torch.")


def test_pruning_json_records_the_choice_only_when_known(hardware, tiny_llama_dir, tmp_path):
    hardware(avx512_bf16=True)
    model, tok = load_model(tiny_llama_dir)
    remove_blocks(model, [1], criterion="magnitude")
    save_model(model, tok, tmp_path / "p")
    record = json.loads((tmp_path / "p" / "pruning.json").read_text())
    assert record["precision"] == {"dtype": "bfloat16", "reason": "bf16: this CPU has AVX512-BF16"}
    assert load_model(tmp_path / "p")[0].pruning.precision == record["precision"]  # read back

    plain = remove_blocks(make_tiny_llama(), [1])  # not loaded by load_model: no choice to record
    save_model(plain, None, tmp_path / "plain")
    assert "precision" not in json.loads((tmp_path / "plain" / "pruning.json").read_text())
    old = '{"original_num_blocks": 4, "removed_blocks": [1], "criterion": "ppl", "ratio": null, "scores": null}'
    assert PruningRecord.from_json(old).precision is None  # an old run dir reads as before


def test_a_cast_after_loading_is_recorded_as_what_the_weights_are(hardware, tiny_llama_dir):
    hardware(avx512_bf16=True)
    model, _ = load_model(tiny_llama_dir)
    model.float()
    record = precision.precision_record(model)
    assert record["dtype"] == "float32" and "cast after loading" in record["reason"]


def test_cli_dtype_reaches_prune_and_retrain_metadata(hardware, capsys, tiny_llama_dir, tmp_path):
    hardware(avx512_bf16=True)
    assert main(["prune", "--model", str(tiny_llama_dir), "--criterion", "magnitude", "--n-blocks", "1",
                 "--dtype", "float32", "--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "p" / "pruning.json").read_text())["precision"] == \
        {"dtype": "float32", "reason": "fp32: --dtype float32"}
    assert main(["eval", "ppl", "--model", str(tmp_path / "p"), "--max-segments", "1", "--dtype", "bf16"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"]["dtype"] == "bfloat16"
    # retrain loads the model inside lora_retrain: --dtype still decides, and training.json says so
    assert main(["retrain", "lora", "--model", str(tmp_path / "p"), "--out", str(tmp_path / "r"), "--preset", "tiny",
                 "--max-steps", "1", "--dtype", "bfloat16"]) == 0
    info = json.loads((tmp_path / "r" / "training.json").read_text())
    assert info["precision"] == {"dtype": "bfloat16", "reason": "bf16: --dtype bfloat16"}


# ---- block scoring in fp32 whatever the model's dtype ---------------------------------------

@pytest.mark.parametrize("criterion", ["ppl", "bi", "angular", "sleb"])
def test_bf16_model_scores_equal_the_fp32_model_with_its_rounded_weights(criterion, random_ids, one_thread):
    low = make_tiny_llama(num_layers=6).to(torch.bfloat16)
    reference = copy.deepcopy(low).float()  # the same bf16-rounded weights (and buffers), held in fp32
    before = {k: v.clone() for k, v in low.state_dict().items()}
    scores = block_importance(low, random_ids, criterion, progress=False)
    assert torch.equal(scores, block_importance(reference, random_ids, criterion, progress=False))
    after = low.state_dict()  # back to bf16, bit for bit
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    if criterion != "sleb":  # in the model's own dtype they differ (sleb's greedy order happens to agree here)
        own = block_importance(low, random_ids, criterion, fp32=False, progress=False)
        assert not torch.equal(own, scores)


# ---- the embedded model ------------------------------------------------------------------------

def test_embedded_model_loads_in_bf16_on_a_bf16_cpu_and_keeps_its_ppl(embedded, hardware, one_thread):
    from shortened_llm.evaluate import perplexity

    hardware(avx512_bf16=True)
    model, tok = load_model("smollm2-135m", dtype="auto", device="cpu")
    assert model.dtype == torch.bfloat16 and model.precision["reason"] == "bf16: this CPU has AVX512-BF16"
    fp32_model, _ = embedded
    assert fp32_model.dtype == torch.float32  # the suite's default (SHORTENED_LLM_DTYPE=float32)
    ppl = {m.dtype: perplexity(m, tok, "wikitext2", max_segments=4, batch_size=4, progress=False)
           for m in (model, fp32_model)}
    assert abs(ppl[torch.bfloat16] / ppl[torch.float32] - 1) < 0.01, ppl
