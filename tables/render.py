"""Render the paper's tables from result records, beside the published numbers.

    python tables/render.py [--results DIR] [--format md|latex|csv|all] [--out DIR]
                            [--tables ID ...] [--selection RULE|any] [--variant V|any]
                            [--logs RUN ...] [--no-figures]

(``python -m tables.render`` is the same.) Writes ``<out>/<table>.md|.tex|.csv``,
``<out>/tables.md|.tex`` and ``<out>/figures/*.png|.pdf``; prints the tables to stdout.
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: tables/ is sys.path[0]; import from the repo root
    _ROOT = str(Path(__file__).resolve().parent.parent)
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = _ROOT
    else:
        sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import pandas as pd  # noqa: E402
from tabulate import tabulate  # noqa: E402

from dcbench.core import UserError, atomic_write  # noqa: E402
from tables.collate import (  # noqa: E402
    DEFAULT,
    TableView,
    build_view,
    collate_table,
    load_results,
)
from tables.specs import SPECS  # noqa: E402

log = logging.getLogger("tables.render")

FORMATS = ("md", "latex", "csv", "all")

# --------------------------------------------------------------------------- Markdown


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def to_markdown(view: TableView) -> str:
    """GitHub-flavoured Markdown: a title, the caption line, the table, the notes."""
    n_text = 1 + len(view.spec.row_attrs)
    body = [[_md_escape(x) for x in (r.label, *r.attrs, *r.texts)] for r in view.rows]
    table = tabulate(body, headers=view.headers, tablefmt="github", disable_numparse=True,
                     colalign=("left",) * n_text + ("right",) * len(view.spec.columns))
    notes = "\n".join(f"- {n}" for n in view.notes)
    return f"### {view.title}\n\n{view.caption}\n\n{table}\n\n{notes}\n"


# --------------------------------------------------------------------------- LaTeX

_LATEX = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "—": "---", "–": "--", "−": "$-$", "±": r"$\pm$", "Δ": r"$\Delta$", "·": r"$\cdot$",
    "†": r"$\dagger$",
}


def latex_escape(s: str) -> str:
    """Escape LaTeX specials; map the few non-ASCII symbols we print to LaTeX commands."""
    return "".join(_LATEX.get(ch, ch) for ch in s)


def beyond_pdflatex(text: str) -> list[str]:
    """Characters of ``text`` that pdflatex cannot typeset from UTF-8 input with T1 fonts:
    everything non-ASCII outside Latin-1 and Latin Extended-A that we do not map."""
    return sorted({ch for ch in text if ord(ch) > 0x17F and ch not in _LATEX})


def _latex_header(view: TableView) -> list[str]:
    spec = view.spec
    lead = ["Method", *spec.row_attrs]
    two_level = any(c.group and c.sub for c in spec.columns)
    if not two_level:
        cells = [*lead, *(c.label for c in spec.columns)]
        return [" & ".join(latex_escape(c) for c in cells) + r" \\"]
    spans: list[tuple[str, int, int]] = []  # group, first column (1-based), last
    for j, c in enumerate(spec.columns, start=len(lead) + 1):
        if spans and spans[-1][0] == c.group:
            spans[-1] = (c.group, spans[-1][1], j)
        else:
            spans.append((c.group, j, j))
    top = [""] * len(lead) + [rf"\multicolumn{{{b - a + 1}}}{{c}}{{{latex_escape(g)}}}"
                              for g, a, b in spans]
    rules = " ".join(rf"\cmidrule(lr){{{a}-{b}}}" for _, a, b in spans)
    sub = [*lead, *(c.sub for c in spec.columns)]
    return [" & ".join(top) + r" \\", rules,
            " & ".join(latex_escape(c) for c in sub) + r" \\"]


def to_latex(view: TableView) -> str:
    """A booktabs ``table`` environment; the best unsupervised value per column in bold."""
    spec = view.spec
    best = view.best()
    caption = latex_escape(f"{view.title}. {view.caption}")
    notes = " ".join(latex_escape(n) for n in view.notes)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{caption} {notes}}}", rf"\label{{tab:{spec.id}}}",
             rf"\begin{{tabular}}{{{'l' * (1 + len(spec.row_attrs))}"
             rf"{'r' * len(spec.columns)}}}",
             r"\toprule", *_latex_header(view)]
    prev = None
    for i, r in enumerate(view.rows):
        if r.kind != prev:
            lines.append(r"\midrule")
            prev = r.kind
        cells = [latex_escape(x) for x in (r.label, *r.attrs)]
        for j, t in enumerate(r.texts):
            t = latex_escape(t)
            cells.append(rf"\textbf{{{t}}}" if i in best[j] else t)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    text = "\n".join(lines) + "\n"
    extra = beyond_pdflatex(text)
    if extra:
        note = (f"labels of table {spec.id} hold characters pdflatex cannot typeset "
                f"({' '.join(extra[:10])}): compile with xelatex or lualatex (with fontspec and a "
                "font that has them), or give the checkpoints other --label")
        log.warning(note)
        text = f"% {note}\n" + text
    return text


# --------------------------------------------------------------------------- CSV


def to_csv(view: TableView) -> str:
    """Tidy CSV: one line per (row, column) with the displayed text and the value."""
    spec = view.spec
    out = []
    for r in view.rows:
        attrs = dict(zip(spec.row_attrs, r.attrs))
        for c, text, value in zip(spec.columns, r.texts, r.values):
            out.append({"table": spec.id, "section": r.kind, "method": r.label,
                        "attrs": "; ".join(f"{k}={v}" for k, v in attrs.items()),
                        "column": c.key, "text": text, "value": value})
    buf = io.StringIO()
    pd.DataFrame(out, columns=["table", "section", "method", "attrs", "column", "text",
                               "value"]).to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


RENDERERS = {"md": (to_markdown, ".md"), "latex": (to_latex, ".tex"), "csv": (to_csv, ".csv")}


# --------------------------------------------------------------------------- CLI


def _choice(value: str) -> str | None:
    return None if value == "any" else value


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {out} ({e.strerror}): pass --out "
                        "a writable folder") from None


def render(results: Path, out: Path, fmt: str = "all", tables: Sequence[str] = (),
           selection: str | None = DEFAULT, variant: str | None = DEFAULT,
           logs: Sequence[Path] = (), figures: bool = True) -> dict[str, str]:
    """Collate, render and write every requested table; return the primary text per table.

    ``selection`` / ``variant``: ``DEFAULT`` = each spec's default, ``None`` = any.
    """
    for p in logs:
        if not (Path(p) / "log.jsonl").is_file() and not Path(p).is_file():
            raise UserError(f"pretraining log {p} does not exist: pass --logs a pretraining "
                            "run folder holding log.jsonl or the log file itself")
    res = load_results(results)
    formats = ["md", "latex", "csv"] if fmt == "all" else [fmt]
    _make_out(out)
    texts: dict[str, dict[str, str]] = {f: {} for f in formats}
    collated = {}
    for tid in tables or list(SPECS):
        spec = SPECS[tid]
        col = collated[tid] = collate_table(spec, res, selection, variant)
        view = build_view(col)
        for f in formats:
            fn, ext = RENDERERS[f]
            texts[f][tid] = fn(view)
            atomic_write(out / f"{tid}{ext}", texts[f][tid])
    for f, sep in (("md", "\n"), ("latex", "\n")):
        if f in texts:
            atomic_write(out / f"tables{RENDERERS[f][1]}", sep.join(texts[f].values()))
    if figures:
        from tables import figures as figs  # matplotlib only when figures are asked for
        figs.write_figures(out / "figures", res, collated, logs)
    log.info("wrote %s to %s", ", ".join(formats), out)
    return texts[formats[0]]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python tables/render.py",
        description="Render the paper's tables from result records, beside the "
                    "published numbers (Markdown, LaTeX, CSV) and the figures.")
    p.add_argument("--results", type=Path, default=Path("results"),
                   help="results folder written by evaluations.run_all (default: results)")
    p.add_argument("--format", choices=FORMATS, default="all",
                   help="output format(s) (default: all)")
    p.add_argument("--out", type=Path, default=Path("out/tables"),
                   help="output folder (default: out/tables)")
    p.add_argument("--tables", nargs="+", choices=list(SPECS), default=[],
                   metavar="ID", help=f"tables to render: {', '.join(SPECS)} (default: all)")
    p.add_argument("--selection", default=DEFAULT,
                   choices=(DEFAULT, "any", "best_epoch", "last_epoch", "final"),
                   help="selection rule of our rows: best_epoch, last_epoch, final, or any "
                        "(default: each table's rule, best_epoch for table1)")
    p.add_argument("--variant", default=DEFAULT, choices=(DEFAULT, "any", "10crop", "center"),
                   help="test-time variant of our rows: 10crop, center, or any "
                        "(default: each table's, 10crop for table1)")
    p.add_argument("--logs", nargs="+", type=Path, default=[], metavar="PATH",
                   help="pretraining run folders or log.jsonl files: adds the NMI figure")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing to stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="more log lines")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        texts = render(args.results, args.out, args.format, args.tables,
                       _choice(args.selection), _choice(args.variant), args.logs,
                       figures=not args.no_figures)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        sys.stdout.write("\n".join(texts.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
