"""How each Hugging Face family is laid out in a GGUF: llama.cpp's architecture and tensor names.

The ground floor of the GGUF side: ``export.py`` writes files with it and ``imatrix.py`` names
its statistics with it, so neither imports the other for names. Imports nothing of the package.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = ["GgufArch", "ARCHITECTURES", "exportable_type", "tensor_name_map", "gguf_tensor_name"]


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
                         f"{', '.join(sorted(ARCHITECTURES))} (add an entry to shortened_llm.export.ARCHITECTURES)")
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
