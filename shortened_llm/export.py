"""GGUF export of (pruned) models: the writer of the f16/f32 file llama.cpp loads.

People run shortened models on laptops through llama.cpp: the GGUF quantisations (Q2_K
... Q8_0) of the paper's CPT'd shortened Vicuna are among the most used artefacts of this
line of work. A depth-pruned model is an ordinary Llama with fewer blocks, so the export is
the ordinary one: ``llama.block_count`` says how many blocks are left, and two custom keys
(``shortened_llm.original_block_count``, ``shortened_llm.removed_blocks``) say which went.

Two steps, each done by the ecosystem's own tools:
1. f16/f32 GGUF with ``gguf.GGUFWriter`` (the ``gguf`` package of llama.cpp), in this module:
   tensor names from ``gguf.get_tensor_name_map`` (through ``gguf_layout``), merges and special
   ids from ``gguf.SpecialVocab``. llama.cpp's own ``convert_hf_to_gguf.py`` is not used because
   it ships in neither the ``gguf`` nor the ``llama-cpp-python`` wheel (only inside the
   llama-cpp-python sdist, with its ``conversion/`` package), so this module writes the layouts
   itself (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, GPT-NeoX; OPT has no llama.cpp
   architecture). The conventions it follows by hand are few and each is checked by llama.cpp's
   NLL in the tests: the Q/K row order of the llama arch (``_permute_qk``), GPT-NeoX's fused QKV
   rows (``_regroup_qkv``), Gemma's norm weights + 1 and Gemma2/3's positional sliding pattern.
2. Every other type (q8_0, q4_k_m, ...) with llama.cpp's quantiser: ``llamacpp.quantize_gguf``.

The llama.cpp side (quantiser, loading, NLL, tokenizer agreement, generation) lives in
``llamacpp.py``, below this module: ``export_gguf`` quantises through it, and ``compare_formats``
(the HF model against each GGUF on the same PPL segments) stays here because it writes the
files too. Import the llama.cpp side from ``shortened_llm.llamacpp`` and the type tables from
``shortened_llm.gguf_layout``.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .artifacts import atomic_file
from .gguf_layout import ARCHITECTURES, LLAMA_CPP_TYPES, WRITER_TYPES, exportable_type, gguf_tensor_name
from .llamacpp import (check_gguf_file, check_imatrix_given, check_out_file, check_quant, gguf_perplexity, llama_cpp_available, load_gguf,
                       quantize_gguf, read_gguf_header, require_llama_cpp)

__all__ = ["export_gguf", "read_gguf_metadata", "file_size_mb", "compare_formats"]

META_PREFIX = "shortened_llm"  # custom GGUF keys: shortened_llm.original_block_count, ...

# llama.cpp's pre-tokenizer names for the HF byte-level BPE pre-tokenizers we recognise.
# Keyed by the shape of tokenizer.json's "pre_tokenizer" (see _pre_tokenizer_key); a tokenizer
# of another shape needs ``tokenizer_pre=`` (llama.cpp: LLAMA_VOCAB_PRE_TYPE_* names).
PRE_TOKENIZERS: dict[str, str] = {
    "ByteLevel(regex)": "gpt-2",  # GPT-2 regex (also what transformers rebuilds from a GGUF)
    "Digits(individual)+ByteLevel(regex)": "smollm",  # StarCoder / SmolLM: every digit alone
}


# ---- checks ---------------------------------------------------------------------------------

def _weight_files(model_dir: Path) -> list[Path]:
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model_dir={str(model_dir)!r} is not a directory: pass a Hugging Face model dir "
                                "(save_model / save_pretrained output, e.g. runs/smoke/pruned/ppl-0.20)")
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"model_dir={str(model_dir)!r} has no config.json: not a Hugging Face model dir")
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"model_dir={str(model_dir)!r} has a config.json but no weights (*.safetensors or "
                                "pytorch_model*.bin): save the model with save_model(model, tokenizer, dir)")
    return files


# ---- the f16 / f32 writer -------------------------------------------------------------------

def _state_dict(files: Sequence[Path]):
    """Yield ``(name, tensor)`` from every weight file, one tensor at a time (no full model in memory)."""
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """(n_head * head_dim, hidden): rows of each head from [half0, half1] to interleaved pairs.

    HF Llama rotates (x[:d/2], x[d/2:]); llama.cpp's llama arch rotates (x[0], x[1]),
    (x[2], x[3]), ... The same reordering llama.cpp's converter applies (and transformers
    undoes when it reads a GGUF).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _regroup_qkv(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """(3 * hidden, ...) rows from per-head [q, k, v] (GPT-NeoX) to [all q, all k, all v] (llama.cpp)."""
    return w.reshape(n_head, 3, w.shape[0] // n_head // 3, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def _pre_tokenizer_key(pre: dict | None) -> str:
    """A short signature of tokenizer.json's pre_tokenizer, to look up in ``PRE_TOKENIZERS``."""
    if not pre:
        return "none"
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    out = []
    for p in parts:
        if p.get("type") == "ByteLevel":
            out.append("ByteLevel(regex)" if p.get("use_regex", True) else "ByteLevel")
        elif p.get("type") == "Digits":
            out.append("Digits(individual)" if p.get("individual_digits") else "Digits")
        else:
            out.append(p.get("type", "?"))
    return "+".join(out)


def _add_vocab(writer, model_dir: Path, vocab_size: int, tokenizer_pre: str | None) -> None:
    """Byte-level BPE vocabulary as llama.cpp's "gpt2" tokenizer model."""
    import gguf
    from transformers import AutoTokenizer

    tok_json = model_dir / "tokenizer.json"
    if not tok_json.exists():
        raise FileNotFoundError(f"model_dir={str(model_dir)!r} has no tokenizer.json: export needs the fast "
                                "tokenizer saved beside the weights (save_model(model, tokenizer, dir))")
    spec = json.loads(tok_json.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"model_dir={str(model_dir)!r}: tokenizer {model.get('type')!r} (byte_fallback="
                         f"{model.get('byte_fallback')}) is not supported; export supports byte-level BPE "
                         "tokenizers (GPT-2, SmolLM, Llama-3 style)")
    if tokenizer_pre is None:
        key = _pre_tokenizer_key(spec.get("pre_tokenizer"))
        if key not in PRE_TOKENIZERS:
            raise ValueError(f"model_dir={str(model_dir)!r}: pre-tokenizer {key!r} is not one we map to llama.cpp "
                             f"(known: {', '.join(f'{k} -> {v}' for k, v in PRE_TOKENIZERS.items())}); pass "
                             "tokenizer_pre=<llama.cpp pre-tokenizer name> and check tokenizer_agreement()")
        tokenizer_pre = PRE_TOKENIZERS[key]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:  # padded embedding rows without a token
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges, bos/eos/unk/pad ids and the chat template, read by the gguf package itself
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)


def _pruning_meta(model_dir: Path, n_blocks: int) -> dict:
    from .models import read_pruning_json

    record = read_pruning_json(model_dir) or {}
    return {
        "original_block_count": int(record.get("original_num_blocks", n_blocks)),
        "removed_blocks": [int(b) for b in record.get("removed_blocks", [])],
        "criterion": record.get("criterion"),
    }


def _write_float_gguf(model_dir: Path, out_file: Path, quant: str, tokenizer_pre: str | None, progress: bool) -> None:
    import gguf
    from transformers import AutoConfig

    files = _weight_files(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    model_type = exportable_type(config)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    local_rope = rope.get("sliding_attention") if isinstance(rope.get("sliding_attention"), dict) else None
    rope = rope.get("full_attention", rope) if local_rope else rope  # Gemma3: one RoPE per attention type
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ValueError(f"rope_type={rope_type!r} of {str(model_dir)!r} is not supported by this exporter "
                         "(supported: default, linear)")
    spec = ARCHITECTURES[model_type]
    layer_types = getattr(config, "layer_types", None) or []
    sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    if spec.swa_period:
        p = spec.swa_period
        expected = [i for i in range(len(layer_types)) if i % p < p - 1]
        if sliding != expected:
            removed = _pruning_meta(model_dir, config.num_hidden_layers)["removed_blocks"]
            raise ValueError(f"{str(model_dir)!r} has sliding-window attention in blocks {sliding}, but llama.cpp's "
                             f"{spec.arch!r} decides it by position (blocks {expected} for {len(layer_types)} blocks): "
                             f"the GGUF would compute something else. Removing blocks {removed} broke the pattern; "
                             f"remove whole groups of {p} consecutive blocks (one global block and the sliding "
                             "ones before it) to keep it.")
    elif sliding and model_type != "mistral":
        raise ValueError(f"{str(model_dir)!r} uses sliding-window attention in blocks {sliding}, which llama.cpp's "
                         f"{spec.arch!r} architecture does not do (it attends to the whole context): the GGUF would "
                         "compute something else. Export a model with use_sliding_window=False.")
    window = getattr(config, "sliding_window", None)
    if model_type in ("mistral", "phi3") and window and window < config.max_position_embeddings:
        warnings.warn(f"{model_type} attends to the last {window} tokens in transformers but llama.cpp attends to the "
                      f"whole context: the GGUF computes the same only for sequences of up to {window} tokens",
                      stacklevel=3)
    n_blocks, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))  # GPT-NeoX rotates a quarter of each head
    dtype = WRITER_TYPES[quant]

    writer = gguf.GGUFWriter(str(out_file), spec.arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model_dir.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_blocks)  # the pruned depth: what llama.cpp builds
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(theta))
    if hasattr(config, "rms_norm_eps"):
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    else:  # LayerNorm families (GPT-NeoX)
        writer.add_layer_norm_eps(float(config.layer_norm_eps))
    if spec.swa_period and window:
        writer.add_sliding_window(int(window))
        if local_rope:
            writer.add_rope_freq_base_swa(float(local_rope.get("rope_theta", 10000.0)))
    for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                     ("final_logit_softcapping", writer.add_final_logit_softcapping)):
        if getattr(config, key, None):
            add(float(getattr(config, key)))
    if hasattr(config, "use_parallel_residual"):
        writer.add_parallel_residual(bool(config.use_parallel_residual))
    writer.add_rope_dimension_count(rope_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if quant == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    meta = _pruning_meta(model_dir, n_blocks)
    writer.add_uint32(f"{META_PREFIX}.original_block_count", meta["original_block_count"])
    writer.add_uint32(f"{META_PREFIX}.removed_block_count", len(meta["removed_blocks"]))
    writer.add_array(f"{META_PREFIX}.removed_blocks", meta["removed_blocks"])  # the gguf writer skips []
    if meta["criterion"]:
        writer.add_string(f"{META_PREFIX}.criterion", str(meta["criterion"]))
    _add_vocab(writer, model_dir, config.vocab_size, tokenizer_pre)

    for name, w in _state_dict(files):
        gguf_name = gguf_tensor_name(config, name)
        if gguf_name is None:
            continue  # recomputed by llama.cpp / shared with token_embd
        if gguf_name == "":
            raise ValueError(f"tensor {name!r} of {str(model_dir)!r} has no llama.cpp name for arch {spec.arch!r}")
        if spec.permute_qk and name.endswith("self_attn.q_proj.weight"):
            w = _permute_qk(w, n_head)
        elif spec.permute_qk and name.endswith("self_attn.k_proj.weight"):
            w = _permute_qk(w, n_kv)
        elif spec.qkv_per_head and "query_key_value" in name:
            w = _regroup_qkv(w, n_head)
        if spec.norm_plus_one and name.endswith("norm.weight"):
            w = w.float() + 1
        # norms and other 1-D tensors stay f32, as llama.cpp expects
        w = w.to(torch.float32 if w.ndim == 1 else dtype).contiguous()
        writer.add_tensor(gguf_name, w.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()


# ---- public: export -------------------------------------------------------------------------

def export_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, quant: str = "f16",
                overwrite: bool = False, tokenizer_pre: str | None = None, nthread: int | None = None,
                progress: bool = True, imatrix: str | os.PathLike | None = None) -> Path:
    """Write ``model_dir`` (a Hugging Face dir, pruned or not, or an embedded name) as a GGUF llama.cpp loads.

    ``quant``: f32 or f16 are written by the gguf package; q8_0, q4_k_m, ... (``QUANT_TYPES``)
    are quantised from a temporary f16 file by llama.cpp itself, with the importance matrix
    ``imatrix`` where given (see ``quantize_gguf``). ``tokenizer_pre`` names
    llama.cpp's pre-tokenizer when the HF one is not in ``PRE_TOKENIZERS``. The file appears
    only when complete (written beside ``out_file``, then renamed).
    """
    from .models import resolve_model_path

    quant = check_quant(quant)
    check_imatrix_given(quant, imatrix)
    model_dir, out_file = Path(resolve_model_path(model_dir)), Path(out_file)  # an embedded name -> its cached dir
    _weight_files(model_dir)
    check_out_file(out_file, overwrite)
    llama_cpp = require_llama_cpp(f"quant={quant!r}") if quant in LLAMA_CPP_TYPES else None

    if llama_cpp is None:
        with atomic_file(out_file) as tmp:
            _write_float_gguf(model_dir, tmp, quant, tokenizer_pre, progress)
        return out_file
    with atomic_file(out_file.with_name(out_file.name + ".f16")) as tmp_f16:
        _write_float_gguf(model_dir, tmp_f16, "f16", tokenizer_pre, progress)
        quantize_gguf(tmp_f16, out_file, quant, overwrite=overwrite, nthread=nthread, imatrix=imatrix)
        tmp_f16.unlink()  # only a stepping stone
    return out_file


def read_gguf_metadata(gguf_file: str | os.PathLike) -> dict:
    """The architecture, block counts and pruning record stored in a GGUF, and its tensors' types.

    Read with ``llamacpp.read_gguf_header``, which steps over the 49k-entry vocabulary rather than
    parse it: milliseconds, where ``gguf.GGUFReader`` (same values) takes ~6 s for the embedded model.
    """
    keys = {"general.architecture", f"{META_PREFIX}.original_block_count", f"{META_PREFIX}.removed_blocks",
            f"{META_PREFIX}.criterion", "general.file_type", "tokenizer.ggml.pre"}
    # "<arch>.block_count" names the architecture, which the same walk reads: take every such key, one pass
    values, types = read_gguf_header(gguf_file, lambda key: key in keys or key.endswith(".block_count"))
    arch = values.get("general.architecture")
    return {
        "architecture": arch,
        "block_count": values.get(f"{arch}.block_count"),
        "original_block_count": values.get(f"{META_PREFIX}.original_block_count"),
        "removed_blocks": list(values.get(f"{META_PREFIX}.removed_blocks", [])),
        "criterion": values.get(f"{META_PREFIX}.criterion"),
        "file_type": values.get("general.file_type"),
        "tensor_types": sorted(set(types)),
        "tokenizer_pre": values.get("tokenizer.ggml.pre"),
    }


def file_size_mb(path: str | os.PathLike) -> float:
    """Size on disk in MB (10^6 bytes); a directory counts its weight files."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in _weight_files(path)) / 1e6
    return path.stat().st_size / 1e6


def compare_formats(model_dir: str | os.PathLike, out_dir: str | os.PathLike, quants: Sequence[str] = ("f16", "q8_0", "q4_k_m"),
                    label: str | None = None, dataset: str = "wikitext2", seq_len: int = 128,
                    max_segments: int | None = None, batch_size: int = 8, progress: bool = True, cache=None) -> list[dict]:
    """One row per format of one model: the HF model, then each GGUF, on the same PPL segments.

    GGUF files are ``out_dir/<label>-<quant>.gguf``, reused when already there (train-or-load);
    every quantised type is made from ``<label>-f16.gguf``.
    Columns: model, format, size_mb, ppl, ppl_change_pct (vs HF), block_count. Without
    llama.cpp the GGUF rows have ``ppl=None`` (only f32/f16 can be written then).
    The HF row is ``evaluate.perplexity`` on those segments and each GGUF row ``gguf_perplexity``,
    both through the evaluation cache (``cache``: ``None`` = the active one, ``False`` = none), so a
    model or file already measured on these token ids is read back.
    """
    from .evaluate import default_bos, perplexity, ppl_segments
    from .models import resolve_model_path, load_model, num_blocks

    model_dir = Path(resolve_model_path(model_dir))
    label = label or model_dir.name
    model, tokenizer = load_model(model_dir)
    bos = default_bos(model)
    segments = ppl_segments(tokenizer, dataset, seq_len, bos, max_segments)  # the ids every row is scored on
    hf_ppl = perplexity(model, tokenizer, dataset, seq_len, bos=bos, max_segments=max_segments,
                        batch_size=batch_size, progress=progress, cache=cache)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    rows = [{"model": label, "format": f"HF {dtype}", "size_mb": file_size_mb(model_dir), "ppl": hf_ppl,
             "ppl_change_pct": 0.0, "block_count": num_blocks(model), "segments": len(segments)}]
    can_run = llama_cpp_available()
    f16 = Path(out_dir) / f"{label}-f16.gguf"
    for quant in quants:
        path = Path(out_dir) / f"{label}-{quant}.gguf"
        if quant in LLAMA_CPP_TYPES and not path.exists():
            if not f16.exists():  # the one float file every quantisation starts from
                export_gguf(model_dir, f16, "f16", progress=False)
            quantize_gguf(f16, path, quant)
        elif not path.exists():
            export_gguf(model_dir, path, quant, progress=False)
        ppl = None
        if can_run:
            llm = load_gguf(path, n_ctx=segments.shape[1])
            ppl = gguf_perplexity(llm, segments, progress=f"{label} {quant}" if progress else False, cache=cache)
            meta = llm.metadata  # llama.cpp's parsed header: instant, where gguf.GGUFReader takes seconds
            blocks = int(meta[f"{meta['general.architecture']}.block_count"])
            del llm
        else:
            blocks = read_gguf_metadata(path)["block_count"]
        rows.append({"model": label, "format": f"GGUF {quant}", "size_mb": file_size_mb(path), "ppl": ppl,
                     "ppl_change_pct": None if ppl is None else 100 * (ppl / hf_ppl - 1),
                     "block_count": blocks, "segments": len(segments)})
    return rows
