"""The course site: README, executed notebooks, worked solutions and the claims table as static HTML.

``make site`` runs ``python -m shortened_llm.site``. It stages the pages under
``build/site-docs/`` and builds them with mkdocs + mkdocs-material + mkdocs-jupyter (all
offline; ``jupyter-book`` 2 fetches its theme at build time and fails without a network).
The result in ``site/`` opens from disk (``site/index.html``) or from any static host.

What each page shows comes from one run directory (default ``runs/smoke``, what
``make reproduce`` writes):
  - notebooks: ``run_dir/notebooks/NN_*.ipynb``, executed, with their figures embedded as
    images; a notebook the run has not executed yet is shown unexecuted, with a note saying so;
  - solutions: ``run_dir/solutions/NN_*.ipynb`` when executed, else ``solutions/`` as written;
  - the claims table: ``run_dir/eval/claims.csv`` (notebook 06 writes it);
  - the README as the home page, with its ``figures/`` and links to the notebook pages;
  - ``TEACHING.md``, the teaching guide, and ``CONTRIBUTING.md``, as written.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = ["SiteBuild", "stage_docs", "build_site", "main"]

REPO = Path(__file__).resolve().parents[1]
NOT_EXECUTED_NOTE = (
    "!!! note \"Not executed in this run\"\n"
    "    `{run_dir}` has no executed copy of this notebook, so it is shown without outputs. "
    "`make reproduce` (or `make reproduce PRESET=tiny`) executes it.\n"
)


@dataclass
class SiteBuild:
    """What one build made: where, how many pages, how long, and which pages lack outputs."""

    site_dir: Path
    pages: list[str]
    seconds: float
    unexecuted: list[str] = field(default_factory=list)

    @property
    def index(self) -> Path:
        return self.site_dir / "index.html"


def _notebook_pages(sources: Path, executed: Path, out: Path, run_dir: Path) -> tuple[list[str], list[str]]:
    """Copy each ``NN_*.ipynb`` of ``sources``, preferring its executed twin in ``executed``."""
    import nbformat

    from .reproduce import notebook_paths

    out.mkdir(parents=True, exist_ok=True)
    pages, unexecuted = [], []
    names = {p.name for p in notebook_paths(sources)} if sources.is_dir() else set()
    names |= {p.name for p in notebook_paths(executed)} if executed.is_dir() else set()
    for name in sorted(names):
        ran = executed / name
        if ran.exists():
            shutil.copy2(ran, out / name)
        else:
            nb = nbformat.read(sources / name, as_version=4)
            nb.cells.insert(1, nbformat.v4.new_markdown_cell(NOT_EXECUTED_NOTE.format(run_dir=run_dir)))
            nbformat.write(nb, out / name)
            unexecuted.append(name)
        pages.append(f"{out.name}/{name}")
    return pages, unexecuted


def _claims_page(run_dir: Path, out: Path) -> str:
    """``claims.md``: the claims table of notebook 06 for this run, or where to get it."""
    import pandas as pd

    csv = run_dir / "eval" / "claims.csv"
    head = ("# Claims table\n\nEach claim of Kim et al. (2024), checked on this run's models "
            f"(`{csv.relative_to(REPO) if csv.is_relative_to(REPO) else csv}`, written by notebook 06).\n\n")
    if csv.exists():
        body = pd.read_csv(csv).to_markdown(index=False)
    else:
        body = (f"!!! warning \"No claims table in this run\"\n    `{csv}` does not exist: run notebook 06 "
                "(`make reproduce` runs every notebook) and build the site again.")
    (out / "claims.md").write_text(head + body + "\n")
    return "claims.md"


def _index_page(readme: Path, out: Path, notebook_pages: Sequence[str]) -> str:
    """The README as home page: its figures copied along, notebook names linked to their pages."""
    text = readme.read_text()
    for page in notebook_pages:
        stem = Path(page).stem
        if page.startswith("notebooks/"):
            text = text.replace(f"`{stem}`", f"[`{stem}`]({page})")
    for ref in sorted(set(re.findall(r"\]\((figures/[^)\s]+)\)", text)) | set(re.findall(r"src=\"(figures/[^\"]+)\"", text))):
        src = readme.parent / ref
        if src.exists():
            (out / ref).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out / ref)
    (out / "index.md").write_text(text)
    return "index.md"


def _title(page: str) -> str:
    """``notebooks/02_ppl_vs_taylor_plus.ipynb`` -> ``02 · ppl vs taylor plus``."""
    stem = Path(page).stem
    num, _, rest = stem.partition("_")
    return f"{num} · {rest.replace('_', ' ')}" if num.isdigit() else stem


def stage_docs(run_dir: Path, docs_dir: Path, readme: Path = REPO / "README.md",
               notebooks_dir: Path | None = None, solutions_dir: Path | None = None) -> tuple[list, list[str], list[str]]:
    """Lay out ``docs_dir`` for mkdocs; return (nav, pages, pages shown without outputs)."""
    if docs_dir.exists():
        shutil.rmtree(docs_dir)
    docs_dir.mkdir(parents=True)
    nb_pages, nb_unrun = _notebook_pages(REPO / "notebooks", Path(notebooks_dir or run_dir / "notebooks"),
                                         docs_dir / "notebooks", run_dir)
    sol_pages, sol_unrun = _notebook_pages(REPO / "solutions", Path(solutions_dir or run_dir / "solutions"),
                                           docs_dir / "solutions", run_dir)
    claims = _claims_page(run_dir, docs_dir)
    index = _index_page(readme, docs_dir, nb_pages)
    contributing = "CONTRIBUTING.md"  # the README links to it: the package's floors and recipes
    shutil.copy2(REPO / contributing, docs_dir / contributing)
    teaching = "TEACHING.md"  # the instructor's guide: lesson plan, glossary, what-should-I-use table
    shutil.copy2(REPO / teaching, docs_dir / teaching)
    nav = [{"Home": index},
           {"Teaching guide": teaching},
           {"Notebooks": [{_title(p): p} for p in nb_pages]},
           {"Solutions": [{_title(p): p} for p in sol_pages]},
           {"Claims table": claims},
           {"The package": contributing}]
    return (nav, [index, teaching, *nb_pages, *sol_pages, claims, contributing],
            nb_unrun + [f"solutions/{n}" for n in sol_unrun])


def build_site(run_dir: str | Path = REPO / "runs" / "smoke", site_dir: str | Path = REPO / "site",
               readme: str | Path = REPO / "README.md", notebooks_dir: str | Path | None = None,
               solutions_dir: str | Path | None = None, config: str | Path = REPO / "mkdocs.yml",
               docs_dir: str | Path | None = None) -> SiteBuild:
    """Stage and build; ``site_dir/index.html`` opens from disk."""
    try:
        from mkdocs.commands.build import build
        from mkdocs.config import load_config
    except ImportError as err:
        raise ImportError(f"{err.name} is missing: pip install -e '.[site]' (mkdocs, mkdocs-material, mkdocs-jupyter)") from err
    t0 = time.perf_counter()
    run_dir, site_dir = Path(run_dir).resolve(), Path(site_dir).resolve()
    docs_dir = Path(docs_dir or REPO / "build" / "site-docs").resolve()
    nav, pages, unexecuted = stage_docs(run_dir, docs_dir, Path(readme), notebooks_dir and Path(notebooks_dir),
                                        solutions_dir and Path(solutions_dir))
    cfg = load_config(str(config), docs_dir=str(docs_dir), site_dir=str(site_dir), nav=nav)
    build(cfg)
    return SiteBuild(site_dir, pages, time.perf_counter() - t0, unexecuted)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shortened_llm.site", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "smoke"), help="the run whose executed notebooks to show")
    parser.add_argument("--site-dir", default=str(REPO / "site"))
    args = parser.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        print(f"note: run_dir {args.run_dir} does not exist: pages show notebooks unexecuted "
              "(run `make reproduce` first for outputs and figures)", file=sys.stderr)
    result = build_site(args.run_dir, args.site_dir)
    print(f"site: {len(result.pages)} pages in {result.seconds:.1f} s -> {result.index}")
    if result.unexecuted:
        print(f"  shown without outputs (not executed in {args.run_dir}): {', '.join(result.unexecuted)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
