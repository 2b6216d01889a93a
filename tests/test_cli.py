"""The CLI chains the same calls as the notebooks; bad input fails before any work."""
import json

import pytest
from transformers import AutoModelForCausalLM

from shortened_llm.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


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
