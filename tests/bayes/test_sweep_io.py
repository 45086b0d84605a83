"""Per-method sweep scores round-trip through their files; the sweep table and plot by hand."""
import numpy as np

from metafit.bayes import Diagnostics, MethodScores, load_scores, plot_axis, save_scores, sweep_markdown


def test_scores_round_trip_exactly_with_and_without_diagnostics(tmp_path):
    sampled = MethodScores(np.array([-1.5, -0.25], np.float32), np.array([0.5, 2.0]),
                           [Diagnostics(1.01, 350.5, 0, 600, "theta"), Diagnostics(1.2, 12.0, 3, 600, "phi")],
                           1.25, 9.5)
    closed_form = MethodScores(np.array([-2.0]), np.array([1.0]), None, 0.01, 0.5)
    for name, scores in (("prompt", sampled), ("no_transfer", closed_form)):
        save_scores(tmp_path / f"{name}.npz", scores)
        back = load_scores(tmp_path / f"{name}.npz")
        np.testing.assert_array_equal(back.lpd, scores.lpd)
        assert back.lpd.dtype == scores.lpd.dtype
        np.testing.assert_array_equal(back.mse, scores.mse)
        assert back.diagnostics == scores.diagnostics
        assert (back.seconds, back.compile_seconds) == (scores.seconds, scores.compile_seconds)
    assert load_scores(tmp_path / "missing.npz") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_transfer.npz", "prompt.npz"]  # no temporary left


def rows():
    cell = {"proxy_noise": 0.1, "heterogeneity": 2.0, "prior_misspecification": 0.0}
    return [{**cell, "method": "prompt", "lpd": -1.23456, "lpd_sd": 0.1, "mse": 0.5, "mse_sd": 0.05,
             "neg_transfer_rate": 0.25},
            {**cell, "proxy_noise": 1.0, "method": "prompt", "lpd": -2.0, "lpd_sd": 0.2, "mse": 0.75, "mse_sd": 0.1,
             "neg_transfer_rate": 0.5}]


def test_sweep_markdown_one_row_per_cell_and_method():
    lines = sweep_markdown(rows()).splitlines()
    assert lines[0] == ("| proxy_noise | heterogeneity | prior_misspecification | method | lpd | mse "
                        "| neg. transfer |")
    assert lines[2] == "| 0.1 | 2 | 0 | prompt | -1.235 ± 0.100 | 0.500 ± 0.050 | 0.25 |"
    assert len(lines) == 4


def test_plot_axis_writes_a_png(tmp_path):
    path = plot_axis(rows(), "proxy_noise", tmp_path / "vs_proxy_noise.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
