"""`scaletrain plot` and scaletest.png: the PNG's size, and the drawn data equal metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from scaletrain.cli import main
from scaletrain.plot import (
    DPI,
    PANEL_HEIGHT,
    PANEL_WIDTH,
    REFERENCE_LABEL,
    draw,
    plot_scaletest,
    read_curves,
)


def _write(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    lines = [json.dumps(r) for r in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _record(step: int, loss: float, **extra: float) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3 * step, **extra}


def _runs(tmp_path: Path) -> tuple[Path, Path]:
    # `tp2` was killed after step 4 and resumed from step 2: steps 3 and 4 logged twice.
    tp2 = tmp_path / "tp2"
    records = [_record(s, 5.0 - s / 3) for s in (1, 2, 3, 4)]
    records += [_record(s, 5.0 - s / 4, val_loss=4.5) for s in (3, 4, 5)]
    _write(tp2, records)
    with (tp2 / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # the torn last line of a kill
    pp2 = tmp_path / "pp2"
    _write(pp2, [_record(s, 4.9 - s / 5) for s in range(1, 7)])
    return tp2, pp2


def test_plot_writes_a_png_of_the_panels_and_draws_the_last_record_of_each_step(
    tmp_path: Path, capsys
) -> None:
    tp2, pp2 = _runs(tmp_path)
    out = tmp_path / "cmp.png"
    metrics = "loss,val_loss,lr"
    assert main(["plot", str(tp2), str(pp2), "-o", str(out), "--metrics", metrics, "--log-y"]) == 0
    assert capsys.readouterr().out == f"wrote {out}: 3 panel(s), 2 run(s)\n"
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (PANEL_WIDTH * DPI, 3 * PANEL_HEIGHT * DPI) == (800, 750)

    runs = {d.name: read_curves(d, metrics.split(",")) for d in (tp2, pp2)}
    figure = draw(runs, metrics.split(","), log_y=True)
    loss, val, lr = figure.axes
    drawn = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in loss.lines
    }
    assert drawn == {
        "tp2": ([1, 2, 3, 4, 5], [5 - 1 / 3, 5 - 2 / 3, 5 - 3 / 4, 5 - 4 / 4, 5 - 5 / 4]),
        "pp2": ([1, 2, 3, 4, 5, 6], [4.9 - s / 5 for s in range(1, 7)]),
    }
    assert [(ln.get_label(), list(ln.get_xdata())) for ln in val.lines] == [("tp2", [3, 4, 5])]
    assert list(lr.lines[1].get_ydata()) == [1e-3 * s for s in range(1, 7)]
    assert {ax.get_yscale() for ax in figure.axes} == {"log"}
    assert [ax.get_ylabel() for ax in figure.axes] == ["loss", "val_loss", "lr"]


def test_default_output_and_one_line_errors(tmp_path: Path, capsys) -> None:
    tp2, _ = _runs(tmp_path)
    assert main(["plot", str(tp2)]) == 0
    with Image.open(tp2 / "metrics.png") as image:  # 7 default panels
        assert image.size == (800, 7 * 250)
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "nope")]) == 2
    nope = tmp_path / "nope"
    want = f"plot: {nope / 'metrics.jsonl'} does not exist; is {nope} a training run?\n"
    assert capsys.readouterr().err == want
    assert main(["plot", str(tp2), "--metrics", "bogus"]) == 2
    assert capsys.readouterr().err == "plot: no run logged any of bogus\n"
    assert main(["plot", str(tp2), "-o", str(tmp_path / "x.jpg")]) == 2
    assert capsys.readouterr().err == f"plot: -o {tmp_path / 'x.jpg'} must end in .png\n"


def test_scaletest_png_draws_every_layout_over_the_reference(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    _write(reference, [_record(s, 5.0 - s / 10) for s in range(1, 4)])
    layouts = {}
    for i, name in enumerate(("tp2pp1dp2z1", "tp1pp2dp2z0")):
        layouts[name] = tmp_path / name
        _write(layouts[name], [_record(s, 5.0 - s / 10 + i * 1e-6) for s in range(1, 4)])
    out = tmp_path / "scaletest.png"
    plot_scaletest(out, reference, layouts)
    with Image.open(out) as image:
        assert image.size == (800, 250)
    runs = {n: read_curves(d, ["loss"]) for n, d in {**layouts, REFERENCE_LABEL: reference}.items()}
    (ax,) = draw(runs, ["loss"]).axes
    assert [(ln.get_label(), list(ln.get_ydata())) for ln in ax.lines] == [
        (name, [5.0 - s / 10 + i * 1e-6 for s in range(1, 4)]) for i, name in enumerate(layouts)
    ] + [(REFERENCE_LABEL, [5.0 - s / 10 for s in range(1, 4)])]
