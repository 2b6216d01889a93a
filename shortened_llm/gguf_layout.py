"""How a model is laid out in a GGUF: llama.cpp's architecture and tensor names per family, and the file types.

The ground floor of the GGUF side: ``export.py`` writes files with it, ``llamacpp.py`` quantises
to its types and ``imatrix.py`` names its statistics with it, so none of them imports another
for names or types. Imports nothing of the package.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["GgufArch", "ARCHITECTURES", "exportable_type", "tensor_name_map", "gguf_tensor_name",
           "WRITER_TYPES", "LLAMA_CPP_TYPES", "QUANT_TYPES", "IMATRIX_REQUIRED", "IMATRIX_UNUSED", "RELEASE_TYPES"]

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


@dataclass(frozen=True)
class GgufArch:
    """How a Hugging Face family maps onto a llama.cpp architecture."""

    arch: str  # llama.cpp architecture name (gguf.MODEL_ARCH_NAMES value)
    # HF applies RoPE to the two halves of a head (rotate_half); llama.cpp's llama arch to
    # interleaved pairs, so the rows of q_proj and k_proj are reordered on export.
    permute_qk: bool = True
    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's by w, so its norm weights are stored + 1
    norm_plus_one: bool = False
    # GPT-NeoX's fused query_key_value holds [q, k, v] per head; llama.cpp reads all of q,
    # then all of k, then all of v, so the rows are regrouped on export.
    qkv_per_head: bool = False
    # llama.cpp fixes Gemma2/3's sliding/global pattern by position: block i slides iff
    # i % swa_period < swa_period - 1. A pruned model must still have that pattern.
    swa_period: int = 0


# Keyed by config.model_type, like models.FAMILIES. Mistral is a Llama in llama.cpp. The
# sliding window of Mistral and Phi-3 (one window on every block) is not exported: llama.cpp's
# llama and phi3 archs attend to the whole context (measured: with a window of 8, llama.cpp's
# NLL leaves HF's at the 9th token whatever window the GGUF states), so the two agree up to
# ``sliding_window`` tokens and ``export_gguf`` warns when the window is shorter than the context.
ARCHITECTURES: dict[str, GgufArch] = {
    "llama": GgufArch("llama"),
    "mistral": GgufArch("llama"),
    # Qwen rotates the two halves of a head in HF and in llama.cpp (NEOX RoPE): no reordering;
    # Qwen2's q/k/v biases and Qwen3's per-head q/k norms map by name like the weights.
    "qwen2": GgufArch("qwen2", permute_qk=False),
    "qwen3": GgufArch("qwen3", permute_qk=False),
    "gemma": GgufArch("gemma", permute_qk=False, norm_plus_one=True),
    # Gemma2/3: sliding and global blocks alternate in a pattern llama.cpp derives from the block
    # index (see swa_period); soft-capping, the window and the local RoPE base go in the metadata.
    "gemma2": GgufArch("gemma2", permute_qk=False, norm_plus_one=True, swa_period=2),
    "gemma3_text": GgufArch("gemma3", permute_qk=False, norm_plus_one=True, swa_period=6),
    # Phi-3's fused qkv_proj ([q | k | v]) and gate_up_proj ([gate | up]) are what llama.cpp's
    # phi3 arch reads as attn_qkv and ffn_up; NEOX RoPE like HF.
    "phi3": GgufArch("phi3", permute_qk=False),
    # LayerNorm with biases, partial rotary, parallel residual: all read from the config.
    "gpt_neox": GgufArch("gptneox", permute_qk=False, qkv_per_head=True),
}


def exportable_type(config) -> str:
    """``config.model_type``, refused with the list of supported ones when llama.cpp has no layout for it here."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type={model_type!r} cannot be exported to GGUF yet. Supported: "
                         f"{', '.join(sorted(ARCHITECTURES))} (add an entry to shortened_llm.gguf_layout.ARCHITECTURES)")
    return model_type


@functools.lru_cache(maxsize=8)
def tensor_name_map(arch: str, n_blocks: int):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_blocks)


def gguf_tensor_name(config, hf_name: str) -> str | None:
    """The GGUF tensor name ``export_gguf`` writes the state-dict entry ``hf_name`` of a ``config`` model under.

    ``None`` for what the file leaves out (RoPE's ``inv_freq``, which llama.cpp recomputes; a
    tied LM head, which is ``token_embd``), ``""`` for a tensor llama.cpp has no name for. The
    writer (``export.py``) and the importance matrix (``imatrix.py``) both name tensors through this one map.
    """
    model_type = exportable_type(config)
    if hf_name.endswith("rotary_emb.inv_freq") or (getattr(config, "tie_word_embeddings", False)
                                                   and hf_name == "lm_head.weight"):
        return None
    names = tensor_name_map(ARCHITECTURES[model_type].arch, config.num_hidden_layers)
    return names.get_name(hf_name, try_suffixes=(".weight", ".bias")) or ""
