"""The paper's perplexity protocol: segments, BOS handling, and the number itself."""
import math

import pytest
import torch

from shortened_llm import perplexity, remove_blocks
from shortened_llm.evaluate import ppl_segments, token_nll


def test_segments_once_puts_one_bos_before_the_text(embedded):
    tok = embedded[1]
    seg = ppl_segments(tok, "wikitext2", seq_len=128, bos="once")
    stream = tok("\n\n".join(__import__("shortened_llm").load_texts("wikitext2")), add_special_tokens=False).input_ids
    assert seg.shape == ((len(stream) + 1) // 128, 128)
    assert seg[0, 0] == tok.bos_token_id and (seg[1:, 0] != tok.bos_token_id).any()
    assert seg[0, 1:].tolist() == stream[:127] and seg[1].tolist() == stream[127:255]


def test_segments_per_segment_bos(embedded):
    tok = embedded[1]
    seg = ppl_segments(tok, "ptb", seq_len=64, bos="per-segment", max_segments=5)
    assert seg.shape == (5, 65) and (seg[:, 0] == tok.bos_token_id).all()


@pytest.mark.parametrize("kwargs, match", [({"dataset": "wiki"}, "Unknown perplexity dataset 'wiki'"),
                                           ({"seq_len": 1}, "seq_len=1 must be >= 2"),
                                           ({"bos": "twice"}, "bos='twice' must be"),
                                           ({"max_segments": 0}, "max_segments=0 must be >= 1")])
def test_bad_ppl_arguments(embedded, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ppl_segments(embedded[1], **kwargs)


def test_perplexity_is_exp_of_mean_token_nll(embedded):
    model, tok = embedded
    ppl = perplexity(model, tok, "wikitext2", max_segments=4, batch_size=3, progress=False)
    seg = ppl_segments(tok, "wikitext2", max_segments=4)
    with torch.no_grad():
        out = model(seg, labels=seg)  # HF's own mean-NLL over the same tokens
    assert math.isclose(ppl, math.exp(out.loss.item()), rel_tol=1e-4)
    assert 5 < ppl < 200


@pytest.mark.integration
def test_perplexity_of_a_saved_model_is_exp_of_its_token_nll(tiny_llama_dir):
    from shortened_llm import load_model

    model, tok = load_model(tiny_llama_dir, device="cpu")
    dense = perplexity(model, tok, "wikitext2", max_segments=2, progress=False)
    nll = token_nll(model, ppl_segments(tok, max_segments=2))
    assert math.isclose(dense, math.exp(nll.double().mean().item()), rel_tol=1e-9)


@pytest.mark.integration
def test_pruning_hurts_perplexity(embedded):
    """The paper's premise on a trained model: removing blocks raises PPL (SmolLM2, 3 middle blocks: ~1.5x)."""
    import copy

    model, tok = embedded
    dense = perplexity(model, tok, "wikitext2", max_segments=2, progress=False)
    pruned = perplexity(remove_blocks(copy.deepcopy(model), [12, 13, 14]), tok, "wikitext2", max_segments=2,
                        progress=False)
    assert pruned > 1.2 * dense


@pytest.mark.integration
def test_a_cached_perplexity_is_the_measured_one_bit_for_bit(tiny_llama_dir, tmp_path):
    """The evaluation cache stores the float it measured: a reader gets exactly what a fresh run gives."""
    from shortened_llm import load_model

    model, tok = load_model(tiny_llama_dir, device="cpu")
    fresh = perplexity(model, tok, "wikitext2", max_segments=2, progress=False, cache=False)
    stored = perplexity(model, tok, "wikitext2", max_segments=2, progress=False, cache=tmp_path)
    read = perplexity(model, tok, "wikitext2", max_segments=2, progress=False, cache=tmp_path)
    assert fresh == stored == read and len(list(tmp_path.glob("ppl-*.json"))) == 1
