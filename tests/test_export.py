"""GGUF export: metadata of a pruned model, bad input, and (with llama.cpp installed) the same
per-token NLL in llama.cpp as in transformers, quantisation, tokenizer agreement, generation."""
from __future__ import annotations

import re

import pytest
import torch

from shortened_llm.export import export_gguf, read_gguf_metadata
from shortened_llm.gguf_layout import ARCHITECTURES, QUANT_TYPES
from shortened_llm.llamacpp import gguf_generate, gguf_token_nll, hf_generate, load_gguf, quantize_gguf, tokenizer_agreement
from shortened_llm.models import save_model, tiny_random_model


@pytest.fixture(scope="module")
def tokenizer(embedded):
    return embedded[1]


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama (6 blocks, the embedded tokenizer) with blocks 1 and 2 removed."""
    from shortened_llm import remove_blocks

    model = tiny_random_model("llama", num_layers=6, tokenizer=tokenizer, seed=1)
    remove_blocks(model, [1, 2], criterion="ppl", ratio=0.33)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("pruned") / "tiny-pruned")


@pytest.fixture(scope="module")
def segments(tokenizer):
    from shortened_llm.evaluate import ppl_segments

    return ppl_segments(tokenizer, "wikitext2", seq_len=32, max_segments=3)


def test_f16_metadata_records_the_pruning(pruned_dir, tmp_path, tokenizer):
    out = export_gguf(pruned_dir, tmp_path / "m.gguf", "f16", progress=False)
    meta = read_gguf_metadata(out)
    assert meta["architecture"] == "llama"
    assert meta["block_count"] == 4
    assert meta["original_block_count"] == 6
    assert meta["removed_blocks"] == [1, 2]
    assert meta["criterion"] == "ppl"
    assert set(meta["tensor_types"]) == {"F16", "F32"}  # 2-D weights f16, norms f32

    from gguf import GGUFReader

    reader = GGUFReader(str(out))
    names = {t.name for t in reader.tensors}
    assert {f"blk.{i}.attn_q.weight" for i in range(4)} <= names and "blk.4.attn_q.weight" not in names
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(tokenizer)
    assert out.stat().st_mode & 0o044  # readable by others, like any file the user writes
    # the fast header walk that read_gguf_metadata uses reads every value as gguf's own reader does
    from shortened_llm.llamacpp import read_gguf_header

    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    values, types = read_gguf_header(out, keys)
    assert values == {k: reader.fields[k].contents() for k in keys}
    assert types == [t.tensor_type.name for t in reader.tensors]


def test_unknown_quant_lists_the_supported_ones(pruned_dir, tmp_path):
    with pytest.raises(ValueError, match="Did you mean 'q8_0'.*Available: f32, f16, q8_0"):
        export_gguf(pruned_dir, tmp_path / "m.gguf", "q8_o")
    assert not (tmp_path / "m.gguf").exists()


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, tokenizer):
    opt = save_model(tiny_random_model("opt", num_layers=2, tokenizer=tokenizer), tokenizer, tmp_path / "opt")
    with pytest.raises(ValueError, match="model_type='opt'.*Supported: gemma, gemma2, gemma3_text, gpt_neox, llama, mistral, phi3, qwen2, qwen3"):
        export_gguf(opt, tmp_path / "opt.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf*"))  # no half-written file left behind


def test_model_dir_without_weights(tmp_path, pruned_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((pruned_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        export_gguf(bare, tmp_path / "m.gguf")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        export_gguf(tmp_path / "missing", tmp_path / "m.gguf")


def test_output_path_not_writable_or_existing(pruned_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="cannot create its folder"):
        export_gguf(pruned_dir, blocker / "sub" / "m.gguf")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_gguf(pruned_dir, blocker)


# ---- in llama.cpp ---------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_llama_cpp_nll_equals_transformers(model_type, tmp_path, tokenizer, segments):
    """f32 GGUF: llama.cpp's per-token NLL equals transformers' on the same segments (Q/K order right)."""
    pytest.importorskip("llama_cpp")
    from shortened_llm import remove_blocks
    from shortened_llm.evaluate import token_nll

    extra = {"mistral": {"sliding_window": None}, "phi3": {"sliding_window": None},
             "qwen2": {"use_sliding_window": False}, "qwen3": {"use_sliding_window": False}}.get(model_type, {})
    # Gemma2/3 keep llama.cpp's fixed sliding/global pattern: remove a whole group of blocks.
    # Their window (8) is shorter than the segments (32), so the window itself is checked too.
    layers, removed = {"gemma2": (6, [2, 3]),
                       "gemma3_text": (8, [6, 7])}.get(model_type, (4, [2]))
    if model_type == "gemma3_text":  # llama.cpp's Gemma3: 5 sliding blocks, then a global one
        extra = {"layer_types": ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2}
    model = tiny_random_model(model_type, num_layers=layers, tokenizer=tokenizer, seed=2, **extra)
    remove_blocks(model, removed)
    # not named after the family: llama.cpp gives special tokens Phi-3's strip rules when the
    # GGUF's general.name contains "phi3", and looks up "</s>", which this test vocabulary lacks
    model_dir = save_model(model, tokenizer, tmp_path / "pruned")
    out = export_gguf(model_dir, tmp_path / "m-f32.gguf", "f32", progress=False)
    llm = load_gguf(out, n_ctx=64)
    hf = token_nll(model, segments)
    lc = gguf_token_nll(llm, segments)
    assert lc.shape == hf.shape
    torch.testing.assert_close(lc, hf, atol=2e-3, rtol=1e-3)


def test_sliding_window_layers_are_refused_where_llama_cpp_ignores_them(tmp_path, tokenizer):
    model = tiny_random_model("qwen2", num_layers=4, tokenizer=tokenizer, use_sliding_window=True)
    model_dir = save_model(model, tokenizer, tmp_path / "qwen2-swa")
    with pytest.raises(ValueError, match="sliding-window attention in blocks"):
        export_gguf(model_dir, tmp_path / "x.gguf", "f16", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_a_broken_sliding_pattern_is_refused(tmp_path, tokenizer):
    """Gemma2 alternates sliding and global blocks; removing one block breaks what llama.cpp assumes."""
    from shortened_llm import remove_blocks

    model = tiny_random_model("gemma2", num_layers=4, tokenizer=tokenizer)
    remove_blocks(model, [1])
    model_dir = save_model(model, tokenizer, tmp_path / "pruned")
    with pytest.raises(ValueError, match=r"sliding-window attention in blocks \[0, 1\].*blocks \[1\] broke"):
        export_gguf(model_dir, tmp_path / "x.gguf", "f16", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_window_shorter_than_the_context_is_a_warning(tmp_path, tokenizer):
    """Phi-3's window covers every block; llama.cpp ignores it, so the export says so."""
    model = tiny_random_model("phi3", num_layers=2, tokenizer=tokenizer, sliding_window=8)
    model_dir = save_model(model, tokenizer, tmp_path / "pruned")
    with pytest.warns(UserWarning, match="up to 8 tokens"):
        export_gguf(model_dir, tmp_path / "x.gguf", "f16", progress=False)


def test_quantised_files_load_and_stay_close(pruned_dir, tmp_path, segments):
    pytest.importorskip("llama_cpp")

    nll = {}
    f16 = export_gguf(pruned_dir, tmp_path / "m-f16.gguf", "f16", progress=False)
    made = {"f16": f16,
            "q8_0": export_gguf(pruned_dir, tmp_path / "m-q8_0.gguf", "q8_0", progress=False),  # HF dir -> q8_0
            "q4_k_m": quantize_gguf(f16, tmp_path / "m-q4_k_m.gguf", "q4_k_m")}  # f16 file -> q4_k_m
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-f16.gguf", "m-q4_k_m.gguf", "m-q8_0.gguf"]  # no temp left
    for quant, out in made.items():
        meta = read_gguf_metadata(out)
        assert meta["block_count"] == 4 and meta["removed_blocks"] == [1, 2]  # kept through quantisation
        nll[quant] = gguf_token_nll(load_gguf(out, n_ctx=64), segments).mean().item()
        nll[quant, "size"] = out.stat().st_size
    assert "Q8_0" in read_gguf_metadata(tmp_path / "m-q8_0.gguf")["tensor_types"]
    assert nll["q8_0", "size"] < nll["f16", "size"]
    assert abs(nll["q8_0"] - nll["f16"]) < 0.02 * nll["f16"]
    assert QUANT_TYPES[:3] == ("f32", "f16", "q8_0")
    with pytest.raises(ValueError, match="written by export_gguf"):
        quantize_gguf(f16, tmp_path / "x.gguf", "f32")


def test_tokenizers_agree_and_generation_matches(pruned_dir, tmp_path, tokenizer):
    pytest.importorskip("llama_cpp")
    from shortened_llm import load_model
    from shortened_llm.data import load_texts

    out = export_gguf(pruned_dir, tmp_path / "m-f32.gguf", "f32", progress=False)
    llm = load_gguf(out, n_ctx=128)
    texts = [t for t in load_texts("wikitext2")[:200] if t.strip()][:40] + ["In 2011, 12345 cats ran 3.5 km — fast!"]
    agreement = tokenizer_agreement(llm, tokenizer, texts)
    assert agreement["ids_equal"] == agreement["texts"], agreement["first_mismatch"]
    assert agreement["roundtrip_equal"] == agreement["texts"]

    model, _ = load_model(pruned_dir, device="cpu")
    prompt = tokenizer("The capital of France is", add_special_tokens=False).input_ids
    assert gguf_generate(llm, prompt, 8) == hf_generate(model, tokenizer, prompt, 8)


def test_llama_cpp_uses_torchs_threads_for_prompts_too(pruned_dir, tmp_path, monkeypatch):
    """PPL in llama.cpp is all prompt (batch) evaluation; its threads must not default to every core."""
    pytest.importorskip("llama_cpp")
    import torch

    out = export_gguf(pruned_dir, tmp_path / "m-f16.gguf", "f16", progress=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    llm = load_gguf(out, n_ctx=64)
    assert (llm.context_params.n_threads, llm.context_params.n_threads_batch) == (1, 1)
    llm = load_gguf(out, n_ctx=64, n_threads=3)
    assert (llm.context_params.n_threads, llm.context_params.n_threads_batch) == (3, 3)


# ---- llama.cpp cannot take the caller down --------------------------------------------------

def _die_with_sigill(*args):
    """What a child of llamacpp_guard runs instead of llama.cpp: the death of an AMX build on an AMX CPU."""
    import sys

    return [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]


def test_a_crash_in_llama_cpp_is_one_clear_error_and_the_process_lives(pruned_dir, tmp_path, monkeypatch):
    """The CLI's side of it (one line, no traceback): test_cli.py."""
    pytest.importorskip("llama_cpp")
    from shortened_llm import llamacpp_guard

    f16 = export_gguf(pruned_dir, tmp_path / "m-f16.gguf", "f16", progress=False)
    monkeypatch.setattr(llamacpp_guard, "_child_command", _die_with_sigill)
    cpu = re.escape(llamacpp_guard.cpu_model())  # an Intel name has regex characters: "Intel(R) Xeon(R)"
    with pytest.raises(llamacpp_guard.LlamaCppCrash, match=rf"SIGILL while evaluating m-f16.gguf, on {cpu}.*make llamacpp"):
        load_gguf(f16, n_ctx=64)
    with pytest.raises(llamacpp_guard.LlamaCppCrash, match="SIGILL while quantising m-f16.gguf to LLAMA_FTYPE_MOSTLY_Q8_0"):
        quantize_gguf(f16, tmp_path / "m-q8_0.gguf", "q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-f16.gguf"]  # nothing half-written


def test_each_gguf_is_run_in_a_child_once_per_file(pruned_dir, tmp_path, monkeypatch, segments):
    pytest.importorskip("llama_cpp")
    from shortened_llm import llamacpp_guard

    calls = []
    run_child = llamacpp_guard._run_child
    monkeypatch.setattr(llamacpp_guard, "_run_child", lambda what, *args: calls.append(args[0]) or run_child(what, *args))
    f16 = export_gguf(pruned_dir, tmp_path / "m-f16.gguf", "f16", progress=False)
    first = gguf_token_nll(load_gguf(f16, n_ctx=64), segments)
    again = gguf_token_nll(load_gguf(f16, n_ctx=64), segments)
    assert calls == ["probe"]
    torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_an_amx_build_on_an_amx_cpu_is_loaded_off_its_amx_kernels(pruned_dir, tmp_path, monkeypatch, segments):
    """Where llama.cpp has AMX compiled in and the CPU has AMX, its extra buffer types stay off; elsewhere on."""
    pytest.importorskip("llama_cpp")
    from shortened_llm import llamacpp_guard

    q8 = quantize_gguf(export_gguf(pruned_dir, tmp_path / "m-f16.gguf", "f16", progress=False), tmp_path / "q8.gguf", "q8_0")
    monkeypatch.setattr(llamacpp_guard, "cpu_has_amx", lambda: False)
    plain = load_gguf(q8, n_ctx=64)
    assert plain.model_params.use_extra_bufts
    monkeypatch.setattr(llamacpp_guard, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(llamacpp_guard, "amx_compiled_in", lambda llama_cpp: True)
    off = load_gguf(q8, n_ctx=64)
    assert not off.model_params.use_extra_bufts
    import llama_cpp

    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts  # the switch is undone after loading
    torch.testing.assert_close(gguf_token_nll(off, segments), gguf_token_nll(plain, segments), atol=1e-3, rtol=1e-3)


def test_the_installed_llama_cpp_is_built_without_amx():
    """`make install` compiles llama.cpp without ggml's AMX kernels (the SIGILL of quantised files on Intel Xeons)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from shortened_llm.llamacpp_guard import amx_compiled_in

    assert not amx_compiled_in(llama_cpp), llama_cpp.llama_print_system_info().decode()
