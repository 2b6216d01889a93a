"""The lessons point at notebooks that exist, in the right order, and name the notebook that makes what they reuse.

A mechanical check against stale references (issue 24): notebooks were renumbered and split over
time, and prose like "the pruned model that notebook 02 saved" outlived the code that made it true.
Three rules, read from the markdown of ``notebooks/`` and ``solutions/`` (and from the string
literals of their code, where messages tell the learner what to run):

1. every "notebook NN", "notebooks NN-MM" / "NN and MM", and ``NN_stem`` names a notebook that exists
   (a ``NN_stem`` must be the file's exact stem);
2. the "Next:" line of a lesson points at the next notebook in the file list, and a solution's at
   the next solution (or the next lesson when that has no solution yet);
3. a sentence that says an artifact comes from a notebook ("saved by notebook 03", "retrained models
   come from notebooks 04 and 05") names exactly the notebooks whose code writes that artifact
   (``PRODUCERS``), and those run before the one that reads it (``reproduce.NEEDS``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shortened_llm.reproduce import NEEDS, NOTEBOOKS_DIR, notebook_paths

SOLUTIONS_DIR = NOTEBOOKS_DIR.parent / "solutions"
LESSONS = notebook_paths(NOTEBOOKS_DIR)
SOLUTIONS = notebook_paths(SOLUTIONS_DIR)
NUMBERS = [p.name[:2] for p in LESSONS]
STEMS = {p.stem for p in LESSONS} | {p.stem for p in SOLUTIONS}

# What each kind of artifact in run_dir is, and which notebook's code writes it. The keys are the words
# prose uses for it; test_producers_write_what_they_are_said_to checks each against that notebook's code.
PRODUCERS: dict[str, tuple[tuple[str, ...], str]] = {
    # artifact: (words that name it in a sentence, notebook(s) that write it), most specific first
    "lora": (("lora-retrained", "lora model", "lora run", "lora-0."), ("04",)),
    "cpt": (("cpt model", "cpt-0.", "cpt run"), ("05",)),
    "retrained": (("retrained model", "retrained/"), ("04", "05")),
    "pruned": (("pruned model", "pruned/", "ppl-0.20"), ("03",)),
    "efficiency": (("efficiency", "latency csv", "generation.csv"), ("07",)),
    "claims": (("claims table", "claims.csv"), ("06",)),
}
# how a producer's code shows that it writes the artifact (rule 3's table must not go stale either)
WRITES = {"lora": r'"retrained" / "lora', "cpt": r"retrain_or_load\(\s*\"cpt|\"cpt\"", "retrained": r'"retrained"',
          "pruned": r"save_model\(.*pruned_dir|pruned_dir\(.*\n(.*\n)*.*save_model", "efficiency": r'"efficiency"',
          "claims": r'claims\.csv|"claims\.csv"'}

LITERAL = re.compile(r'"([^"\n]*)"|\'([^\'\n]*)\'')  # one-line string literals of a code cell
NUM = r"(\d{2})"
LIST = r"\d{2}(?:\s*(?:-|–|,|and|or|to)\s*\d{2})*"  # no groups of its own: SOURCE's alternatives are groups 1-4
MENTION = re.compile(rf"\bnotebooks?\s+({LIST})", re.IGNORECASE)
STEM = re.compile(r"(?<![\w/.-])(\d{2}_[a-z][a-z0-9_]*[a-z0-9])(?:\.ipynb)?(?![\w*])")
SOURCE = re.compile(rf"(?:saved|saves|written|writes|wrote|left|leaves|trained|trains|made|makes|produced|computed)"
                    rf"(?:\s+\w+){{0,3}}\s+(?:by|in)\s+notebooks?\s+({LIST})"
                    rf"|(?:comes?|came|loaded|reused?|taken)\s+from\s+notebooks?\s+({LIST})"
                    rf"|\bnotebooks?\s+({LIST})\s+(?:saved|saves|wrote|writes|left|leaves|trained|trains|made|makes)\b"
                    rf"|\((?:run\s+)?notebooks?\s+({LIST})\)", re.IGNORECASE)


def numbers_in(text: str) -> list[str]:
    """``"04-06"`` -> 04 05 06; ``"04 and 05"`` -> 04 05."""
    found = re.findall(NUM, text)
    if re.search(r"\d{2}\s*(?:-|–|to)\s*\d{2}", text) and len(found) == 2:
        return [f"{n:02d}" for n in range(int(found[0]), int(found[1]) + 1)]
    return found


def lesson_text(nb: dict) -> tuple[str, str]:
    """(the markdown cells, the string literals of the code cells: messages that tell the learner where to look)."""
    markdown, literals = [], []
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            markdown.append(source)
        elif cell["cell_type"] == "code":
            literals += [a or b for a, b in LITERAL.findall(source)]
    return "\n\n".join(markdown), "\n\n".join(literals)


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n\s*\n|\n(?=\s*(?:[-*]|\d+\.)\s)", text) if s.strip()]


def artifact_named(clause: str, first: bool = False) -> str | None:
    """The ``PRODUCERS`` kind the clause names last (or ``first``): the one nearest its notebook number; of two
    names that overlap ("LoRA-retrained model" is both ``lora`` and ``retrained``), the more specific, listed first."""
    spans = {}
    for kind, (words, _) in PRODUCERS.items():
        found = [(i, i + len(w)) for w in words for i in [clause.find(w) if first else clause.rfind(w)] if i >= 0]
        if found:
            spans[kind] = min(found) if first else max(found)
    if not spans:
        return None
    last = (min if first else max)(spans, key=lambda k: spans[k][0])
    overlapping = [k for k in PRODUCERS if k in spans and spans[k][0] < spans[last][1] and spans[last][0] < spans[k][1]]
    return overlapping[0]


def stale_references(name: str, text: str, messages: str = "", lessons: list[str] = NUMBERS,
                     stems: set[str] = STEMS) -> list[str]:
    """Rules 1 and 3 for one notebook's markdown ``text`` and code ``messages``; ``name`` is its file name.

    File stems are checked in the markdown only: code names figures ``NN_what`` too.
    """
    own, problems = name[:2], []
    for m in MENTION.finditer(text + "\n\n" + messages):
        for n in numbers_in(m.group(1)):
            if n not in lessons:
                problems.append(f"{name}: 'notebook {n}' does not exist (notebooks: {', '.join(lessons)})")
    for m in STEM.finditer(text):
        if m.group(1) not in stems and m.group(1)[:2] in lessons + [str(int(lessons[-1]) + 1).zfill(2)]:
            problems.append(f"{name}: '{m.group(1)}' is no notebook's file name")
    for sentence in sentences(text + "\n\n" + messages):
        matches = list(SOURCE.finditer(sentence))
        for i, m in enumerate(matches):
            named = set(numbers_in(next(g for g in m.groups() if g)))
            if m.group(3):  # "notebook 04 left retrained models": the artifact follows, up to the next mention
                clause = sentence[m.start():matches[i + 1].start() if i + 1 < len(matches) else len(sentence)]
                kind = artifact_named(clause.lower(), first=True)
            else:  # "saved by notebook 03", "(notebook 07)": the artifact comes before, back to the last mention
                kind = artifact_named(sentence[matches[i - 1].end() if i else 0:m.end()].lower())
            if kind is None:
                continue
            makers = set(PRODUCERS[kind][1])
            if own in named:  # "this notebook computes them" is not a reference to another
                continue
            if named != makers:
                problems.append(f"{name}: says {kind} comes from notebook(s) {', '.join(sorted(named))}, "
                                f"but notebook(s) {', '.join(sorted(makers))} write it: {sentence.strip()[:160]!r}")
    return problems


def next_link_problems(name: str, text: str, order: list[str]) -> list[str]:
    """Rule 2: the last "Next:" line names the notebook after ``name`` in ``order`` (a list of NN)."""
    lines = [line for line in text.splitlines() if re.match(r"\s*Next\b", line)]
    own = name[:2]
    if own not in order or own == order[-1]:
        return []
    want = order[order.index(own) + 1]
    if not lines:
        return [f"{name}: no 'Next:' line (the next notebook is {want})"]
    line = lines[-1] + " " + text[text.rfind(lines[-1]):][len(lines[-1]):].split("\n\n")[0]
    named = set(re.findall(rf"(?<!\d){NUM}(?=\s*·|_[a-z]|\b)", line)) & set(order)
    if want not in named:
        return [f"{name}: 'Next' points at {', '.join(sorted(named)) or 'no notebook'}, the next notebook is {want}: {line.strip()[:120]!r}"]
    return []


def _text(path: Path) -> tuple[str, str]:
    return lesson_text(json.loads(path.read_text()))


# ---- the rules on the notebooks as they are ----------------------------------------------------------

@pytest.mark.parametrize("path", LESSONS + SOLUTIONS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_references_name_notebooks_that_exist_and_make_what_they_say(path):
    problems = stale_references(path.name, *_text(path))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_next_points_at_the_next_lesson(path):
    problems = next_link_problems(path.name, _text(path)[0], NUMBERS)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_a_solutions_next_points_at_the_next_solution_or_lesson(path):
    problems = next_link_problems(path.name, _text(path)[0], NUMBERS)
    assert not problems, "\n".join(problems)


def test_producers_write_what_they_are_said_to():
    """``PRODUCERS`` is read from the notebooks' code, and each producer runs before its readers (NEEDS)."""
    code = {p.name[:2]: "\n".join("".join(c["source"]) for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "code")
            for p in LESSONS}
    for kind, (_, makers) in PRODUCERS.items():
        for n in makers:
            assert n in code, f"{kind}: notebook {n} does not exist"
            assert re.search(WRITES[kind], code[n]), f"notebook {n}'s code does not write {kind} ({WRITES[kind]})"
    for reader, needed in NEEDS.items():
        assert set(needed) <= set(NUMBERS), f"reproduce.NEEDS[{reader!r}] names a missing notebook: {needed}"


# ---- the rules catch the stale references the issue found (texts as they were before the fix) ---------

OLD = {  # file -> a sentence it had, and what the check must say about it
    "04_lora_retraining.ipynb": "We start from the 20 % pruned model that notebook 02 saved (`run_dir/pruned/ppl-0.20`).",
    "06_evaluation.ipynb": "Every retrained model that notebook 04 left under `run_dir/retrained/`.",
    "06_evaluation.ipynb ": "needs run_dir/efficiency/*.csv with batch-1 latency of depth- and width-pruned models (notebook 05)",
}


@pytest.mark.parametrize("name", list(OLD), ids=lambda n: n.strip())
def test_the_old_provenance_sentences_fail(name):
    assert stale_references(name.strip(), OLD[name]), f"not caught: {OLD[name]!r}"


@pytest.mark.parametrize("name, text", [
    ("06_evaluation.ipynb", "Next: `07_*`, the next lesson in the series (see the README's table of notebooks)."),
    ("08_export_gguf.ipynb", "Next: back to the README's table of notebooks for what comes after export."),
    ("09_beyond_the_paper.ipynb", "Next: back to the README's table of notebooks, or `shortened-llm retrain kd --help`."),
])
def test_the_old_next_lines_fail(name, text):
    order = sorted(set(NUMBERS) | {"07", "08", "09", "10"})  # 09's next is 10 whether or not it exists yet
    assert next_link_problems(name, text, order), f"not caught: {text!r}"


def test_the_fixed_sentences_pass():
    assert not stale_references("04_lora_retraining.ipynb", "We start from the 20 % pruned model that notebook 03 saved.")
    assert not stale_references("06_evaluation.ipynb", "Every retrained model that notebooks 04 and 05 left under `run_dir/retrained/`.")
    assert not next_link_problems("08_export_gguf.ipynb", "Next: **09 · Beyond the paper**.", ["07", "08", "09"])
    assert stale_references("03_pruning.ipynb", "as notebook 11 shows", lessons=["01", "02", "03"])
    assert stale_references("03_pruning.ipynb", "see `02_ppl_vs_taylor`", stems={"02_ppl_vs_taylor_plus"})
    assert not stale_references("08_export_gguf.ipynb", "the LoRA-retrained model (notebook 04)")
    assert stale_references("08_export_gguf.ipynb", "the LoRA-retrained model (notebook 05)")
