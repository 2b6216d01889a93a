"""The importance matrix (against a direct computation, through its file and llama.cpp's reader), the IQ
types and the imatrix in quantize_gguf, and the size/quality/speed table of every release type."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shortened_llm.imatrix import check_imatrix_fits, compute_imatrix, load_imatrix, save_imatrix
from shortened_llm.models import save_model, tiny_random_model


@pytest.fixture(scope="module")
def tokenizer(embedded):
    return embedded[1]


def _tiny(tokenizer, width: int = 32, layers: int = 3, seed: int = 0, **overrides):
    """A tiny random Llama on the embedded tokenizer; ``width`` 256 lets the 256-block types (K, IQ) really run."""
    extra = {"hidden_size": width, "intermediate_size": 2 * width, "num_attention_heads": 4, "num_key_value_heads": 2}
    return tiny_random_model("llama", num_layers=layers, tokenizer=tokenizer, seed=seed, **{**extra, **overrides})


@torch.no_grad()
def _direct_sums(model, ids) -> dict:
    """Sum of squared inputs of every weight, from the model's hidden states and attention maps, written out."""
    out = model(ids, output_hidden_states=True, output_attentions=True, use_cache=False)
    cfg = model.config
    B, T = ids.shape
    H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    sq = lambda x: x.double().square().reshape(-1, x.shape[-1]).sum(0)  # noqa: E731
    sums = {}
    for i, layer in enumerate(model.model.layers):
        h = out.hidden_states[i]  # (B, T, C): the block's input
        x = layer.input_layernorm(h)
        for name in ("attn_q", "attn_k", "attn_v"):
            sums[f"blk.{i}.{name}.weight"] = sq(x)
        v = layer.self_attn.v_proj(x).view(B, T, Hkv, d).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
        heads = (out.attentions[i] @ v).transpose(1, 2).reshape(B, T, H * d)  # (B, T, H*d): o_proj's input
        sums[f"blk.{i}.attn_output.weight"] = sq(heads)
        mid = h + layer.self_attn.o_proj(heads)
        x2 = layer.post_attention_layernorm(mid)
        sums[f"blk.{i}.ffn_gate.weight"] = sums[f"blk.{i}.ffn_up.weight"] = sq(x2)
        act = layer.mlp.act_fn(layer.mlp.gate_proj(x2)) * layer.mlp.up_proj(x2)
        sums[f"blk.{i}.ffn_down.weight"] = sq(act)
        if i + 1 < len(model.model.layers):  # the written-out block is the model's block
            torch.testing.assert_close(mid + layer.mlp.down_proj(act), out.hidden_states[i + 1])
    sums["output.weight"] = sq(out.hidden_states[-1])  # after the final norm: the LM head's input
    return sums


@pytest.mark.parametrize("tied", [False, True])
def test_imatrix_equals_a_direct_computation(tokenizer, tied):
    model = _tiny(tokenizer, tie_word_embeddings=tied, attn_implementation="eager")
    ids = torch.randint(3, len(tokenizer), (3, 16), generator=torch.Generator().manual_seed(0))
    imatrix = compute_imatrix(model, ids, batch_size=2)
    direct = _direct_sums(model, ids)
    if tied:  # the LM head is token_embd in the file: a lookup with no input to measure
        direct.pop("output.weight")
    assert sorted(imatrix.sums) == sorted(direct)
    for name, expected in direct.items():
        torch.testing.assert_close(imatrix.sums[name].double().flatten(), expected, rtol=1e-5, atol=1e-6)
        assert imatrix.counts[name].tolist() == [3 * 16]
    assert (imatrix.chunk_count, imatrix.chunk_size) == (3, 16)
    torch.testing.assert_close(imatrix.mean("blk.0.ffn_down.weight"), (direct["blk.0.ffn_down.weight"] / 48).float())


def test_imatrix_file_round_trip_and_llama_cpp_layout(tokenizer, tmp_path):
    from gguf import GGUFReader

    from shortened_llm import remove_blocks

    model = _tiny(tokenizer, layers=4)
    remove_blocks(model, [1])
    imatrix = compute_imatrix(model, torch.randint(3, 500, (2, 8)), datasets=["some text"])
    path = save_imatrix(imatrix, tmp_path / "imatrix.gguf")
    back = load_imatrix(path)
    assert sorted(back.sums) == sorted(imatrix.sums) and len(back) == 3 * 7 + 1
    for name in imatrix.sums:
        assert torch.equal(back.sums[name], imatrix.sums[name]) and torch.equal(back.counts[name], imatrix.counts[name])
    assert (back.chunk_count, back.chunk_size, back.datasets) == (2, 8, ["some text"])
    assert back.model == {"block_count": 3, "original_block_count": 4, "removed_blocks": [1]}
    reader = GGUFReader(str(path))  # the layout llama-imatrix writes and common_imatrix_load reads
    assert reader.fields["general.type"].contents() == "imatrix"
    shapes = {t.name: (list(t.shape), t.tensor_type.name) for t in reader.tensors}
    assert shapes["blk.0.ffn_down.weight.in_sum2"] == ([64, 1], "F32")  # ggml (n_in, n_mat)
    assert shapes["blk.0.ffn_down.weight.counts"] == ([1, 1], "F32")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_imatrix(imatrix, path)


def test_llama_cpp_reads_the_imatrix_file_as_its_own(tokenizer, tmp_path):
    """The quantising child reads the file with ggml's GGUF parser (as common_imatrix_load) and gets mean = sum / count."""
    pytest.importorskip("llama_cpp")
    from shortened_llm.llamacpp_guard import _read_imatrix

    imatrix = compute_imatrix(_tiny(tokenizer), torch.randint(3, 500, (2, 8)), datasets=["x"])
    means, dataset, chunks = _read_imatrix(str(save_imatrix(imatrix, tmp_path / "imatrix.gguf")))
    assert (dataset, chunks) == ("x", 2) and sorted(means) == sorted(imatrix.sums)
    for name, mean in means.items():
        torch.testing.assert_close(torch.tensor(mean), imatrix.mean(name))


def _f16(model, tokenizer, path):
    from shortened_llm.export import export_gguf

    return export_gguf(save_model(model, tokenizer, path), path.with_suffix(".gguf"), "f16", progress=False)


@pytest.mark.parametrize("model_type", ["gemma2", "gpt_neox", "phi3", "qwen3"])
def test_the_imatrix_names_every_family_s_weights_as_the_gguf_does(model_type, tokenizer, tmp_path):
    """Fused QKV (Phi-3, GPT-NeoX), fused gate/up (Phi-3), q/k norms (Qwen3): one name map for file and imatrix."""
    from shortened_llm.gguf_layout import ARCHITECTURES
    from shortened_llm.models import get_blocks

    assert model_type in ARCHITECTURES
    extra = {"phi3": {"sliding_window": None}, "qwen3": {"use_sliding_window": False}}.get(model_type, {})
    model = tiny_random_model(model_type, num_layers=2, tokenizer=tokenizer, **extra)
    gguf_file = _f16(model, tokenizer, tmp_path / model_type)
    imatrix = check_imatrix_fits(compute_imatrix(model, torch.randint(3, 500, (1, 8))), gguf_file)
    linears = [m for m in get_blocks(model)[0].modules() if isinstance(m, torch.nn.Linear)]
    assert len([n for n in imatrix.sums if n.startswith("blk.0.")]) == len(linears)  # every one, none twice


def test_an_imatrix_of_another_model_is_refused(tokenizer, tmp_path):
    from shortened_llm import remove_blocks

    ids = torch.randint(3, 500, (2, 8))

    def pruned(removed, width=32, layers=4):
        model = _tiny(tokenizer, width=width, layers=layers)
        remove_blocks(model, removed) if removed else None
        return model

    gguf_file = _f16(pruned([1]), tokenizer, tmp_path / "pruned-1")
    assert len(check_imatrix_fits(compute_imatrix(pruned([1]), ids), gguf_file)) == 3 * 7 + 1
    with pytest.raises(ValueError, match=r"entries for weights that model lacks \(blk\.3\..*4 blocks, this one has 3"):
        check_imatrix_fits(compute_imatrix(pruned([]), ids), gguf_file)  # the dense model's
    with pytest.raises(ValueError, match=r"no entry for blk\.2\..*2 blocks, this one has 3"):
        check_imatrix_fits(compute_imatrix(pruned([1, 2]), ids), gguf_file)
    with pytest.raises(ValueError, match=r"differ in width, e.g. blk\.0\.attn_k\.weight has 64 input channels in the "
                                         r"importance matrix and 32 in the model"):
        check_imatrix_fits(compute_imatrix(pruned([1], width=64), ids), gguf_file)
    with pytest.raises(ValueError, match=r"blocks \[2\] of 4 removed, this GGUF has blocks \[1\] of 4 removed"):
        check_imatrix_fits(compute_imatrix(pruned([2]), ids), gguf_file)  # same names and sizes, other blocks
    with pytest.raises(ValueError, match="not an importance matrix"):
        check_imatrix_fits(gguf_file, gguf_file)


# ---- quantize_gguf with an importance matrix ------------------------------------------------

@pytest.fixture(scope="module")
def wide(tmp_path_factory, tokenizer):
    """A 2-block random Llama of width 256 (K and IQ blocks of 256 fit), its f16 GGUF and its importance matrix."""
    from shortened_llm.imatrix import calibration_imatrix

    model = _tiny(tokenizer, width=256, layers=2, seed=1, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("wide")
    f16 = _f16(model, tokenizer, folder / "wide")
    imatrix = save_imatrix(calibration_imatrix(model, tokenizer, n_samples=8, seq_len=64), folder / "imatrix.gguf")
    return f16, imatrix


@pytest.fixture(scope="module")
def segments(tokenizer):
    from shortened_llm.evaluate import ppl_segments

    return ppl_segments(tokenizer, "wikitext2", seq_len=32, max_segments=3)


def test_iq_types_refuse_to_run_without_an_imatrix(wide, tmp_path, tiny_llama_dir):
    from shortened_llm.export import export_gguf
    from shortened_llm.gguf_layout import IMATRIX_REQUIRED
    from shortened_llm.llamacpp import quantize_gguf

    assert IMATRIX_REQUIRED == {"iq3_xs", "iq3_s", "iq3_m", "iq4_xs", "iq4_nl"}
    with pytest.raises(ValueError, match=r"quant='iq4_xs' needs an importance matrix \(imatrix=PATH\).*calibration_imatrix"):
        quantize_gguf(wide[0], tmp_path / "x.gguf", "IQ4_XS")
    with pytest.raises(ValueError, match="quant='iq3_m' needs an importance matrix"):
        export_gguf(tiny_llama_dir, tmp_path / "y.gguf", "iq3_m")
    assert not list(tmp_path.iterdir())


def test_iq4_xs_with_an_imatrix_loads_and_stays_close_to_f16(wide, tmp_path, segments):
    pytest.importorskip("llama_cpp")
    from shortened_llm.export import read_gguf_metadata
    from shortened_llm.llamacpp import gguf_token_nll, load_gguf, quantize_gguf

    f16, imatrix = wide
    out = quantize_gguf(f16, tmp_path / "iq4_xs.gguf", "iq4_xs", imatrix=imatrix)
    assert "IQ4_XS" in read_gguf_metadata(out)["tensor_types"]  # real IQ4_XS blocks, not only fallbacks
    ref = gguf_token_nll(load_gguf(f16, n_ctx=64), segments)
    nll = gguf_token_nll(load_gguf(out, n_ctx=64), segments)
    assert abs(nll.mean() - ref.mean()) < 0.01 * ref.mean()
    # per token, not only on average: a file of zeros would score ln(V) on every token
    assert torch.corrcoef(torch.stack([nll, ref]))[0, 1] > 0.95

    from gguf import GGUFReader

    fields = GGUFReader(str(out)).fields  # what llama-quantize records of the imatrix
    assert fields["quantize.imatrix.file"].contents() == "imatrix.gguf"
    assert fields["quantize.imatrix.entries_count"].contents() == 2 * 7
    assert fields["quantize.imatrix.chunks_count"].contents() == 8
    assert fields["quantize.imatrix.dataset"].contents().startswith("bookcorpus")


def test_an_imatrix_changes_a_k_quant_file(wide, tmp_path):
    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader

    from shortened_llm.llamacpp import quantize_gguf

    f16, imatrix = wide
    plain = GGUFReader(str(quantize_gguf(f16, tmp_path / "plain.gguf", "q4_k_m")))
    weighted = GGUFReader(str(quantize_gguf(f16, tmp_path / "weighted.gguf", "q4_k_m", imatrix=imatrix)))
    a, b = ({t.name: t for t in r.tensors} for r in (plain, weighted))
    assert {n: t.tensor_type for n, t in a.items()} == {n: t.tensor_type for n, t in b.items()}  # same types
    assert a["blk.0.ffn_down.weight"].tensor_type.name in ("Q4_K", "Q6_K", "Q5_K")
    changed = [n for n in a if n.startswith("blk.") and a[n].data.tobytes() != b[n].data.tobytes()]
    assert len(changed) == 2 * 7  # every weight the imatrix covers, rounded differently; norms untouched
    assert "quantize.imatrix.file" not in plain.fields


def test_a_wrong_imatrix_is_refused_before_llama_cpp_and_a_failing_one_is_one_line(wide, tmp_path, tokenizer):
    pytest.importorskip("llama_cpp")
    from shortened_llm.llamacpp import quantize_gguf

    f16, imatrix = wide
    other = save_imatrix(compute_imatrix(_tiny(tokenizer, width=256, layers=3), torch.randint(3, 500, (1, 8))),
                         tmp_path / "other.gguf")
    with pytest.raises(ValueError, match="entries for weights that model lacks"):
        quantize_gguf(f16, tmp_path / "x.gguf", "q4_k_m", imatrix=other)
    broken = load_imatrix(imatrix)
    broken.sums["blk.0.ffn_down.weight"][0, 0] = float("nan")  # fits by name and size: only llama.cpp objects
    with pytest.raises(RuntimeError, match=r"quantising wide.gguf to LLAMA_FTYPE_MOSTLY_Q4_K_M \(exit code 1\): "
                                           r"llama_model_quantize: failed to quantize: imatrix contains non-finite"):
        quantize_gguf(f16, tmp_path / "x.gguf", "q4_k_m", imatrix=save_imatrix(broken, tmp_path / "nan.gguf"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.gguf", "other.gguf"]


# ---- the table ---------------------------------------------------------------------------------

TABLE_ARGS = dict(types=("q8_0", "q4_k_m", "iq4_nl"), max_segments=2, seq_len=32, prompt_tokens=16, gen_tokens=4,
                  repeats=1, imatrix_samples=2, progress=False)


def make_table(folder, tokenizer, with_dense: bool = True, **args):
    """The table of a tiny pruned model (blocks 4 -> 3), and of its dense model ``with_dense``: (table, csv, pruned, dense)."""
    from shortened_llm import remove_blocks
    from shortened_llm.quant_table import quant_table

    pytest.importorskip("llama_cpp")
    model = _tiny(tokenizer, layers=4, seed=3)
    dense = save_model(model, tokenizer, folder / "tiny-dense")
    remove_blocks(model, [1])
    pruned = save_model(model, tokenizer, folder / "tiny-pruned")
    out = folder / "table.csv"
    table = quant_table(pruned, out, dense=dense if with_dense else None, **{**TABLE_ARGS, **args})
    return table, out, pruned, dense


# the tests that read ``table_run`` share one worker, so its 40 s of llama.cpp runs once, not once per worker
ON_THE_TABLE_S_WORKER = pytest.mark.xdist_group("quant-table")


@pytest.fixture(scope="module")
def table_run(tmp_path_factory, tokenizer):
    """The table of a tiny pruned model and its dense model, three types."""
    return make_table(tmp_path_factory.mktemp("table"), tokenizer)


@ON_THE_TABLE_S_WORKER
def test_quant_table_rows_and_known_answers(table_run, tokenizer):
    from shortened_llm import load_model
    from shortened_llm.evaluate import perplexity
    from shortened_llm.models import count_params
    from shortened_llm.quant_table import COLUMNS, work_dir_for

    table, out, pruned, dense = table_run
    assert list(table.columns) == COLUMNS
    assert [(r.type, r.imatrix, r.model) for r in table.itertuples()] == [
        (t, i, m) for t, i in [("f16", False), ("q8_0", False), ("q4_k_m", False), ("q4_k_m", True), ("iq4_nl", True)]
        for m in ("tiny-pruned", "tiny-dense")]  # each dense row beside its pruned one
    f16 = table[table.type == "f16"].set_index("model")
    for label, folder, blocks in (("tiny-pruned", pruned, 3), ("tiny-dense", dense, 4)):
        model, _ = load_model(folder)
        # llama.cpp's PPL on the ids transformers sees, llama.cpp's parameter count, the f16 file on disk
        hf = perplexity(model, tokenizer, seq_len=32, max_segments=2, progress=False)
        assert f16.ppl[label] == pytest.approx(hf, rel=5e-3)
        assert f16.n_params[label] == count_params(model)
        assert f16.size_mb[label] == (work_dir_for(out) / f"{label}-f16.gguf").stat().st_size / 1e6
        assert set(table[table.model == label].block_count) == {blocks}
    assert (table.bpw == 8e6 * table.size_mb / table.n_params).all()
    rows = table.set_index(["model", "type", "imatrix"])
    for m in ("tiny-pruned", "tiny-dense"):
        assert rows.ppl_ratio[m, "f16", False] == 1.0
        assert rows.bpw[m, "f16", False] > rows.bpw[m, "q8_0", False] > rows.bpw[m, "q4_k_m", False] > 8
        assert rows.ppl_ratio[m, "iq4_nl", True] == pytest.approx(1, abs=0.05)
    assert (table.prompt_tps > 0).all() and (table.gen_tps > 0).all() and (table.segments == 2).all()
    assert (table[table.type != "f16"].quantize_s > 0).all()
    left = sorted(p.name for p in work_dir_for(out).iterdir())  # quantised files go once measured
    assert left == ["tiny-dense-f16.gguf", "tiny-dense-imatrix.gguf", "tiny-pruned-f16.gguf", "tiny-pruned-imatrix.gguf"]


@ON_THE_TABLE_S_WORKER
def test_a_rerun_measures_only_the_missing_rows(table_run, monkeypatch):
    import pandas as pd

    from shortened_llm import quant_table as qt

    table, out, pruned, dense = table_run
    measured = []
    real = qt._measure
    monkeypatch.setattr(qt, "_measure", lambda m, quant, imx, *a: measured.append((m.label, quant, imx)) or real(m, quant, imx, *a))
    again = qt.quant_table(pruned, out, dense=dense, **{**TABLE_ARGS, "types": ("q4_k", "q5_0", *TABLE_ARGS["types"])})
    assert sorted(measured) == sorted((m, "q5_0", i) for m in ("tiny-pruned", "tiny-dense") for i in (False, True))
    old = again[again.type.isin(table.type)].reset_index(drop=True)
    pd.testing.assert_frame_equal(old, table, check_dtype=False)  # kept from the file, not measured again
    alias = again[again.type == "q4_k"].reset_index(drop=True)  # llama-quantize's alias: the same file, not remade
    assert set(alias.same_file_as) == {"q4_k_m"}
    assert (alias.ppl.values == table[table.type == "q4_k_m"].ppl.values).all()
    assert len(pd.read_csv(out)) == len(again) == len(table) + 8


def test_a_file_the_format_table_scored_is_not_scored_again_by_the_quant_table(tokenizer, tmp_path, monkeypatch):
    """Notebook 08's two tables under one evaluation cache: the table's f16, Q8_0 and Q4_K_M files are
    remade under other names, byte for byte, and read compare_formats' numbers back; a file of other
    bytes (Q4_K_M with an importance matrix) and a run without the cache are scored."""
    from shortened_llm import eval_cache, llamacpp, remove_blocks
    from shortened_llm.export import compare_formats
    from shortened_llm.quant_table import quant_table

    pytest.importorskip("llama_cpp")
    model = _tiny(tokenizer, layers=4, seed=3)
    remove_blocks(model, [1])
    pruned = save_model(model, tokenizer, tmp_path / "tiny-pruned")
    scored = []
    real = llamacpp.gguf_token_nll
    monkeypatch.setattr(llamacpp, "gguf_token_nll", lambda llm, *a, **k: scored.append(Path(llm.model_path).name) or real(llm, *a, **k))
    args = dict(label="m", seq_len=32, max_segments=2)
    table_args = {**args, "prompt_tokens": 16, "gen_tokens": 4, "repeats": 1, "imatrix_samples": 2, "progress": False}
    with eval_cache.use(tmp_path / "run"):
        formats = compare_formats(pruned, tmp_path / "gguf", ("f16", "q8_0", "q4_k_m"), progress=False, **args)
        assert scored == ["m-f16.gguf", "m-q8_0.gguf", "m-q4_k_m.gguf"]
        table = quant_table(pruned, tmp_path / "t.csv", types=("q8_0", "q4_k_m"), work_dir=tmp_path / "gguf", **table_args)
    assert scored[3:] == [".m-q4_k_m-imatrix.gguf.measuring"]  # only the file compare_formats never made
    by_format = {r["format"].removeprefix("GGUF "): r["ppl"] for r in formats}
    for r in table[~table.imatrix].itertuples():
        assert r.ppl == by_format[r.type]  # the very number, read back
    with eval_cache.use(None):
        quant_table(pruned, tmp_path / "t2.csv", types=("q8_0",), imatrix="without", work_dir=tmp_path / "gguf", **table_args)
    assert scored[4:] == ["m-f16.gguf", ".m-q8_0.gguf.measuring"]


def test_the_format_table_s_hf_row_is_the_paper_perplexity_and_comes_from_the_cache(tokenizer, tmp_path, monkeypatch):
    """compare_formats' HF row is ``evaluate.perplexity`` of that model on those segments, to the bit,
    and under an evaluation cache a model another notebook measured there is not measured again."""
    from shortened_llm import eval_cache, evaluate
    from shortened_llm.export import compare_formats
    from shortened_llm.models import load_model

    path = save_model(_tiny(tokenizer, layers=2, seed=5), tokenizer, tmp_path / "tiny")
    args = dict(seq_len=32, max_segments=3, batch_size=2)
    expected = evaluate.perplexity(*load_model(path), "wikitext2", progress=False, cache=False, **args)
    forwards = []
    real = evaluate.token_nll
    monkeypatch.setattr(evaluate, "token_nll", lambda *a, **k: forwards.append(1) or real(*a, **k))
    with eval_cache.use(tmp_path / "run"):
        (row,) = compare_formats(path, tmp_path / "gguf", quants=(), progress=False, **args)
        assert row["ppl"] == expected and row["format"].startswith("HF ") and len(forwards) == 1
        assert evaluate.perplexity(*load_model(path), "wikitext2", progress=False, **args) == expected
        (again,) = compare_formats(path, tmp_path / "gguf", quants=(), progress=False, **args)
    assert again["ppl"] == expected and len(forwards) == 1  # both read the first measurement back


@ON_THE_TABLE_S_WORKER
def test_the_figure_labels_every_file_once_and_never_on_top_of_another(table_run):
    from shortened_llm.lessons.plots import plot_quant_table

    table = table_run[0]
    fig = plot_quant_table(table, note="tiny")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "GGUF file size (MB)" and "PPL of tiny-dense f16" in ax.get_ylabel() and ax.get_title()
    points = sum(len(c.get_offsets()) for c in ax.collections)
    assert points == len(table) == 10
    labels = [t for t in ax.texts if t.get_text() in set(table.type)]
    assert 0 < len(labels) <= points
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    with pytest.raises(ValueError, match="reference='nope' has no f16 row"):
        plot_quant_table(table, reference="nope")


def test_crowded_labels_cover_neither_each_other_nor_another_point():
    """Eight types of two models bunched at 75-100 MB, as at smoke: a label that fits nowhere is left out,
    none sits on another label or on a point it does not name."""
    import pandas as pd

    from shortened_llm.lessons.plots import QUANT_MARKER_SIZE, _marker_box, plot_quant_table

    types = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "iq4_xs", "q3_k_m", "q2_k"]
    rows = [{"model": m, "type": t, "imatrix": imx, "size_mb": 270 - 30 * k if t == "f16" else 80 + 2.5 * k + (0.8 if imx else 0),
             "ppl": base * (1 + 0.05 * k + (0 if imx else 0.02)), "same_file_as": None}
            for m, base in (("pruned", 130.0), ("dense", 60.0)) for imx in (False, True)
            for k, t in enumerate(types) if not (imx and t == "f16")]
    table = pd.DataFrame(rows)
    fig = plot_quant_table(table, reference="dense")
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text() in set(types)]
    assert len(labels) >= len(table) // 2  # most points still named
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    ref = float(table[(table.model == "dense") & (table.type == "f16")].ppl.iloc[0])
    for text, box in zip(labels, boxes):
        others = [_marker_box(ax, r.size_mb, r.ppl / ref, size=QUANT_MARKER_SIZE) for r in table.itertuples()
                  if (r.size_mb, r.ppl / ref) != tuple(text.xy)]
        assert not any(box.overlaps(m) for m in others), f"{text.get_text()} covers another point"
    assert ax.get_ylabel().endswith("(log scale)") == (ax.get_yscale() == "log")
