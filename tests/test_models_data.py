"""Loading models by name or directory, datasets by name, calibration sampling."""
import pytest
import torch

from shortened_llm import calibration_batches, load_model, load_texts
from shortened_llm.data import load_records


def test_embedded_model_is_smollm2(embedded):
    model, tokenizer = embedded
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.bos_token_id is not None


def test_unknown_model_name_says_how_to_name_one():
    with pytest.raises(ValueError, match="Unknown model 'smollm-135m'.*smollm2-135m"):
        load_model("smollm-135m")


def test_directory_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_model(tmp_path)


def test_unsupported_family_lists_supported_ones(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Supported: .*llama"):
        load_model(tmp_path)


def test_paper_text_datasets_load_from_the_pack():
    wiki = load_texts("wikitext2")
    assert len(wiki) == 4358 and wiki[0] == "" and wiki[1].startswith(" = Robert Boulter")
    ptb = load_texts("ptb")
    assert len(ptb) == 3370 and ptb[0] == ptb[0].strip()
    assert len(load_records("alpaca")) == 1000


def test_unknown_dataset_suggests_a_name():
    with pytest.raises(ValueError, match="Did you mean 'wikitext2'"):
        load_texts("wikitext")


def test_missing_dataset_names_both_ways_to_get_it(monkeypatch, tmp_path):
    from shortened_llm import data

    monkeypatch.setenv("SHORTENED_LLM_DATA", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data._load.cache_clear()
    with pytest.raises(FileNotFoundError, match="SHORTENED_LLM_DATA|wikitext-2-raw-v1") as err:
        load_texts("wikitext2")
    assert "wikitext-2-raw-v1" in str(err.value) and "SHORTENED_LLM_DATA" in str(err.value)
    data._load.cache_clear()


def test_calibration_is_the_papers_shape_and_deterministic(embedded):
    _, tokenizer = embedded
    a = calibration_batches(tokenizer)
    assert a.shape == (10, 128) and a.dtype == torch.long
    assert torch.equal(a, calibration_batches(tokenizer))
    assert not torch.equal(a, calibration_batches(tokenizer, seed=1))
    assert len({tuple(row.tolist()) for row in a}) == 10


def test_calibration_with_bos_on_every_sample(embedded):
    _, tokenizer = embedded
    ids = calibration_batches(tokenizer, n_samples=3, seq_len=16, bos_every=True)
    assert ids.shape == (3, 16) and (ids[:, 0] == tokenizer.bos_token_id).all()


@pytest.mark.parametrize("kwargs, match", [({"n_samples": 0}, "n_samples=0 must be >= 1"),
                                           ({"seq_len": 1}, "seq_len=1 >= 2")])
def test_calibration_rejects_empty_budgets(embedded, kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibration_batches(embedded[1], **kwargs)


def test_a_corpus_is_encoded_once_per_tokenizer_content_and_equals_a_fresh_encoding(tmp_path):
    """Two tokenizer objects loaded from two saved copies (a dense model and one pruned from it) share
    one encoding; a tokenizer that encodes differently (an added token, BOS first) gets its own."""
    from transformers import AutoTokenizer

    from conftest import make_char_tokenizer
    from shortened_llm.data import encoded_once, tokenizer_key

    calls = []

    @encoded_once(maxsize=4)
    def encode(tokenizer, texts):
        calls.append(texts)
        return [tokenizer(t).input_ids for t in texts]

    make_char_tokenizer().save_pretrained(tmp_path / "a")
    make_char_tokenizer().save_pretrained(tmp_path / "b")
    a, b = AutoTokenizer.from_pretrained(tmp_path / "a"), AutoTokenizer.from_pretrained(tmp_path / "b")
    texts = ("ab c", "de")
    assert encode(a, texts) == encode(b, texts) == [make_char_tokenizer()(t).input_ids for t in texts]
    assert len(calls) == 1 and tokenizer_key(a) == tokenizer_key(b)

    bos = make_char_tokenizer(bos_first=True)
    assert encode(bos, texts)[0][0] == bos.bos_token_id and len(calls) == 2
    a.add_tokens(["ab"])  # the same object, now encoding "ab" as one token
    assert encode(a, texts)[0] == [len(a) - 1, *make_char_tokenizer()(" c").input_ids] and len(calls) == 3
    encode(b, ("other",))
    assert len(calls) == 4


def test_packed_blocks_and_ppl_segments_are_shared_encodings_that_callers_cannot_spoil(embedded):
    from shortened_llm.evaluate import ppl_segments
    from shortened_llm.trainer import pack_blocks

    tok = embedded[1]
    texts = ["one two three", "four five six seven"]
    first = pack_blocks(tok, texts, block_size=3)
    first.zero_()  # a caller changing its blocks in place
    again = pack_blocks(tok, texts, block_size=3)
    eos = tok.eos_token_id
    flat = [t for text in texts for t in tok(text).input_ids + [eos]]
    assert again.flatten().tolist() == flat[: len(flat) // 3 * 3]
    from shortened_llm.data import load_texts

    stream = tok("\n\n".join(load_texts("wikitext2")[:40]), add_special_tokens=False).input_ids
    for bos in ("once", "per-segment"):
        ppl_segments(tok, "wikitext2", seq_len=16, bos=bos, max_segments=2).zero_()
    assert ppl_segments(tok, "wikitext2", seq_len=16, max_segments=2).flatten().tolist() == [tok.bos_token_id, *stream[:31]]
