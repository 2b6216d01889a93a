"""The CLI chains the same calls as the notebooks; bad input fails before any work.

The CLI's own tests live here: the entry point, the export and zero-shot commands, the CLI side of a
llama.cpp crash. A feature's test that also checks the flag reaching it (``--unit``, ``--dtype``,
``retrain replaceme``, the protocol and fault flags) stays beside the feature's other tests. The
export commands run on the models of the export and quant-table tests: their fixtures and table
maker are imported from those modules, not copied.
"""
import json
import subprocess
import sys

import pytest
import test_export
import test_quant_table
from test_export import _die_with_sigill
from transformers import AutoModelForCausalLM

from shortened_llm.cli import main

# the export tests' models, shared rather than rebuilt: pytest finds fixtures by name in this module
pruned_dir, tokenizer = test_export.pruned_dir, test_export.tokenizer


@pytest.fixture(scope="module")
def table_run(tmp_path_factory, tokenizer):
    """test_quant_table's table of the tiny pruned model, one type only: the CLI reads it back (a fifth of the work)."""
    return test_quant_table.make_table(tmp_path_factory.mktemp("table"), tokenizer, with_dense=False, types=("q8_0",))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_entry_point_and_module_agree():
    out = subprocess.run([sys.executable, "-m", "shortened_llm", "--help"], capture_output=True, text=True, check=True)
    for command in ("score", "prune", "eval", "reproduce"):
        assert command in out.stdout


def test_prune_then_eval_ppl(capsys, tmp_path, tiny_llama_dir):
    code, out, _ = run(capsys, "prune", "--model", tiny_llama_dir, "--criterion", "ppl", "--ratio", 0.34,
                       "--preset", "tiny", "--out", tmp_path / "p")
    assert code == 0
    result = json.loads(out)
    assert result["num_blocks"] == 4 and len(result["removed_blocks"]) == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "p").config.num_hidden_layers == 4
    record = json.loads((tmp_path / "p" / "pruning.json").read_text())
    assert record["removed_blocks"] == result["removed_blocks"] and len(record["scores"]) == 6

    code, out, _ = run(capsys, "eval", "ppl", "--model", tmp_path / "p", "--dataset", "ptb", "--max-segments", 2)
    assert code == 0
    result = json.loads(out)
    assert result["dataset"] == "ptb" and result["ppl"] > 1


def test_existing_output_needs_overwrite(capsys, tmp_path, tiny_llama_dir):
    (tmp_path / "p").mkdir()
    code, _, err = run(capsys, "prune", "--model", tiny_llama_dir, "--ratio", 0.2, "--out", tmp_path / "p")
    assert code == 2 and "--overwrite" in err


@pytest.mark.parametrize("argv, message", [
    (["--ratio", "1.5"], "ratio=1.5 must be in (0, 1)"),
    (["--criterion", "tayler"], "Did you mean 'taylor"),
])
def test_bad_input_is_a_clear_error(capsys, tmp_path, tiny_llama_dir, argv, message):
    code, _, err = run(capsys, "prune", "--model", tiny_llama_dir, "--out", tmp_path / "x", "--preset", "tiny", *argv)
    assert code == 2 and message in err
    assert not (tmp_path / "x").exists()


def test_unknown_model(capsys, tmp_path):
    code, _, err = run(capsys, "eval", "ppl", "--model", "no-such-model")
    assert code == 2 and "Unknown model" in err


def test_servers_move_to_the_next_port_when_one_is_taken():
    """free_port skips a listening port; both servers' 'port taken' messages trigger a retry."""
    import socket

    from shortened_llm.serve import PORT_TAKEN, free_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert free_port(taken) > taken
    assert PORT_TAKEN.search("[E] OSError: [Errno 98] Address already in use")
    assert PORT_TAKEN.search("ERROR: the Jupyter server could not be started because port 8888 is not available.")
    assert PORT_TAKEN.search("[I ServerApp] The port 8888 is already in use.")
    assert not PORT_TAKEN.search("ModuleNotFoundError: No module named 'voila'")


def test_cli_rejects_unknown_task(capsys):
    from shortened_llm.cli import main

    assert main(["eval", "zeroshot", "--tasks", "bolq"]) == 2
    assert "Did you mean 'boolq'" in capsys.readouterr().err


# ---- export gguf / export quant-table -------------------------------------------------------

def test_cli_export(pruned_dir, tmp_path, capsys):
    from shortened_llm.cli import main

    out = tmp_path / "cli.gguf"
    assert main(["export", "gguf", "--model", str(pruned_dir), "--out", str(out), "--quant", "f16"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["block_count"] == 4 and printed["removed_blocks"] == [1, 2]
    assert main(["export", "gguf", "--model", str(pruned_dir), "--out", str(tmp_path / "x.gguf"), "--quant", "q9"]) == 2
    assert "Available" in capsys.readouterr().err


def test_a_crash_in_llama_cpp_is_one_line_from_the_cli(pruned_dir, tmp_path, monkeypatch, capsys):
    """The quantising child dies of SIGILL (see test_export's crash test): the CLI prints one error line, no traceback."""
    pytest.importorskip("llama_cpp")
    from shortened_llm import llamacpp_guard

    monkeypatch.setattr(llamacpp_guard, "_child_command", _die_with_sigill)
    assert main(["export", "gguf", "--model", str(pruned_dir), "--out", str(tmp_path / "c.gguf"), "--quant", "q4_k_m"]) == 2
    err = capsys.readouterr().err  # after the f16 file's progress bar
    errors = [line for line in err.splitlines() if line.startswith("shortened-llm: error:")]
    assert len(errors) == 1 and "SIGILL" in errors[0] and "Traceback" not in err


def test_cli_quant_table(table_run, capsys, monkeypatch):
    import json

    from shortened_llm import quant_table as qt
    from shortened_llm.cli import main

    table, out, pruned, dense = table_run
    monkeypatch.setattr(qt, "_measure", lambda *a: pytest.fail("a row in the CSV was measured again"))
    args = ["export", "quant-table", "--model", str(pruned), "--out", str(out), "--max-segments", "2", "--seq-len", "32"]
    assert main([*args, "--types", "q8_0"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["model"], r["type"]) for r in rows] == [("tiny-pruned", "f16"), ("tiny-pruned", "q8_0")]
    assert rows[1]["ppl"] == pytest.approx(table.set_index(["model", "type"]).ppl["tiny-pruned", "q8_0"], rel=1e-4)
    assert main([*args, "--types", "q4_k_mm"]) == 2
    assert "Did you mean 'q4_k_m'?" in capsys.readouterr().err
