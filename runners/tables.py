"""The paper's Tables 1-4 from bnnbench runs: spec (TOML), measurements, Markdown and LaTeX.

A table spec (``tables/*.toml``, installed as ``bnnbench.tables``) gives ``number``,
``title``, ``data`` and optionally ``name`` (the output file stem, default
``table<number>``), ``curves`` (``metrics.csv`` columns to draw against the epoch
for every run of the table) and lists

* ``columns``: what is measured, each a ``metrics.csv`` column (``value``) read at
  the last epoch of a stage (``stage = 1``, ``2`` or ``"final"``, the run's last
  stage), with a label and the decimals to print;
* ``rows``: network, label, W/A, the paper's values (strings, as printed) and, when
  bnnbench implements the method, the run: ``method`` (its weight half, and its activation
  half unless ``act_method`` names another method's), ``hparams``, ``act_method``,
  ``act_hparams``, ``act_norm``, ``binary_activations`` (false for 1W/32A, the same as
  ``act_method = "fp"``) and optionally ``data``/``stages`` overriding the table's.  A row
  without ``method`` shows the paper's value and "not in bnnbench".

:func:`make_table` matches every row to finished runs (one per seed, see
:mod:`runners.experiments`), trains the missing ones unless told not to, and
writes ``<out>/tables/<stem>.md``, ``<stem>.tex`` (booktabs) and ``<stem>.csv``
(one line per row, column and seed, naming the run each number comes from), and
with ``curves`` the figure ``<out>/figures/<stem>_curves.png`` / ``.pdf``; with a
``reference`` row also ``<stem>_stats.csv`` (:mod:`runners.significance`) and the
interval figure ``<out>/figures/<stem>_ci.png`` / ``.pdf``.
Each measured cell is the value of one seed or the mean ± the half-width of its
95% Student-t interval over seeds; a run that has not finished is "missing", never 0.
"""

from __future__ import annotations

import io
import math
import re
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bnnbench.data import DATASETS
from bnnbench.figures import interval_plot, save_figure, training_curves

from bnnbench.io import write_text
from bnnbench.tables import PAPER_TABLES, named_specs, read_spec_text, shipped_specs

from bnnbench import stats

from . import significance
from .catalog import RunRecord
from .executors import Executor
from .experiments import Job, Plan, execute, plan
from .locks import RUN_DIRECTORY_LOCK, held_elsewhere, lock_path
from .recipes import Recipe
from .spec import Machine, RunSpec

TABLE_NUMBERS = PAPER_TABLES
NOT_IMPLEMENTED = "not in bnnbench"
MISSING = "missing"

_TABLE_KEYS = {"number", "name", "title", "data", "stages", "source", "notes", "columns", "rows", "curves", "reference", "compare"}
_COLUMN_KEYS = {"key", "label", "value", "stage", "digits"}
_ROW_KEYS = {
    "net", "label", "wa", "method", "hparams", "act_method", "act_hparams", "act_norm", "binary_activations", "data", "stages", "paper", "note",
}  # fmt: skip
_RUN_KEYS = ("hparams", "act_method", "act_hparams", "act_norm", "binary_activations")


# ------------------------------------------------------------------ spec
@dataclass(frozen=True)
class Column:
    """A measured quantity: ``metrics.csv`` column ``value`` at the end of ``stage`` ("final": the run's last)."""

    key: str
    label: str
    value: str = "test_top1"
    stage: int | str = "final"
    digits: int = 2

    def read(self, record: RunRecord) -> float | None:
        """The value in a finished run, or None when that run did not log it."""
        stage = record.spec.stages[-1] if self.stage == "final" else int(self.stage)
        row = record.stage_end(stage)
        if row is None or self.value not in row or pd.isna(row[self.value]):
            return None
        return float(row[self.value])


@dataclass(frozen=True)
class Row:
    """One line of a table: a method on a network, the paper's numbers, and our run (a template:
    the table's budget and seeds complete it) if we have one."""

    net: str
    label: str
    wa: str
    paper: dict[str, str]
    run: RunSpec | None
    note: str = ""


@dataclass(frozen=True)
class TableSpec:
    number: int | str
    title: str
    data: str
    source: str
    columns: list[Column]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    name: str = ""
    curves: list[str] = field(default_factory=list)
    reference: str | None = None  # label of the row every other row is compared with (runners/significance.py)
    compare: str = "top1"  # the column those comparisons are about

    @property
    def stem(self) -> str:
        """File name of the outputs: ``name`` when the spec gives one, else ``table<number>``."""
        return self.name or f"table{self.number}"

    @property
    def family(self) -> str:
        return DATASETS[self.data].family

    @property
    def runs(self) -> list[RunSpec]:
        """The run templates of the rows bnnbench implements."""
        return [row.run for row in self.rows if row.run is not None]


def _check_keys(where: str, given: dict[str, Any], allowed: set[str], required: set[str]) -> None:
    unknown, missing = sorted(set(given) - allowed), sorted(required - set(given))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(allowed))}")
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")


def parse_spec(data: dict[str, Any], where: str = "table spec") -> TableSpec:
    """A :class:`TableSpec` from parsed TOML; every error names the row or column at fault."""
    _check_keys(where, data, _TABLE_KEYS, {"number", "title", "data", "columns", "rows"})
    if data["data"] not in DATASETS:
        raise ValueError(f"{where}: unknown data set {data['data']!r}; valid: {', '.join(DATASETS)}")
    columns = []
    for i, col in enumerate(data["columns"], start=1):
        _check_keys(f"{where}, column {i}", col, _COLUMN_KEYS, {"key", "label"})
        column = Column(**col)
        if column.stage not in ("final", 1, 2):
            raise ValueError(f'{where}, column {column.key!r}: stage must be 1, 2 or "final", got {column.stage!r}')
        columns.append(column)
    keys = [c.key for c in columns]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{where}: column keys repeat: {keys}")
    rows = []
    for i, row in enumerate(data["rows"], start=1):
        here = f"{where}, row {i} ({row.get('label', '?')})"
        _check_keys(here, row, _ROW_KEYS, {"net", "label", "wa"})
        paper = {k: str(v) for k, v in row.get("paper", {}).items()}
        unknown = sorted(set(paper) - set(keys))
        if unknown:
            raise ValueError(f"{here}: paper values for unknown column(s) {', '.join(unknown)}; columns: {', '.join(keys)}")
        for key, value in paper.items():
            try:
                float(value)
            except ValueError:
                raise ValueError(f"{here}: paper value {key} = {value!r} is not a number") from None
        run = None
        if "method" in row:
            act_method = "fp" if not row.get("binary_activations", True) else row.get("act_method")
            try:
                run = RunSpec.make(
                    row.get("data", data["data"]),
                    net=row["net"],
                    method=row["method"],
                    hparams=row.get("hparams", {}),
                    act_method=act_method,
                    act_hparams=row.get("act_hparams", {}),
                    act_norm=row.get("act_norm"),
                    stages=tuple(row.get("stages", data.get("stages", [1, 2]))),
                )
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"{here}: {exc}") from None
            if run.model.wa != row["wa"]:
                raise ValueError(f"{here}: wa = {row['wa']!r} but method {run.model.label!r} is {run.model.wa}")
        elif any(key in row for key in _RUN_KEYS):
            raise ValueError(f"{here}: {', '.join(k for k in _RUN_KEYS if k in row)} given without a method")
        rows.append(Row(row["net"], row["label"], row["wa"], paper, run, row.get("note", "")))
    curves = list(data.get("curves", []))
    if any(not isinstance(c, str) or not c for c in curves):
        raise ValueError(f"{where}: curves must be a list of metrics.csv column names, got {curves!r}")
    name = data.get("name", "")
    if name and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"{where}: name {name!r} is a file stem: letters, digits, '_', '.', '-' only")
    reference, compare = data.get("reference"), data.get("compare", "top1")
    if reference is not None:
        labels = [row.label for row in rows if row.run is not None]
        if reference not in labels:
            raise ValueError(f"{where}: reference {reference!r} is not the label of a row bnnbench trains; labels: {', '.join(labels)}")
        if len(set(labels)) != len(labels):
            raise ValueError(f"{where}: row labels repeat; a table with a reference needs one label per row")
        if compare not in keys:
            raise ValueError(f"{where}: compare = {compare!r} is not a column key; columns: {', '.join(keys)}")
    return TableSpec(
        data["number"], data["title"], data["data"], data.get("source", ""), columns, rows, list(data.get("notes", [])), name, curves, reference, compare
    )


def load_spec(table: int | str | Path) -> TableSpec:
    """Table 1-4 of the paper (a number), a spec shipped with bnnbench (its name) or a spec file (a path)."""
    if isinstance(table, int) or str(table).isdigit():
        if int(table) not in TABLE_NUMBERS:
            raise ValueError(f"the BiPer paper has tables {', '.join(map(str, TABLE_NUMBERS))}, not {int(table)}")
        table = f"table{int(table)}"
    if str(table) in shipped_specs():
        text, where = read_spec_text(str(table)), f"bnnbench.tables/{table}.toml"
    else:
        path = Path(table)
        if not path.is_file():
            raise FileNotFoundError(
                f"table spec {path} does not exist; pass 1, 2, 3, 4, a shipped spec ({', '.join(named_specs()) or 'none'}) "
                "or the path of a .toml spec"
            )
        text, where = path.read_text(), str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{where} is not valid TOML: {exc}") from None
    return parse_spec(data, where)


# ------------------------------------------------------------------ measurements
def measurements(spec: TableSpec, runs: Plan, seeds: list[int]) -> pd.DataFrame:
    """One line per (row, column, seed) of our rows: the value (NaN if none), the paper's, the run's status and id."""
    lines = []
    for index, row in enumerate(spec.rows):
        if row.run is None:
            continue
        for seed in seeds:
            job = runs.job(row.run, seed)
            record = job.record if job.status == "finished" else None
            for column in spec.columns:
                value = column.read(record) if record is not None else None
                status = "not logged" if record is not None and value is None else job.status
                lines.append(
                    {
                        "row": index,
                        "net": row.net,
                        "label": row.label,
                        "column": column.key,
                        "seed": seed,
                        "value": math.nan if value is None else value,
                        "paper": float(row.paper[column.key]) if column.key in row.paper else math.nan,
                        "status": status,
                        "note": job.note,
                        "run_id": job.record.run_id if job.record is not None else "",
                    }
                )
    return pd.DataFrame(lines, columns=["row", "net", "label", "column", "seed", "value", "paper", "status", "note", "run_id"])


def curve_frame(spec: TableSpec, runs: Plan, seeds: list[int]) -> pd.DataFrame:
    """``metrics.csv`` of every finished run of the table's rows, long-form, with the row's ``label``, ``net`` and ``seed``."""
    frames = []
    for row in spec.rows:
        for seed in seeds:
            job = runs.job(row.run, seed) if row.run is not None else None
            if job is None or job.status != "finished":
                continue
            metrics = job.record.metrics.copy()
            metrics.insert(0, "label", row.label)
            metrics.insert(1, "net", row.net)
            metrics.insert(2, "seed", seed)
            frames.append(metrics)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _cell(values: pd.DataFrame, digits: int, seeds: int) -> str:
    """``mean ± half-width of the 95% Student-t interval`` (or one value) of the finished seeds;
    "missing"/"diverged" when there are none."""
    got = values["value"].dropna()
    if got.empty:
        statuses = set(values["status"])
        for reason in ("diverged", "not logged"):
            if statuses == {reason}:
                return reason
        notes = {n for n in values["note"] if n}
        return MISSING + (f" ({', '.join(sorted(notes))})" if notes else "")
    ci = stats.mean_ci(got.to_numpy())
    text = stats.format_mean_ci(ci.mean, ci.half_width, ci.n, digits)
    if len(got) < seeds:
        text += f" ({len(got)}/{seeds} seeds)"
    return text


def table_frame(spec: TableSpec, values: pd.DataFrame, seeds: int, comparison: pd.DataFrame | None = None) -> pd.DataFrame:
    """The table as strings: Net, Method, W/A, then per column the measured cell and (if any) the paper's,
    then, with a ``comparison`` (:func:`runners.significance.comparison`), its statistics columns."""
    paper_columns = [c for c in spec.columns if any(c.key in r.paper for r in spec.rows)]
    lines = []
    for index, row in enumerate(spec.rows):
        line = {"Net": _net_label(row.net), "Method": row.label, "W/A": row.wa}
        for column in spec.columns:
            if row.run is None:
                line[column.label] = NOT_IMPLEMENTED
            else:
                mine = values[(values["row"] == index) & (values["column"] == column.key)]
                line[column.label] = _cell(mine, column.digits, seeds)
            if column in paper_columns:
                line[f"{column.label} paper"] = row.paper.get(column.key, "")
        if comparison is not None:
            digits = next(c.digits for c in spec.columns if c.key == spec.compare)
            line.update(significance.columns(comparison, row.label, digits))
        lines.append(line)
    return pd.DataFrame(lines)


_NET_LABELS = {"resnet18": "ResNet-18", "resnet20": "ResNet-20", "resnet34": "ResNet-34", "vgg_small": "VGG-Small"}


def _net_label(net: str) -> str:
    return _NET_LABELS.get(net.split("/")[-1], net)


# ------------------------------------------------------------------ caption
def _recipe_summary(recipe: Recipe) -> str:
    def subset(n: int | None) -> str:
        return "all" if n is None else f"{n:,}"

    def epochs(n: int) -> str:
        return f"{n} epoch{'s' if n != 1 else ''}"

    s1, s2 = recipe.stage1, recipe.stage2
    return (
        f"{recipe.name} (stage 1: {epochs(s1.epochs)}, lr {s1.lr:g}; stage 2: {epochs(s2.epochs)}, lr {s2.lr:g}; "
        f"batch {recipe.batch_size}; {subset(recipe.train_subset)} training / {subset(recipe.test_subset)} test images)"
    )


def _arithmetic(records: list[RunRecord]) -> str:
    """How the runs computed: fp32 or bf16 autocast (with the fused formulas where a run took them), eager or
    torch.compile, channels_last or not, with counts when they differ."""
    kinds: dict[str, int] = {}
    for r in records:
        resolved = r.saved.get("resolved") or {}
        kind = ("bf16 autocast" if resolved.get("amp_bf16") else "fp32") + (", torch.compile" if resolved.get("compile") else "")
        if resolved.get("amp_bf16") and resolved.get("bf16_formulas", "torch") == "fused":  # before 2026-12-02: torch's
            kind += " (fused bf16 formulas)"
        if not resolved.get("amp_bf16") and resolved.get("fp32_formulas") == "fused":  # opt-in since 2026-12-04
            kind += " (fused fp32 formulas)"
        if resolved.get("channels_last"):  # another rounding in the convs: CPU default under bf16 since 2026-12-04
            kind += ", channels_last"
        kinds[kind] = kinds.get(kind, 0) + 1
    if len(kinds) == 1:
        return next(iter(kinds))
    return "; ".join(f"{kind} ({n} runs)" for kind, n in sorted(kinds.items()))


def caption(
    spec: TableSpec, recipe: Recipe, seeds: int, records: list[RunRecord], stopped: str | None = None, compared: bool = False
) -> str:
    """What was measured and how: budget, seeds, data, arithmetic, machines and dates of the runs, the paper's source."""
    data = sorted({r.data_label for r in records}) or [f"{DATASETS[spec.data].name} (no finished runs)"]
    counts = Counter(r.machine_label for r in records)
    machines = [f"{label} ({count} run{'s' if count > 1 else ''})" for label, count in sorted(counts.items())]
    dates = sorted(r.created[:10] for r in records if r.created)
    when = (dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}") if dates else "no runs yet"
    parts = [
        f"Table {spec.number}: {spec.title}.",
        (
            f"Measured by bnnbench with budget {_recipe_summary(recipe)}, n = {seeds} seed{'s' if seeds > 1 else ''} per row "
            "(seed s: the same initial weights and data order in every row; with n > 1 a cell is the mean ± the half-width of "
            "its 95% Student-t interval), values at the last epoch of each stage"
            + (
                "; stage 2 starts from the stage-1 epoch with the best test top-1 (selection on the test set, as upstream)."
                if recipe.stage2_init == "best"
                else " (no selection on the test set)."
            )
        ),
        f"Data: {'; '.join(data)}.",
        f"Arithmetic: {_arithmetic(records)}." if records else "",
        f"Runs made on {'; '.join(machines) or 'no machine yet'}, {when}.",
        f"Reference row: {spec.reference}. {significance.LEGEND}" if compared else "",
        f"Paper: {spec.source}." if spec.source else "",
        *spec.notes,
        *(f"{_net_label(row.net)}, {row.label}: {row.note}." for row in spec.rows if row.note),
        f"Runs not made: {stopped}" if stopped else "",
    ]
    return " ".join(p for p in parts if p)


# ------------------------------------------------------------------ rendering
def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def to_markdown(frame: pd.DataFrame, caption_text: str) -> str:
    """A GitHub Markdown table (numbers right-aligned) under its caption."""
    header = [str(c) for c in frame.columns]
    align = [":--" if c in ("Net", "Method", "W/A") else "--:" for c in header]
    out = io.StringIO()
    out.write(f"{caption_text}\n\n")
    out.write("| " + " | ".join(_md_escape(c) for c in header) + " |\n")
    out.write("| " + " | ".join(align) + " |\n")
    for _, line in frame.iterrows():
        out.write("| " + " | ".join(_md_escape(v) for v in line) + " |\n")
    return out.getvalue()


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_LATEX_RE = re.compile("|".join(re.escape(k) for k in _LATEX_SPECIAL))


_LATEX_SYMBOLS = {"±": r"$\pm$", "Δ": r"$\Delta$", "†": r"$^{\dagger}$", "*": r"$^{*}$"}


def latex_escape(text: str) -> str:
    """Text safe in LaTeX; ``±``, ``Δ`` and the significance markers ``*`` and ``†`` become math."""
    text = _LATEX_RE.sub(lambda m: _LATEX_SPECIAL[m.group()], str(text))
    for symbol, math_text in _LATEX_SYMBOLS.items():
        text = text.replace(symbol, math_text)
    return text


def to_latex(frame: pd.DataFrame, caption_text: str, label: str) -> str:
    """A booktabs ``table`` environment; rows are grouped by network (name on the group's first row)."""
    header = [str(c) for c in frame.columns]
    spec = "".join("l" if c in ("Net", "Method", "W/A") else "r" for c in header)
    out = io.StringIO()
    out.write("% requires \\usepackage{booktabs}\n")
    out.write("\\begin{table}[t]\n\\centering\n\\small\n")
    out.write(f"\\caption{{{latex_escape(caption_text)}}}\n\\label{{{label}}}\n")
    out.write(f"\\begin{{tabular}}{{{spec}}}\n\\toprule\n")
    out.write(" & ".join(latex_escape(c) for c in header) + " \\\\\n\\midrule\n")
    previous = None
    for _, line in frame.iterrows():
        cells = [latex_escape(v) for v in line]
        if previous is not None and line["Net"] != previous:
            out.write("\\midrule\n")
        if line["Net"] == previous:
            cells[0] = ""
        previous = line["Net"]
        out.write(" & ".join(cells) + " \\\\\n")
    out.write("\\bottomrule\n\\end{tabular}\n\\end{table}\n")
    return out.getvalue()


# ------------------------------------------------------------------ the whole table
@dataclass
class TableResult:
    spec: TableSpec
    runs: Plan
    values: pd.DataFrame
    frame: pd.DataFrame
    caption: str
    paths: list[Path]
    stopped: str | None


def make_table(
    spec: TableSpec,
    recipe: Recipe,
    machine: Machine,
    *,
    seeds: int = 1,
    train: bool = True,
    quiet: bool = False,
    log: Callable[[str], None] = print,
    parallel: int | Executor = 1,
) -> TableResult:
    """Match, (train,) measure and write ``<machine.out>/tables/<stem>.{md,tex,csv}`` (and the curves
    figure the spec asks for).

    ``train=False`` only renders what is already in ``<machine.out>/runs``; ``parallel`` trains
    that many runs at once, or through an :class:`~.executors.Executor` (see :func:`execute`);
    ``machine`` is every new run's (data_dir, device, workers, ...).
    """
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    seed_list = list(range(seeds))
    out = Path(machine.out)
    runs = plan(spec.runs, seed_list, recipe, machine)
    stopped = execute(runs.jobs, quiet=quiet, log=log, parallel=parallel).stopped if train else None
    values = measurements(spec, runs, seed_list)
    used = {job.record.run_id: job.record for job in runs.jobs if job.status == "finished"}
    compared = significance.comparison(spec, values, runs, seed_list)
    text = caption(spec, recipe, seeds, list(used.values()), stopped, compared=compared is not None)
    frame = table_frame(spec, values, seeds, compared)
    folder = Path(out) / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    stem = spec.stem
    paths = [folder / f"{stem}.md", folder / f"{stem}.tex", folder / f"{stem}.csv"]
    write_text(paths[0], to_markdown(frame, text))
    write_text(paths[1], to_latex(frame, text, f"tab:bnnbench-{stem}"))
    write_text(paths[2], values.to_csv(index=False))
    if compared is not None:
        paths.append(folder / f"{stem}_stats.csv")
        write_text(paths[-1], compared.reset_index().to_csv(index=False))
    if compared is not None:
        label = next(c.label for c in spec.columns if c.key == spec.compare)
        paths += save_figure(interval_plot(compared, label), Path(out) / "figures", f"{stem}_ci")
    curves = curve_frame(spec, runs, seed_list) if spec.curves else pd.DataFrame()
    if not curves.empty:
        paths += save_figure(training_curves(curves, spec.curves), Path(out) / "figures", f"{stem}_curves")
    return TableResult(spec, runs, values, frame, text, paths, stopped)


PLAN_ACTIONS = {"finished": "use", "diverged": "use (diverged)", "unfinished": "resume", "failed": "resume", "missing": "train"}


def _busy(job: Job) -> str:
    """What the plan says of a run another process is training now (``""`` when none is)."""
    if job.done:
        return ""
    if held_elsewhere(lock_path(job.machine.out, job.key)):
        return ": another process is training it now (this command would wait for it to finish)"
    if job.record is not None and held_elsewhere(job.record.path / RUN_DIRECTORY_LOCK):
        return ": another process is training it now (this command would leave it to that process)"
    return ""


def describe_plan(spec: TableSpec, runs: Plan, seeds: int) -> list[str]:
    """One line per row and seed: the run that would be used, resumed or trained (``--dry-run``),
    then one per teacher run the rows need."""
    lines = []
    for row in spec.rows:
        if row.run is None:
            lines.append(f"{_net_label(row.net):10} {row.label:28} {NOT_IMPLEMENTED}")
            continue
        for seed in range(seeds):
            job: Job = runs.job(row.run, seed)
            action = PLAN_ACTIONS[job.status]
            where = f" {job.record.path}" if job.record is not None else ""
            lines.append(f"{_net_label(row.net):10} {row.label:28} seed {seed}: {action}{where}{_busy(job)}")
    for job in runs.jobs:
        if job.teacher:
            action = PLAN_ACTIONS[job.status]
            where = f" {job.record.path}" if job.record is not None else ""
            label = f"teacher ({job.spec.model.method})"
            lines.append(f"{_net_label(job.spec.model.net):10} {label:28} seed {job.spec.seed}: {action}{where}{_busy(job)}")
    return lines


__all__ = [
    "MISSING",
    "NOT_IMPLEMENTED",
    "TABLE_NUMBERS",
    "Column",
    "Row",
    "TableResult",
    "TableSpec",
    "caption",
    "describe_plan",
    "latex_escape",
    "load_spec",
    "make_table",
    "measurements",
    "parse_spec",
    "table_frame",
    "to_latex",
    "to_markdown",
]
