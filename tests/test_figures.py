"""Figures 2-4 are written as PNG and PDF; Figure 4 and the CLI reject a missing or incomplete sweep."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest

from bnnbench import figures
from bnnbench.commands import figure as figure_command

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_written(paths, out_dir, stem):
    assert [p.name for p in paths] == [f"{stem}.png", f"{stem}.pdf"]
    png, pdf = paths
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5_000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1_000
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in paths)  # no temp files left


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    figure_command.add_arguments(parser)
    return figure_command.main(parser.parse_args(list(argv)))


def test_figure2_is_written(tmp_path):
    fig = figures.figure2(b_values=(0.5, 2.0), samples=5_000)
    assert len(fig.axes) == 2
    assert_written(figures.save_figure(fig, tmp_path, "fig2", dpi=60), tmp_path, "fig2")


def test_figure3_is_written(tmp_path):
    fig = figures.figure3(b_values=(0.05, 0.1), w0_points=(5.0, 20.0), samples=5_000)
    assert_written(figures.save_figure(fig, tmp_path, "fig3", dpi=60), tmp_path, "fig3")


def test_figure3_points_are_biper_quantization_errors():
    from bnnbench.theory import qe_laplace

    # 200k samples: the empirical Eq. 15 error is within ~1e-3 of the closed form
    assert figures.empirical_qe(0.05, 20.0, 200_000, seed=1) == pytest.approx(qe_laplace(1.0), abs=1e-3)


def test_cli_writes_figure2(tmp_path, capsys):
    assert run_cli("2", "--figures-dir", str(tmp_path), "--samples", "2000", "--dpi", "60") == 0
    assert (tmp_path / "fig2_pdf_w_hat.png").read_bytes()[:8] == PNG_MAGIC
    assert "fig2_pdf_w_hat.pdf" in capsys.readouterr().out


def sweep_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    w0 = np.repeat([5.0, 10.0, 20.0, 30.0], 2)
    return pd.DataFrame(
        {
            "w0": w0,
            "stage1_top1": 92 + rng.normal(0, 0.2, w0.size),
            "qe": 0.09 + rng.normal(0, 0.002, w0.size),
            "b": 0.9 / w0,
            "top1": 91 + rng.normal(0, 0.2, w0.size),
            "seed": np.tile([0, 1], 4),
        }
    )


def test_figure4_from_a_sweep_csv(tmp_path):
    csv = tmp_path / "sweep.csv"
    sweep_table().to_csv(csv, index=False)
    out = tmp_path / "figs"
    assert run_cli("4", "--sweep", str(csv), "--figures-dir", str(out), "--dpi", "60") == 0
    assert_written([out / "fig4_frequency_sweep.png", out / "fig4_frequency_sweep.pdf"], out, "fig4_frequency_sweep")
    assert len(figures.figure4(sweep_table()).axes) == 4


def test_figure4_needs_a_sweep(tmp_path):
    with pytest.raises(ValueError, match="pass --sweep CSV with the columns w0, stage1_top1, qe, b, top1"):
        run_cli("4", "--out", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_cli("4", "--sweep", str(tmp_path / "absent.csv"))
    with pytest.raises(ValueError, match="lacks column\\(s\\) b, top1"):
        figures.figure4(sweep_table().drop(columns=["b", "top1"]))
    with pytest.raises(ValueError, match="must be numeric"):
        figures.figure4(sweep_table().assign(qe="n/a"))
    with pytest.raises(ValueError, match="figure 4 only"):
        run_cli("2", "--sweep", "x.csv")
    assert not any(tmp_path.iterdir())
