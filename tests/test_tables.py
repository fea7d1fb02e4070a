"""Tables from small real runs: specs, matching and reuse, Markdown/LaTeX rendering, missing and
diverged runs, the paper's four table specs, ImageNet without data, the Figure 4 sweep."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tomllib
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

import bnnbench
from bnnbench import figures
from bnnbench.cli import main as cli_main
from bnnbench.runners.experiments import execute, plan
from bnnbench.runners.spec import Machine, RunSpec
from bnnbench.runners.sweep import sweep_frame, sweep_runs
from bnnbench.runners.tables import NOT_IMPLEMENTED, curve_frame, load_spec, make_table, parse_spec
from bnnbench.theory import qe_laplace
from tiny import tiny_recipe

SPEC = """
number = "demo"
title = "Demo on digits"
data = "digits"
source = "a test"
notes = ["A note for the caption."]

[[columns]]
key = "top1"
label = "Top-1 (%)"

[[columns]]
key = "stage1_qe"
label = "Stage 1 QE (Eq. 15)"
value = "qe"
stage = 1
digits = 4

[[rows]]
net = "resnet20"
label = "BiPer"
wa = "1/1"
method = "biper"
paper = { top1 = "87.5", stage1_qe = "0.0584" }

[[rows]]
net = "resnet20"
label = "sign-STE real acts"
wa = "1/32"
method = "sign-ste"
binary_activations = false

[[rows]]
net = "resnet20"
label = "RAD"
wa = "1/1"
paper = { top1 = "90.5" }
"""


def run_dirs(out: Path) -> dict[str, float]:
    """Run directory name -> mtime of its final.json (0 when unfinished)."""
    runs = out / "runs"
    if not runs.is_dir():
        return {}
    return {p.name: (p / "final.json").stat().st_mtime if (p / "final.json").is_file() else 0.0 for p in runs.iterdir()}


def quiet_log(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo table rendered before any run exists, then with 2 seeds trained (4 tiny runs)."""
    root = tmp_path_factory.mktemp("tables")
    spec_path = root / "demo.toml"
    spec_path.write_text(SPEC)
    out = root / "results"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        empty = make_table(load_spec(spec_path), tiny_recipe(), Machine(out=str(out)), seeds=2, train=False, log=quiet_log)
        empty_md = empty.paths[0].read_text()
        empty_csv = pd.read_csv(empty.paths[2])
        runs_after_empty = run_dirs(out)
        trained = make_table(load_spec(spec_path), tiny_recipe(), Machine(out=str(out)), seeds=2, quiet=True, log=quiet_log)
    finally:
        torch.set_num_threads(before)
    return {"spec": spec_path, "out": out, "empty_md": empty_md, "empty_csv": empty_csv, "runs_after_empty": runs_after_empty, "trained": trained}


def markdown_rows(md: str, net: str = "ResNet-20") -> dict[str, list[str]]:
    """Method label -> cells of the Markdown table lines of one network."""
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| :--") and not line.startswith("| Net"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            if cells[0] == net:
                rows[cells[1]] = cells
    return rows


def test_before_training_every_run_is_missing_never_zero(demo):
    assert demo["runs_after_empty"] == {}
    rows = markdown_rows(demo["empty_md"])
    assert rows["BiPer"][3:] == ["missing", "87.5", "missing", "0.0584"]
    assert rows["sign-STE real acts"][3:] == ["missing", "", "missing", ""]
    assert rows["RAD"][3:] == [NOT_IMPLEMENTED, "90.5", NOT_IMPLEMENTED, ""]
    assert set(demo["empty_csv"]["status"]) == {"missing"} and demo["empty_csv"]["value"].isna().all()


def test_markdown_and_latex_have_every_row_the_paper_column_and_the_measured_values(demo):
    result = demo["trained"]
    md, tex = result.paths[0].read_text(), result.paths[1].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Net"))
    assert header == "| Net | Method | W/A | Top-1 (%) | Top-1 (%) paper | Stage 1 QE (Eq. 15) | Stage 1 QE (Eq. 15) paper |"
    rows = markdown_rows(md)
    assert list(rows) == ["BiPer", "sign-STE real acts", "RAD"]
    # the BiPer cell is mean ± half-width of the 95% Student-t interval over the two seeds' final top-1, read from the runs
    finals = {}
    for path in (demo["out"] / "runs").iterdir():
        final, config = json.loads((path / "final.json").read_text()), json.loads((path / "config.json").read_text())
        finals.setdefault(config["spec"]["model"]["method"], []).append(final["final_test_top1"])
    top1 = finals["biper"]
    half = scipy.stats.t.ppf(0.975, len(top1) - 1) * statistics.stdev(top1) / math.sqrt(len(top1))
    assert rows["BiPer"][3] == f"{statistics.mean(top1):.2f} ± {half:.2f}"
    assert rows["BiPer"][4] == "87.5" and rows["BiPer"][6] == "0.0584"
    assert "±" in rows["sign-STE real acts"][3] and "±" in rows["sign-STE real acts"][5]
    assert rows["RAD"][3] == NOT_IMPLEMENTED and rows["RAD"][4] == "90.5"
    assert "missing" not in md
    for text in ("\\toprule", "\\midrule", "\\bottomrule", "\\begin{tabular}{lllrrrr}", "87.5", "0.0584", "90.5", NOT_IMPLEMENTED, "$\\pm$"):
        assert text in tex, text
    for label in rows:
        assert f"& {label} &" in tex
    assert "Top-1 (\\%) paper" in tex
    today = date.today().isoformat()
    for text in ("budget quick", "48 training / 30 test images", "2 seeds", "digits", today, "A note for the caption.", "Paper: a test."):
        assert text in result.caption, text
    assert result.caption in md


def test_csv_names_the_run_of_every_number(demo):
    values = pd.read_csv(demo["trained"].paths[2])
    assert len(values) == 2 * 2 * 2  # our rows x columns x seeds
    assert set(values["status"]) == {"finished"} and values["value"].notna().all()
    assert set(values["run_id"]) == set(run_dirs(demo["out"]))
    biper = values[values["label"] == "BiPer"].set_index(["column", "seed"])["paper"]
    assert biper[("top1", 1)] == 87.5 and biper[("stage1_qe", 0)] == 0.0584
    assert values[values["label"] != "BiPer"]["paper"].isna().all()


def test_matching_runs_are_reused_not_retrained(demo):
    before = run_dirs(demo["out"])
    assert len(before) == 4 and all(before.values())
    again = make_table(load_spec(demo["spec"]), tiny_recipe(), Machine(out=str(demo["out"])), seeds=2, log=quiet_log)
    assert run_dirs(demo["out"]) == before  # no new directory, no final.json rewritten
    assert {job.status for job in again.runs.jobs} == {"finished"}
    assert again.paths[0].read_text() == demo["trained"].paths[0].read_text().replace(demo["trained"].caption, again.caption)


def test_another_budget_or_hyper_parameter_does_not_match(demo):
    recipe = tiny_recipe()
    recipe.stage1.lr = 0.05
    spec = load_spec(demo["spec"])
    assert {job.status for job in plan(spec.runs, [0], recipe, Machine(out=str(demo["out"]))).jobs} == {"missing"}
    other = RunSpec.make("digits", net="resnet20", method="biper", hparams={"w0": 10.0})
    default = RunSpec.make("digits", net="resnet20", method="biper", hparams={"w0": "20"})  # the default, as text: same model
    runs = plan([other, default], [0], tiny_recipe(), Machine(out=str(demo["out"])))
    assert runs.job(other, 0).status == "missing" and runs.job(default, 0).status == "finished"


def copy_biper_run(demo, target: Path) -> Path:
    source = next(p for p in (demo["out"] / "runs").iterdir() if "biper" in p.name and "-s0-" in p.name)
    copy = target / "runs" / source.name
    shutil.copytree(source, copy)
    return copy


def test_unfinished_run_is_missing_then_resumed_in_place(demo, tmp_path):
    out = tmp_path / "results"
    copy = copy_biper_run(demo, out)
    (copy / "final.json").unlink()
    spec = load_spec(demo["spec"])
    rendered = make_table(spec, tiny_recipe(), Machine(out=str(out)), train=False, log=quiet_log)
    assert markdown_rows(rendered.paths[0].read_text())["BiPer"][3] == "missing"
    resumed = make_table(spec, tiny_recipe(), Machine(out=str(out)), quiet=True, log=quiet_log)
    assert (copy / "final.json").is_file()  # finished in its own directory ...
    assert sum("biper" in name for name in run_dirs(out)) == 1  # ... not trained again elsewhere
    assert markdown_rows(resumed.paths[0].read_text())["BiPer"][3] != "missing"


def test_diverged_run_is_shown_as_diverged_and_not_retrained(demo, tmp_path):
    out = tmp_path / "results"
    copy = copy_biper_run(demo, out)
    (copy / "final.json").unlink()
    (copy / "failure.json").write_text(json.dumps({"error": "the training loss is nan", "type": "TrainingDiverged"}))
    data = tomllib.loads(SPEC)
    spec = parse_spec({**data, "rows": data["rows"][:1]})  # the BiPer row alone
    result = make_table(spec, tiny_recipe(), Machine(out=str(out)), log=quiet_log)
    assert markdown_rows(result.paths[0].read_text())["BiPer"][3] == "diverged"
    assert list(run_dirs(out)) == [copy.name] and not (copy / "final.json").exists()


def test_a_run_diverging_in_its_first_epoch_is_shown_as_diverged(tmp_path):
    """It leaves no run directory (nothing finished to keep), and the table still says why there is no number."""
    data = tomllib.loads(SPEC)
    spec = parse_spec({**data, "rows": data["rows"][:1]})  # the BiPer row alone
    recipe = tiny_recipe()
    recipe.stage1.lr = 1e30
    result = make_table(spec, recipe, Machine(out=str(tmp_path)), quiet=True, log=quiet_log)
    assert markdown_rows(result.paths[0].read_text())["BiPer"][3] == "diverged"
    assert not list(run_dirs(tmp_path))


def test_spec_errors_name_the_row():
    data = tomllib.loads(SPEC)
    bad_wa = {**data, "rows": [{**data["rows"][0], "wa": "1/32"}]}
    with pytest.raises(ValueError, match=r"row 1 \(BiPer\): wa = '1/32' but method 'biper'.* is 1/1"):
        parse_spec(bad_wa)
    with pytest.raises(ValueError, match=r"row 1 \(BiPer\): unknown key\(s\) methd"):
        parse_spec({**data, "rows": [{"net": "resnet20", "label": "BiPer", "wa": "1/1", "methd": "biper"}]})
    with pytest.raises(ValueError, match=r"row 1 \(X\): .*unknown method"):
        parse_spec({**data, "rows": [{"net": "resnet20", "label": "X", "wa": "1/1", "method": "nope"}]})
    with pytest.raises(ValueError, match=r"paper values for unknown column\(s\) top5"):
        parse_spec({**data, "rows": [{"net": "resnet20", "label": "Y", "wa": "1/1", "paper": {"top5": "1"}}]})
    with pytest.raises(ValueError, match="tables 1, 2, 3, 4, not 5"):
        load_spec(5)


# ---------------------------------------------------------------- the paper's tables
def paper_rows(spec) -> dict[tuple[str, str], dict[str, str]]:
    return {(row.net, row.label): row.paper for row in spec.rows if row.paper}


def test_the_four_specs_hold_the_papers_numbers_and_every_method():
    t1, t2, t3, t4 = (load_spec(n) for n in (1, 2, 3, 4))
    row = t1.rows[0]
    assert (row.net, row.run.model.method, row.run.model.hparams["periodic"]) == ("resnet18", "biper", False)
    assert row.paper == {"stage1_top1": "93.93", "stage1_qe": "0.2351", "stage2_top1": "93.01", "stage2_qe": "0.0584"}
    assert [c.stage for c in t1.columns] == [1, 1, 1, 2, 2, 2]

    assert [(r.label, r.paper["top1"], r.run is not None) for r in t2.rows] == [
        ("FP", "91.7", True), ("DoReFa", "90.0", True), ("LQ-Net", "90.1", True), ("DSQ", "90.2", True),
        ("IR-Net", "90.8", True), ("LCR-BNN", "91.20", True), ("BiPer", "91.20", True),
    ]  # fmt: skip
    assert all(not r.run.model.binary_activations for r in t2.rows if r.run and r.label != "FP")

    p3 = paper_rows(t3)
    assert len(p3) == 10 + 7 + 10
    assert p3[("resnet18", "BiPer")] == {"top1": "93.75"} and p3[("resnet18", "ReSTE")] == {"top1": "92.63"}
    assert p3[("resnet20", "DoReFa")] == {"top1": "79.3"} and p3[("vgg_small", "BNN")] == {"top1": "89.9"}
    p4 = paper_rows(t4)
    assert len(p4) == 14 + 8  # every row of the paper's Table 4
    assert p4[("resnet18", "BiPer")] == {"top1": "61.4", "top5": "83.14"}
    assert p4[("resnet18", "FDA")] == {"top1": "60.2", "top5": "82.3"} and p4[("resnet34", "DIR-Net")] == {"top1": "64.1", "top5": "85.3"}
    # a paper row bnnbench does not run says why (in the caption's notes)
    absent = {(r.net, r.label): r.note for spec in (t2, t3, t4) for r in spec.rows if r.run is None}
    assert absent and all(absent.values()), [k for k, v in absent.items() if not v]
    assert "1W/2A" in absent[("resnet18", "HWGQ")] and "trained BNN" in absent[("resnet18", "MST")]
    assert p4[("resnet34", "ReSTE")] == {"top1": "65.05", "top5": "85.78"}
    mapped = {(r.net, r.label): r.run.model.method for r in t3.rows if r.run and r.paper}
    assert mapped[("vgg_small", "BNN")] == "clip-ste" and mapped[("vgg_small", "XNOR-Net")] == "xnor"
    for spec, nets in ((t3, ("resnet18", "resnet20", "vgg_small")), (t4, ("resnet18", "resnet34"))):
        for net in nets:
            methods = [r.run.model.method for r in spec.rows if r.net == net and r.run]
            assert sorted(methods) == bnnbench.list_methods(), (spec.number, net)  # each once, all of them


def test_table4_without_imagenet_writes_all_missing_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BNNBENCH_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "results"
    assert cli_main(["table", "4", "--out", str(out), "--budget", "quick", "--quiet"]) == 2
    assert "no ImageNet found" in capsys.readouterr().err
    rows = markdown_rows((out / "tables" / "table4.md").read_text(), "ResNet-18")
    assert rows["BiPer"][3:] == ["missing (data not found)", "61.4", "missing (data not found)", "83.14"]
    assert rows["PCNN"][3] == NOT_IMPLEMENTED and rows["Bi-Real"][3] == "missing (data not found)"  # Bi-Real: the bireal method
    assert rows["RBNN"][3] == "missing (data not found)"  # the rbnn method
    assert run_dirs(out) == {}
    assert cli_main(["table", "4", "--out", str(out), "--no-run"]) == 0
    assert markdown_rows((out / "tables" / "table4.md").read_text(), "ResNet-34")["BiPer"][3] == "missing"


def test_dry_run_lists_the_plan_and_writes_nothing(demo, tmp_path, capsys):
    assert cli_main(["table", str(demo["spec"]), "--out", str(tmp_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "0 of 2 runs available; 2 to train or resume (budget quick)"
    assert any("RAD" in line and NOT_IMPLEMENTED in line for line in lines)
    assert not any(tmp_path.iterdir())


def test_dry_run_says_which_runs_another_process_is_training(demo, tmp_path, capsys):
    """A run whose lock another process holds is marked in the plan (here the lock is held through a second
    open file, which flock treats like another process); the probe creates and changes no file."""
    from filelock import FileLock

    from bnnbench.runners.locks import held_elsewhere, lock_path
    from bnnbench.runners.recipes import get_recipe

    spec = load_spec(str(demo["spec"]))
    job = plan(spec.runs, [0], get_recipe("quick", spec.family), Machine(out=str(tmp_path))).jobs[0]
    lock = lock_path(tmp_path, job.key)
    assert not held_elsewhere(lock) and not lock.exists()
    lock.parent.mkdir(parents=True)
    with FileLock(lock):
        assert held_elsewhere(lock)
        assert cli_main(["table", str(demo["spec"]), "--out", str(tmp_path), "--dry-run"]) == 0
    assert not held_elsewhere(lock) and lock.stat().st_size == 0
    busy = [line for line in capsys.readouterr().out.splitlines() if "another process is training it now" in line]
    assert len(busy) == 1 and "train: another process" in busy[0] and "wait for it to finish" in busy[0]
    assert sorted(tmp_path.rglob("*")) == [lock.parent, lock]


def test_table2_on_the_cifar10_jpeg_copy(cifar10_dir, tmp_path):
    recipe = tiny_recipe()
    recipe.train_subset, recipe.test_subset = 40, 30
    result = make_table(load_spec(2), recipe, Machine(out=str(tmp_path), data_dir=str(cifar10_dir)), quiet=True, log=quiet_log)
    assert "Data: CIFAR-10 (JPEG q75 copy)." in result.caption
    rows = markdown_rows(result.paths[0].read_text())
    assert list(rows) == ["FP", "DoReFa", "LQ-Net", "DSQ", "IR-Net", "LCR-BNN", "BiPer"]
    for label in ("FP", "DoReFa", "LQ-Net", "DSQ", "IR-Net", "BiPer"):
        assert rows[label][3].replace(".", "").isdigit(), rows[label]
    # LCR-BNN's teacher here trained 3 steps: in eval mode its BatchNorm still has nearly its initial
    # statistics, its features are unnormalised, and the Lipschitz loss (quartic in them) diverges
    assert rows["LCR-BNN"][3] == "diverged" or rows["LCR-BNN"][3].replace(".", "").isdigit(), rows["LCR-BNN"]
    configs = [json.loads((p / "config.json").read_text()) for p in (tmp_path / "runs").iterdir()]
    acts = {c["spec"]["model"]["method"]: c["model"]["binary_activations"] for c in configs}
    # a run diverging before its first epoch ends leaves no directory (on some CPUs LCR-BNN's does, at the first evaluation)
    kept = "lcr-rbnn" in acts
    assert kept or rows["LCR-BNN"][3] == "diverged"
    expected = {"fp": False, "dorefa": False, "lqnet": False, "dsq": False, "irnet": False, "biper": False}
    assert acts == ({**expected, "lcr-rbnn": False} if kept else expected)
    assert len(configs) == 6 + kept  # the FP row's run is LCR-BNN's teacher
    if kept:
        (lcr,) = [c for c in configs if c["spec"]["model"]["method"] == "lcr-rbnn"]
        (fp,) = [c for c in configs if c["spec"]["model"]["method"] == "fp"]
        assert lcr["resolved"]["teacher"]["run"].endswith(fp["run_id"])


# ---------------------------------------------------------------- Figure 4 sweep
def test_frequency_sweep_reuses_runs_and_feeds_figure4(demo):
    experiments = sweep_runs([20.0, 5.0], data="digits")
    runs = plan(experiments, [0], tiny_recipe(), Machine(out=str(demo["out"])))
    assert [runs.job(e, 0).status for e in experiments] == ["finished", "missing"]  # w0 = 20 is the table's BiPer run
    execute(runs.jobs, quiet=True, log=quiet_log)
    sweep = sweep_frame(experiments, runs, [0])
    assert list(sweep["w0"]) == [20.0, 5.0]
    assert sweep[list(figures.SWEEP_COLUMNS)].notna().all().all()
    table_run = runs.job(experiments[0], 0).record
    assert sweep["top1"].iloc[0] == table_run.final["final_test_top1"]
    assert sweep["b"].iloc[0] == pytest.approx(table_run.stage_end(1)["laplace_b"])
    # the theory line averages the per-layer predictions, as the logged QE averages per-layer QEs
    layers = table_run.layers[(table_run.layers["stage"] == 1) & (table_run.layers["epoch"] == table_run.stage_end(1)["epoch"])]
    expected = statistics.mean(float(qe_laplace(20.0 * b)) for b in layers["laplace_b"])
    assert sweep["qe_theory"].iloc[0] == pytest.approx(expected)
    assert sweep["qe_theory"].iloc[0] != pytest.approx(float(qe_laplace(20.0 * sweep["b"].iloc[0])))
    assert len(figures.figure4(sweep).axes) == 4


def test_figure4_cli_without_finished_runs_says_how(tmp_path):
    with pytest.raises(ValueError, match="no finished sweep runs"):
        cli_main_raising(["figure", "4", "--budget", "quick", "--no-run", "--results", str(tmp_path), "--out", str(tmp_path / "fig")])


def cli_main_raising(argv: list[str]) -> int:
    """The parsed command's main, so errors surface as exceptions (cli.main turns them into exit 2)."""
    from bnnbench.cli import build_parser

    args = build_parser().parse_args(argv)
    return args._main(args)


def test_parallel_workers_reproduce_the_sequential_runs(demo, tmp_path):
    """Two worker processes train the demo table's runs; every number equals the sequential runs'."""
    out = tmp_path / "results"
    parallel = make_table(load_spec(demo["spec"]), tiny_recipe(), Machine(out=str(out)), seeds=2, quiet=True, log=quiet_log, parallel=2)
    assert len(run_dirs(out)) == 4 and all(mtime > 0 for mtime in run_dirs(out).values())
    sequential = pd.read_csv(demo["trained"].paths[2]).drop(columns=["run_id"], errors="ignore")
    in_workers = pd.read_csv(parallel.paths[2]).drop(columns=["run_id"], errors="ignore")
    pd.testing.assert_frame_equal(sequential, in_workers)


PLUGIN = '''
from dataclasses import dataclass
import bnnbench

@bnnbench.register_method("test-plugin-ste")
@dataclass
class PluginSTE(bnnbench.Method):
    """sign-STE defined outside the package."""

@bnnbench.register_method("test-plugin-boom")
@dataclass
class Boom(bnnbench.Method):
    """Fails when stage 2 starts."""

    def weight(self, w, progress=0.0, stage=2):
        if stage == 2:
            raise RuntimeError("boom in stage 2")
        return super().weight(w, progress, stage)
'''


def test_parallel_workers_load_plugins_and_a_failing_run_does_not_block_the_others(tmp_path, monkeypatch):
    from bnnbench import registry

    registry.list_methods()  # built-ins and entry points loaded before the copy
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_PLUGINS", [])
    plugin = tmp_path / "plugin_methods.py"
    plugin.write_text(PLUGIN)
    bnnbench.load_plugin(plugin)
    experiments = [RunSpec.make("digits", net="resnet20", method=m) for m in ("test-plugin-ste", "test-plugin-boom")]
    runs = plan(experiments, [0], tiny_recipe(), Machine(out=str(tmp_path / "results")))
    logged: list[str] = []
    outcome = execute(runs.jobs, log=logged.append, parallel=2)
    ok, boom = (runs.job(exp, 0) for exp in experiments)
    assert ok.status == "finished" and outcome.stopped is None
    assert boom.status != "finished" and boom.note == "failed"
    assert any("boom in stage 2" in line for line in logged)


# ---------------------------------------------------------------- named specs and training curves
def test_a_named_spec_with_curves_writes_its_stem_and_the_curves_of_every_finished_run(demo):
    text = SPEC.replace('number = "demo"', 'number = "D"\nname = "demo-curves"\ncurves = ["test_top1", "qe"]')
    spec = parse_spec(tomllib.loads(text))
    result = make_table(spec, tiny_recipe(), Machine(out=str(demo["out"])), seeds=2, train=False, log=quiet_log)
    names = [p.name for p in result.paths]
    assert names == ["demo-curves.md", "demo-curves.tex", "demo-curves.csv", "demo-curves_curves.png", "demo-curves_curves.pdf"]
    assert result.paths[3].parent == demo["out"] / "figures" and result.paths[3].stat().st_size > 10_000
    assert "Table D: Demo on digits." in result.paths[0].read_text()
    curves = curve_frame(spec, result.runs, [0, 1])
    # two finished rows x two seeds x (1 + 1) epochs, each row's label, epochs as logged
    assert len(curves) == 8 and set(curves["label"]) == {"BiPer", "sign-STE real acts"}
    assert sorted(curves.groupby(["label", "seed"]).size()) == [2, 2, 2, 2]
    assert curves.loc[curves["label"] == "BiPer", "qe"].notna().all()


def test_spec_name_and_curves_are_checked():
    data = tomllib.loads(SPEC)
    with pytest.raises(ValueError, match="name 'a/b' is a file stem"):
        parse_spec({**data, "name": "a/b"})
    with pytest.raises(ValueError, match="curves must be a list of metrics.csv column names"):
        parse_spec({**data, "curves": ["qe", 3]})
    with pytest.raises(FileNotFoundError, match="a shipped spec \\(comparison-resnet20, "):
        load_spec("no-such-table")
    frame = pd.DataFrame({"label": ["x"], "stage": [1], "epoch": [1], "qe": [0.1]})
    with pytest.raises(ValueError, match="need the column\\(s\\) flip_rate"):
        figures.training_curves(frame, ["qe", "flip_rate"])


def test_the_comparison_spec_runs_every_method_on_resnet20_with_the_papers_numbers():
    spec, t3 = load_spec("comparison-resnet20"), load_spec(3)
    assert spec.stem == "comparison-resnet20" and spec.curves == ["test_top1", "qe_relative", "flip_rate", "grad_norm_mean"]
    assert {r.net for r in spec.rows} == {"resnet20"}
    assert sorted(r.run.model.method for r in spec.rows) == bnnbench.list_methods()
    biper = next(r for r in spec.rows if r.run.model.method == "biper")
    assert biper.run.model.hparams["w0"] == 20.0
    paper3 = {r.run.model.method: r.paper["top1"] for r in t3.rows if r.net == "resnet20" and r.run and r.paper}
    assert {r.run.model.method: r.paper["top1"] for r in spec.rows if r.paper} == paper3


def test_a_reference_row_adds_paired_statistics_checked_against_scipy(demo, tmp_path):
    """With `reference`, every row gets the paired difference to the reference over seeds (scipy's ttest_rel), McNemar
    on the pooled per-image predictions (statsmodels), Holm, P(best) and the rank interval; Markdown marks them."""
    from statsmodels.stats.contingency_tables import mcnemar

    text = demo["spec"].read_text().replace('source = "a test"', 'source = "a test"\nreference = "sign-STE real acts"')
    spec_path = tmp_path / "demo-stats.toml"
    spec_path.write_text(text)
    result = make_table(load_spec(spec_path), tiny_recipe(), Machine(out=str(demo["out"])), seeds=2, train=False, log=quiet_log)
    stats_csv = pd.read_csv(next(p for p in result.paths if p.name.endswith("_stats.csv"))).set_index("method")
    by_label = {"BiPer": "biper", "sign-STE real acts": "sign-ste"}
    used = result.values[result.values["column"] == "top1"]
    runs = {}
    for label, seed, run_id in zip(used["label"], used["seed"], used["run_id"]):
        if label in by_label:
            path = demo["out"] / "runs" / run_id
            saved = np.load(path / "predictions.npz")
            runs[(by_label[label], seed)] = (json.loads((path / "final.json").read_text())["final_test_top1"], saved["predictions"] == saved["labels"])
    top1 = {label: [runs[(m, s)][0] for s in (0, 1)] for label, m in by_label.items()}
    expected = scipy.stats.ttest_rel(top1["BiPer"], top1["sign-STE real acts"])
    line = stats_csv.loc["BiPer"]
    assert line["diff"] == pytest.approx(statistics.mean(top1["BiPer"]) - statistics.mean(top1["sign-STE real acts"]))
    diffs = np.subtract(top1["BiPer"], top1["sign-STE real acts"])
    if np.ptp(diffs) > 0:
        assert line["p_t"] == pytest.approx(expected.pvalue)
    else:  # 30 test images: both seeds may differ by the same amount, which stats.paired_comparison reports as p = NaN
        assert math.isnan(line["p_t"])
    a = np.concatenate([runs[("biper", s)][1] for s in (0, 1)])
    b = np.concatenate([runs[("sign-ste", s)][1] for s in (0, 1)])
    table = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
    assert line["p_mcnemar"] == pytest.approx(mcnemar(table, exact=True).pvalue)
    assert line["p_mcnemar_holm"] == pytest.approx(line["p_mcnemar"])  # one comparison: Holm changes nothing
    assert stats_csv["p_best"].sum() == pytest.approx(1.0) and set(stats_csv.index) == set(by_label)
    rows = markdown_rows(result.paths[0].read_text())
    assert rows["sign-STE real acts"][-5] == "reference" and rows["BiPer"][-5].startswith(f"{line['diff']:+.2f}")
    assert "Reference row: sign-STE real acts" in result.caption and "Holm" in result.caption


def test_machine_labels_name_what_the_run_recorded_and_captions_count_runs_per_machine():
    """A run that kept only the architecture does not pass for a named CPU; the caption counts runs per machine."""
    from bnnbench.runners.catalog import RunRecord

    def record(machine: dict) -> RunRecord:
        return RunRecord(Path("run"), {"machine": machine}, None, None)

    xeon = {"cpu": "Intel(R) Xeon(R) Processor", "isa": "avx2 avx512f", "cpu_count": 2}
    assert record(xeon).machine_label == "Intel(R) Xeon(R) Processor (avx2 avx512f), 2 cores"
    assert record({"cpu": "x86_64", "cpu_count": 2}).machine_label == "an x86_64 CPU whose model was not recorded, 2 cores"
    assert record({"gpu": "NVIDIA H200"}).machine_label == "NVIDIA H200"
    assert record({}).machine_label == "unknown machine"


def test_the_caption_names_fused_bf16_formulas_and_counts_a_mix():
    from types import SimpleNamespace

    from bnnbench.runners.tables import _arithmetic

    def run(**resolved):
        return SimpleNamespace(saved={"resolved": resolved})

    before = run(amp_bf16=True)  # a config.json of before 2026-12-02: torch's formulas
    fused, unaffected = run(amp_bf16=True, bf16_formulas="fused"), run(amp_bf16=True, bf16_formulas=None)
    assert _arithmetic([before, unaffected]) == "bf16 autocast"
    assert _arithmetic([fused]) == "bf16 autocast (fused bf16 formulas)"
    assert _arithmetic([before, fused, run(amp_bf16=False)]) == "bf16 autocast (1 runs); bf16 autocast (fused bf16 formulas) (1 runs); fp32 (1 runs)"
    fp32 = [run(amp_bf16=False, fp32_formulas=f) for f in ("fused", "torch", None)]  # None: the choice changed nothing
    assert _arithmetic(fp32[:1]) == "fp32 (fused fp32 formulas)" and _arithmetic(fp32[1:]) == "fp32"
    layouts = [run(amp_bf16=True, bf16_formulas="fused", channels_last=last) for last in (True, False)]  # RAD's NCHW
    assert _arithmetic(layouts) == "bf16 autocast (fused bf16 formulas) (1 runs); bf16 autocast (fused bf16 formulas), channels_last (1 runs)"
