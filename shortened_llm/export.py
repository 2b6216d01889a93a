"""GGUF export of (pruned) models, quantisation through llama.cpp, and a check in llama.cpp.

People run shortened models on laptops through llama.cpp: the GGUF quantisations (Q2_K
... Q8_0) of the paper's CPT'd shortened Vicuna are among the most used artefacts of this
line of work. A depth-pruned model is an ordinary Llama with fewer blocks, so the export is
the ordinary one: ``llama.block_count`` says how many blocks are left, and two custom keys
(``shortened_llm.original_block_count``, ``shortened_llm.removed_blocks``) say which went.

Two steps, each done by the ecosystem's own tools:
1. f16/f32 GGUF with ``gguf.GGUFWriter`` (the ``gguf`` package of llama.cpp): tensor names
   from ``gguf.get_tensor_name_map``, merges and special ids from ``gguf.SpecialVocab``.
   llama.cpp's own ``convert_hf_to_gguf.py`` is not used because it ships in neither the
   ``gguf`` nor the ``llama-cpp-python`` wheel (only inside the llama-cpp-python sdist, with
   its ``conversion/`` package), so this module writes the layouts itself (Llama, Mistral,
   Qwen2/3, Gemma 1-3, Phi-3, GPT-NeoX; OPT has no llama.cpp architecture). The conventions
   it follows by hand are few and each is checked by llama.cpp's NLL in the tests: the Q/K
   row order of the llama arch (``_permute_qk``), GPT-NeoX's fused QKV rows
   (``_regroup_qkv``), Gemma's norm weights + 1 and Gemma2/3's positional sliding pattern.
2. Every other type (q8_0, q4_k_m, ...) with llama.cpp's ``llama_model_quantize`` through
   the ``llama-cpp-python`` bindings (optional extra ``llamacpp``): no private quantiser.

The check (``gguf_token_nll``) feeds llama.cpp the very token ids of
``evaluate.ppl_segments`` and reads its logits, so the GGUF and the HF model are scored on
the same segments; ``tokenizer_agreement`` checks that llama.cpp's own tokenizer gives the
same ids as the HF one (what generation from a text prompt relies on).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .artifacts import atomic_file
from .errors import unknown_name
from .gguf_layout import ARCHITECTURES, exportable_type, gguf_tensor_name
from .llamacpp_guard import check_gguf_runs, open_llama, quantize_in_child

__all__ = [
    "ARCHITECTURES",
    "WRITER_TYPES",
    "LLAMA_CPP_TYPES",
    "QUANT_TYPES",
    "IMATRIX_REQUIRED",
    "IMATRIX_UNUSED",
    "RELEASE_TYPES",
    "LLAMACPP_INSTALL",
    "llama_cpp_available",
    "gguf_tensor_name",
    "export_gguf",
    "quantize_gguf",
    "read_gguf_metadata",
    "load_gguf",
    "gguf_token_nll",
    "gguf_perplexity",
    "tokenizer_agreement",
    "gguf_generate",
    "hf_generate",
    "file_size_mb",
    "compare_formats",
]

LLAMACPP_INSTALL = 'pip install "shortened-llm[llamacpp]"  (builds llama.cpp from source: ~5 min on 2 cores)'
META_PREFIX = "shortened_llm"  # custom GGUF keys: shortened_llm.original_block_count, ...


# Types the gguf writer produces directly (no llama.cpp needed): name -> torch dtype of 2-D tensors
WRITER_TYPES: dict[str, torch.dtype] = {"f32": torch.float32, "f16": torch.float16}
# Types llama.cpp's quantiser produces from the f16 file: name -> llama_ftype constant in llama_cpp
LLAMA_CPP_TYPES: dict[str, str] = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
    # llama.cpp's own lossless-range 16-bit type, converted from the f16 file (bf16 -> f16 -> bf16 is exact
    # for the weights of a bf16 model, whose values f16 holds in its normal range)
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    # llama-quantize's aliases: Q3_K is Q3_K_M, Q4_K is Q4_K_M, Q5_K is Q5_K_M (the same file)
    "q3_k": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    # the "i-quants": non-linear grids fitted to an importance matrix (IMATRIX_REQUIRED)
    "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    "iq4_xs": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
    "iq3_m": "LLAMA_FTYPE_MOSTLY_IQ3_M",
    "iq3_s": "LLAMA_FTYPE_MOSTLY_IQ3_S",
    "iq3_xs": "LLAMA_FTYPE_MOSTLY_IQ3_XS",
}
QUANT_TYPES: tuple[str, ...] = (*WRITER_TYPES, *LLAMA_CPP_TYPES)
# Made only with an importance matrix (quantize_gguf(..., imatrix=)). llama.cpp itself refuses only
# its 1-2 bit types and IQ3_XXS without one; the IQ types here it would make, but they are designed
# around one, and the public GGUF releases of shortened models make them with one: so does this package.
IMATRIX_REQUIRED: frozenset[str] = frozenset(q for q in LLAMA_CPP_TYPES if q.startswith("iq"))
# Types whose quantiser has no use for an importance matrix (a straight conversion, or Q8_0's round-to-nearest)
IMATRIX_UNUSED: frozenset[str] = frozenset({"f32", "f16", "bf16", "q8_0"})
# The files of the public GGUF release of a CPT'd shortened Vicuna, in its order
RELEASE_TYPES: tuple[str, ...] = ("q2_k", "iq3_xs", "iq3_s", "q3_k_s", "iq3_m", "q3_k", "q3_k_m", "q3_k_l",
                                  "iq4_xs", "iq4_nl", "q4_0", "q4_k_s", "q4_k", "q4_k_m", "q4_1", "q5_0",
                                  "q5_k_s", "q5_k", "q5_k_m", "q5_1", "q6_k", "q8_0")

# llama.cpp's pre-tokenizer names for the HF byte-level BPE pre-tokenizers we recognise.
# Keyed by the shape of tokenizer.json's "pre_tokenizer" (see _pre_tokenizer_key); a tokenizer
# of another shape needs ``tokenizer_pre=`` (llama.cpp: LLAMA_VOCAB_PRE_TYPE_* names).
PRE_TOKENIZERS: dict[str, str] = {
    "ByteLevel(regex)": "gpt-2",  # GPT-2 regex (also what transformers rebuilds from a GGUF)
    "Digits(individual)+ByteLevel(regex)": "smollm",  # StarCoder / SmolLM: every digit alone
}


# ---- checks ---------------------------------------------------------------------------------

def llama_cpp_available() -> bool:
    """Whether the optional ``llama-cpp-python`` bindings import (quantisation and the check need them)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _require_llama_cpp(what: str):
    try:
        import llama_cpp
    except ImportError:
        raise ImportError(f"{what} needs llama.cpp's Python bindings: {LLAMACPP_INSTALL}") from None
    return llama_cpp


def _check_quant(quant: str) -> str:
    q = str(quant).lower()
    if q not in QUANT_TYPES:
        raise unknown_name("quant", q, QUANT_TYPES,
                           note=f" (f32/f16 need only the gguf package; the others llama.cpp: {LLAMACPP_INSTALL})")
    return q


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


def _check_out_file(out_file: Path, overwrite: bool) -> None:
    if out_file.exists() and not overwrite:
        raise FileExistsError(f"out_file={str(out_file)!r} already exists: pass overwrite=True (CLI: --overwrite)")
    if out_file.is_dir():
        raise IsADirectoryError(f"out_file={str(out_file)!r} is a directory: give a file name such as model-q8_0.gguf")
    parent = out_file.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"out_file={str(out_file)!r}: cannot create its folder ({err.strerror}); "
                              "choose a writable location, e.g. under your run_dir") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"out_file={str(out_file)!r}: folder {str(parent)!r} is not writable; "
                              "choose a writable location, e.g. under your run_dir")


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

    quant = _check_quant(quant)
    _check_imatrix_given(quant, imatrix)
    model_dir, out_file = Path(resolve_model_path(model_dir)), Path(out_file)  # an embedded name -> its cached dir
    _weight_files(model_dir)
    _check_out_file(out_file, overwrite)
    llama_cpp = _require_llama_cpp(f"quant={quant!r}") if quant in LLAMA_CPP_TYPES else None

    if llama_cpp is None:
        with atomic_file(out_file) as tmp:
            _write_float_gguf(model_dir, tmp, quant, tokenizer_pre, progress)
        return out_file
    with atomic_file(out_file.with_name(out_file.name + ".f16")) as tmp_f16:
        _write_float_gguf(model_dir, tmp_f16, "f16", tokenizer_pre, progress)
        quantize_gguf(tmp_f16, out_file, quant, overwrite=overwrite, nthread=nthread, imatrix=imatrix)
        tmp_f16.unlink()  # only a stepping stone
    return out_file


def _check_imatrix_given(quant: str, imatrix) -> None:
    if imatrix is None and quant in IMATRIX_REQUIRED:
        raise ValueError(f"quant={quant!r} needs an importance matrix (imatrix=PATH): the IQ types are fitted to the "
                         "mean squared activation of every input channel, and without it their few bits go to the "
                         "wrong weights. Make one from the calibration text with shortened_llm.imatrix: "
                         "save_imatrix(calibration_imatrix(model, tokenizer), 'imatrix.gguf') (or llama.cpp's "
                         "llama-imatrix), then pass imatrix='imatrix.gguf'; `shortened-llm export quant-table` "
                         "makes one itself")


def quantize_gguf(src_file: str | os.PathLike, out_file: str | os.PathLike, quant: str, overwrite: bool = False,
                  nthread: int | None = None, verbose: bool = False, imatrix: str | os.PathLike | None = None) -> Path:
    """llama.cpp's own quantiser (``llama_model_quantize``) from an f16/f32 GGUF to ``quant``.

    Metadata (block counts, the pruning record, the tokenizer) is copied by llama.cpp. Use it
    to make several types from one ``export_gguf(..., quant="f16")`` file without re-writing it.
    ``imatrix``: an importance matrix file (``imatrix.save_imatrix``, or llama-imatrix's GGUF),
    required for the IQ types (``IMATRIX_REQUIRED``), optional for the others; it must have been
    measured on this very model (``imatrix.check_imatrix_fits``), and its name, dataset and chunk
    count go into the output's ``quantize.imatrix.*`` keys as llama-quantize writes them.
    ``verbose=True`` shows llama.cpp's per-tensor log (e.g. K-quant fallbacks for widths that
    are not a multiple of 256, like SmolLM2's 576); otherwise only its errors.
    """
    quant = _check_quant(quant)
    if quant not in LLAMA_CPP_TYPES:
        raise ValueError(f"quant={quant!r} is written by export_gguf, not quantised: use one of {', '.join(LLAMA_CPP_TYPES)}")
    _check_imatrix_given(quant, imatrix)
    _require_llama_cpp(f"quant={quant!r}")
    src_file, out_file = Path(src_file), Path(out_file)
    if not src_file.is_file():
        raise FileNotFoundError(f"src_file={str(src_file)!r} does not exist: write it with export_gguf(..., quant='f16')")
    if imatrix is not None:
        from .imatrix import check_imatrix_fits

        check_imatrix_fits(imatrix, src_file)
    _check_out_file(out_file, overwrite)
    with atomic_file(out_file) as tmp:  # in a child process: a crash in llama.cpp is an error here, not a dead kernel
        quantize_in_child(src_file, tmp, LLAMA_CPP_TYPES[quant], nthread or torch.get_num_threads(), verbose=verbose,
                          imatrix=imatrix)
    return out_file


def read_gguf_metadata(gguf_file: str | os.PathLike) -> dict:
    """The architecture, block counts and pruning record stored in a GGUF (read with ``gguf.GGUFReader``).

    The pure-Python reader parses every field, the 49k-entry vocabulary included: ~6 s for the
    embedded model. Where a loaded ``llama_cpp.Llama`` is at hand, its ``metadata`` is instant.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))

    def value(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = value("general.architecture")
    types = sorted({t.tensor_type.name for t in reader.tensors})
    return {
        "architecture": arch,
        "block_count": value(f"{arch}.block_count"),
        "original_block_count": value(f"{META_PREFIX}.original_block_count"),
        "removed_blocks": list(value(f"{META_PREFIX}.removed_blocks", [])),
        "criterion": value(f"{META_PREFIX}.criterion"),
        "file_type": value("general.file_type"),
        "tensor_types": types,
        "tokenizer_pre": value("tokenizer.ggml.pre"),
    }


def file_size_mb(path: str | os.PathLike) -> float:
    """Size on disk in MB (10^6 bytes); a directory counts its weight files."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in _weight_files(path)) / 1e6
    return path.stat().st_size / 1e6


# ---- public: the check in llama.cpp ---------------------------------------------------------

def load_gguf(gguf_file: str | os.PathLike, n_ctx: int = 512, logits_all: bool = True, n_threads: int | None = None,
              seed: int = 0):
    """A ``llama_cpp.Llama`` on ``gguf_file`` (CPU), keeping the logits of every position for PPL.

    ``n_threads`` defaults to torch's thread count (``OMP_NUM_THREADS`` / ``torch.set_num_threads``),
    not to every core: llama.cpp's threads spin at each barrier, so on a machine where other
    processes (a second test worker, a sweep) hold cores, using all of them runs many times slower.
    It also sets ``n_threads_batch``, the threads of prompt (batch) evaluation, which is all a
    PPL pass does: llama-cpp-python would otherwise give it every core. With one other process
    busy on a 2-core machine that made scoring 3-6x slower (7.6 / 4.4 s vs 1.3 s per 128-token
    segment).

    The file is first run on a few tokens in a child process (``llamacpp_guard.check_gguf_runs``,
    once per file): where this llama.cpp build cannot run on this CPU, that raises
    ``LlamaCppCrash`` with the fix, instead of a SIGILL that kills the notebook kernel.
    """
    _require_llama_cpp("loading a GGUF")
    if not Path(gguf_file).is_file():
        raise FileNotFoundError(f"gguf_file={str(gguf_file)!r} does not exist: write it with export_gguf first")
    threads = n_threads or torch.get_num_threads()
    check_gguf_runs(gguf_file, threads)
    return open_llama(gguf_file, n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all,
                      n_threads=threads, n_threads_batch=threads, seed=seed, verbose=False)


def gguf_token_nll(llm, input_ids: torch.Tensor, progress: bool | str = False) -> torch.Tensor:
    """NLL of every predicted token under llama.cpp: ``(n, T)`` ids -> ``(n * (T - 1),)``, like ``evaluate.token_nll``.

    Each segment is evaluated from an empty context, as the HF model sees it; llama.cpp's
    logits of positions 0..T-2 score tokens 1..T-1.
    """
    n, T = input_ids.shape
    if T > llm.n_ctx():
        raise ValueError(f"segments of {T} tokens exceed the context n_ctx={llm.n_ctx()}: load_gguf(..., n_ctx>={T})")
    rows = range(n)
    if progress:
        rows = tqdm(rows, desc=progress if isinstance(progress, str) else "llama.cpp NLL", unit="seg")
    losses = []
    for i in rows:
        ids = input_ids[i]
        llm.reset()
        llm.eval(ids.tolist())
        logits = torch.from_numpy(llm.scores[: T - 1].copy())  # (T-1, V)
        losses.append(F.cross_entropy(logits.float(), ids[1:], reduction="none"))
    return torch.cat(losses)


def gguf_perplexity(llm, input_ids: torch.Tensor, progress: bool | str = False) -> float:
    """exp(mean NLL) over ``input_ids`` (from ``evaluate.ppl_segments``): the paper's protocol in llama.cpp."""
    return math.exp(gguf_token_nll(llm, input_ids, progress).double().mean().item())


def tokenizer_agreement(llm, tokenizer, texts: Sequence[str]) -> dict:
    """Do llama.cpp and HF tokenise ``texts`` to the same ids, and do both decode them back?

    Returns counts (``ids_equal``, ``roundtrip_equal`` out of ``texts``) and the first
    mismatch, so a wrong pre-tokenizer shows up before anyone trusts a generation.
    """
    ids_equal = roundtrip = 0
    first = None
    for text in texts:
        hf = tokenizer(text, add_special_tokens=False).input_ids
        lc = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        back = llm.detokenize(hf).decode("utf-8", errors="replace")
        ids_equal += hf == lc
        roundtrip += back == tokenizer.decode(hf)
        if first is None and (hf != lc or back != tokenizer.decode(hf)):
            k = next((j for j, (a, b) in enumerate(zip(hf, lc)) if a != b), min(len(hf), len(lc)))
            first = {"text": text[:80], "position": k, "hf": hf[k : k + 5], "llama_cpp": lc[k : k + 5]}
    return {"texts": len(texts), "ids_equal": ids_equal, "roundtrip_equal": roundtrip, "first_mismatch": first}


def gguf_generate(llm, prompt_ids: Sequence[int], max_new_tokens: int = 32) -> str:
    """Greedy continuation of the token ids ``prompt_ids`` in llama.cpp (same ids as ``hf_generate`` gets)."""
    llm.reset()
    out = llm.create_completion(list(map(int, prompt_ids)), max_tokens=max_new_tokens, temperature=0.0, top_k=1,
                                repeat_penalty=1.0, seed=0)
    return out["choices"][0]["text"]


@torch.no_grad()
def hf_generate(model, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int = 32) -> str:
    """Greedy continuation in transformers, decoded without the prompt: the reference for ``gguf_generate``."""
    ids = torch.tensor([list(prompt_ids)], device=next(model.parameters()).device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def compare_formats(model_dir: str | os.PathLike, out_dir: str | os.PathLike, quants: Sequence[str] = ("f16", "q8_0", "q4_k_m"),
                    label: str | None = None, dataset: str = "wikitext2", seq_len: int = 128,
                    max_segments: int | None = None, batch_size: int = 8, progress: bool = True) -> list[dict]:
    """One row per format of one model: the HF model, then each GGUF, on the same PPL segments.

    GGUF files are ``out_dir/<label>-<quant>.gguf``, reused when already there (train-or-load);
    every quantised type is made from ``<label>-f16.gguf``.
    Columns: model, format, size_mb, ppl, ppl_change_pct (vs HF), block_count. Without
    llama.cpp the GGUF rows have ``ppl=None`` (only f32/f16 can be written then).
    """
    from .evaluate import default_bos, ppl_segments, token_nll
    from .models import resolve_model_path, load_model, num_blocks

    model_dir = Path(resolve_model_path(model_dir))
    label = label or model_dir.name
    model, tokenizer = load_model(model_dir)
    segments = ppl_segments(tokenizer, dataset, seq_len, default_bos(model), max_segments)
    hf_ppl = math.exp(token_nll(model, segments, batch_size, progress=f"{label} HF" if progress else False)
                      .double().mean().item())
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
            ppl = gguf_perplexity(llm, segments, progress=f"{label} {quant}" if progress else False)
            meta = llm.metadata  # llama.cpp's parsed header: instant, where gguf.GGUFReader takes seconds
            blocks = int(meta[f"{meta['general.architecture']}.block_count"])
            del llm
        else:
            blocks = read_gguf_metadata(path)["block_count"]
        rows.append({"model": label, "format": f"GGUF {quant}", "size_mb": file_size_mb(path), "ppl": ppl,
                     "ppl_change_pct": None if ppl is None else 100 * (ppl / hf_ppl - 1),
                     "block_count": blocks, "segments": len(segments)})
    return rows
