"""The paper's figures, drawn with matplotlib from what train.py and infer.py --eval write (a tool, not the lesson).

    python figures.py                        # every tutorial figure, from runs/sst-2, into tutorial/figures/
    python figures.py --run runs/rte --out /tmp/rte-figures

`infer.py --eval` draws `plot` (Figures 2, 3, 4 and 6 of the paper in one PNG) beside its tradeoff.csv.
`main` redraws the tutorial's figures: the model (Figure 1), entropy against confidence, each off-ramp
after each stage (Figure 4), where examples exit (Figure 6), measured against expected saving (Figure 3)
and the trade-off (Figure 2), from a run folder holding results.json and tradeoff.csv.
"""

import csv
import json
import math
import sys
from pathlib import Path

from deebert.config import BertConfig
from deebert.errors import DeeBertError, Parser
from deebert.files import write_atomically
from deebert.tradeoff import PAPER_THRESHOLDS


def new_figure(**size):
    """A matplotlib Figure (no pyplot: no GUI backend, no global state), or None when matplotlib is not installed
    (infer.py --eval then writes its CSV only). Imported here, not at the top: matplotlib would add 0.7 s to the
    start of every infer.py run, most of which draw nothing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(**size)


def draw_tradeoff(axes, rows: list[dict], metric: str) -> None:
    """Figure 2: the metric (%) against the expected saving (%), one point per S; S values that land on
    the same spot share one label, so the labels near S = 0 do not print over each other."""
    axes.margins(y=0.35)  # room above the points for their labels
    points = [row for row in rows if row["S"] is not None]
    x = [100 * row["expected_saving"] for row in points]
    y = [100 * row[metric] for row in points]
    axes.plot(x, y, "o-")
    labels, width = [], max(x) - min(x) or 1.0  # [x, y, text]
    for row, xi, yi in zip(points, x, y):
        if labels and abs(labels[-1][0] - xi) < 0.03 * width and abs(labels[-1][1] - yi) < 1:
            labels[-1][2] += f", {row['S']:g}"
        else:
            labels.append([xi, yi, f"S={row['S']:g}"])
    for xi, yi, text in labels:  # slanted, so that neighbouring labels do not run into each other
        axes.annotate(text, (xi, yi), textcoords="offset points", xytext=(2, 4), fontsize=7, rotation=35)
    full = next(row for row in rows if row["S"] is None)
    axes.axhline(100 * full[metric], linestyle="--", color="grey", linewidth=1, label="full model")
    axes.legend(loc="lower left", fontsize=8)
    axes.set(xlabel="expected saving of layers (%)", ylabel=f"{metric} (%)", title="quality against saving")


def draw_measured(axes, timing: list[dict]) -> None:
    """Figure 3: the measured wall-clock saving against the expected one, with spreads; the diagonal is 1:1."""
    for batch_size in dict.fromkeys(row["batch_size"] for row in timing):
        points = [row for row in timing if row["batch_size"] == batch_size and row["S"] is not None]
        axes.errorbar([100 * r["expected_saving"] for r in points], [100 * r["measured_saving"] for r in points],
                      yerr=[100 * r["spread"] for r in points], fmt="o", capsize=2, label=f"batch {batch_size}")
    axes.axline((0, 0), slope=1, color="grey", linestyle="--", linewidth=1)
    axes.legend(fontsize=8)
    axes.set(xlabel="expected saving (%)", ylabel="measured saving (%)", title="wall clock against layer count")


def draw_per_layer(axes, per_layer: dict, metric: str) -> None:
    """Figure 4: each off-ramp's metric, for every {name: per-layer metrics} given (e.g. after each stage)."""
    for name, metrics in per_layer.items():
        axes.plot(range(1, len(metrics) + 1), [100 * m[metric] for m in metrics], "o-", label=name)
    axes.legend(fontsize=8)
    axes.set(xlabel="off-ramp (layer)", ylabel=f"{metric} (%)", title="each off-ramp alone")


def draw_exits(axes, rows: list[dict], count: int = 4) -> None:
    """Figure 6: how many examples exit at each layer, for a few S spread over the sweep."""
    points = [row for row in rows if row["S"]]
    picks = dict.fromkeys(round(k * (len(points) - 1) / max(1, count - 1)) for k in range(min(count, len(points))))
    shown = [points[k] for k in picks]
    width = 0.8 / max(1, len(shown))
    for k, row in enumerate(shown):
        layers = range(1, len(row["exits_per_layer"]) + 1)
        axes.bar([i + (k - (len(shown) - 1) / 2) * width for i in layers], row["exits_per_layer"], width,
                 label=f"S={row['S']:g}")
    axes.legend(fontsize=8)
    axes.set(xlabel="exit layer", ylabel="examples", title="where examples exit")


def plot(path, rows: list[dict], metric: str, per_layer: dict | None = None, timing: list[dict] | None = None):
    """The paper's figures in one PNG: 2 (trade-off), 6 (exits per layer), 4 (each off-ramp), 3 (measured vs
    expected, when timed). Returns the path, or None when matplotlib is not installed (the CSV has it all)."""
    panels = [lambda a: draw_tradeoff(a, rows, metric), lambda a: draw_exits(a, rows)]
    if per_layer:
        panels.append(lambda a: draw_per_layer(a, per_layer, metric))
    if timing:
        panels.append(lambda a: draw_measured(a, [row for row in timing if row["S"] is not None]))
    figure = new_figure(figsize=(11, 8 if len(panels) > 2 else 4), dpi=110)
    if figure is None:
        return None
    for k, draw in enumerate(panels, start=1):
        axes = figure.add_subplot(2 if len(panels) > 2 else 1, 2, k)
        draw(axes)
        axes.grid(alpha=0.3)
    return save(figure, path)


def save(figure, path) -> Path:
    figure.tight_layout()
    return write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))


# ----------------------------------------------------------------------------------------------------
# The tutorial's figures, from a run folder


def read_rows(path) -> list[dict]:
    """tradeoff.csv -> the rows infer.py wrote: S None for "full", numbers as floats, "3 1 0" as a list."""
    def value(key, text):
        if key == "S" and text == "full":
            return None
        if key == "exits_per_layer":
            return [int(x) for x in text.split()]
        return float(text) if text else None

    with open(path, newline="", encoding="utf-8") as f:
        return [{key: value(key, text) for key, text in row.items()} for row in csv.DictReader(f)]


def timing_rows(rows: list[dict]) -> list[dict]:
    """The wall-clock columns of tradeoff.csv (measured_saving_batch1, ...) back as one row per S and batch size."""
    sizes = [key.removeprefix("measured_saving_batch") for key in rows[0] if key.startswith("measured_saving_batch")]
    return [{"S": row["S"], "batch_size": int(B), "measured_saving": row[f"measured_saving_batch{B}"],
             "spread": row[f"spread_batch{B}"], "expected_saving": row[f"expected_saving_batch{B}"]}
            for B in sizes for row in rows if row["S"] is not None]


def draw_model(axes, config: BertConfig) -> None:
    """Figure 1: embeddings, then n grey layers, an orange off-ramp after each, blue exits."""
    from matplotlib import patches  # only once a figure exists: matplotlib is installed

    n = config.num_hidden_layers

    def box(x, y, width, color, text):
        axes.add_patch(patches.Rectangle((x, y), width, 0.6, color=color))
        axes.text(x + width / 2, y + 0.3, text, ha="center", va="center", fontsize=8)

    def arrow(start, end, color="black"):
        axes.annotate("", end, start, arrowprops={"arrowstyle": "->", "color": color})

    box(0, 0, 1.6, "#cfe3f7", "embeddings")
    for i in range(1, n + 1):
        y = 0.9 * i
        box(0, y, 1.6, "#bbbbbb", f"layer {i}")
        box(2.3, y, 1.5, "#f5a623", f"off-ramp {i}")
        arrow((0.8, y - 0.3), (0.8, y))  # the hidden state goes up
        arrow((1.6, y + 0.3), (2.3, y + 0.3))  # and into the off-ramp
        arrow((3.8, y + 0.3), (4.5, y + 0.3), "#1f77b4")
        axes.text(4.6, y + 0.3, "answer" if i == n else "exit if entropy < S", va="center", fontsize=8, color="#1f77b4")
    axes.set(xlim=(-0.2, 6.6), ylim=(-0.2, 0.9 * n + 0.8), title=f"DeeBERT on a {n}-layer BERT (hidden {config.hidden_size})")
    axes.axis("off")


def binary_entropy(p: float) -> float:
    return -p * math.log(p) - (1 - p) * math.log(1 - p)


def draw_entropy(axes) -> None:
    """Binary entropy against the top class's probability, each of the paper's thresholds S marked where
    the curve crosses it: an input exits when its top class is more probable than that."""
    p = [0.5 + 0.4999 * k / 400 for k in range(401)]
    axes.plot([100 * x for x in p], [binary_entropy(x) for x in p])
    for S in [S for S in PAPER_THRESHOLDS if S >= 0.05 and S < math.log(2)]:
        low, high = 0.5, 1 - 1e-12  # entropy falls from ln 2 to 0 here: bisect for entropy = S
        for _ in range(60):
            low, high = ((low + high) / 2, high) if binary_entropy((low + high) / 2) > S else (low, (low + high) / 2)
        axes.plot(100 * low, S, "o", color="#f5a623")
        axes.annotate(f"S={S:g}: {100 * low:.1f}%", (100 * low, S), textcoords="offset points", xytext=(5, 2), fontsize=7)
    axes.set(xlabel="probability of the top class (%)", ylabel="entropy (nats)",
             title="two classes: an input exits when entropy < S")


def main(argv=None) -> None:
    parser = Parser(prog="figures.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/sst-2", help="a run folder: config.json, results.json, tradeoff.csv (default: %(default)s)")
    parser.add_argument("--out", default="tutorial/figures", help="where the PNGs go (default: %(default)s)")
    args = parser.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    draws = {"model": lambda a: draw_model(a, BertConfig.from_file(run / "config.json")), "entropy": draw_entropy}
    if (run / "results.json").is_file():  # written by train.py
        results = json.loads((run / "results.json").read_text())
        metric = next(iter(results["stage1" if "stage1" in results else "stagejoint"]["dev_per_layer"][0]))
        per_layer = {f"after stage {k[5:]}": v["dev_per_layer"] for k, v in results.items() if k.startswith("stage")}
        joint = run.with_name(run.name + "-joint") / "results.json"  # train.py --joint --output_dir <run>-joint
        if joint.is_file():
            per_layer["joint training (not the paper)"] = json.loads(joint.read_text())["stagejoint"]["dev_per_layer"]
        draws["off-ramps"] = lambda a: draw_per_layer(a, per_layer, metric)
    if (run / "tradeoff.csv").is_file():  # written by infer.py --eval
        rows = read_rows(run / "tradeoff.csv")
        metric = list(rows[0])[1]
        draws.update({"tradeoff": lambda a: draw_tradeoff(a, rows, metric), "exits": lambda a: draw_exits(a, rows)})
        if any(key.startswith("measured_saving_batch") for key in rows[0]):
            draws["measured"] = lambda a: draw_measured(a, timing_rows(rows))
    for name, draw in draws.items():
        figure = new_figure(figsize=(6, 6 if name == "model" else 4), dpi=110)
        if figure is None:
            raise DeeBertError("figures.py draws with matplotlib, which is not installed; pip install matplotlib")
        axes = figure.add_subplot()
        draw(axes)
        if name != "model":
            axes.grid(alpha=0.3)
        print(f"wrote {save(figure, out / f'{name}-{run.name}.png')}")
    missing = {"off-ramps": "results.json (train.py)", "tradeoff": "tradeoff.csv (infer.py --eval)"}
    for name, source in missing.items():
        if name not in draws:
            print(f"skipped {name}: {run} has no {source}")


if __name__ == "__main__":
    try:
        main()
    except DeeBertError as error:  # a run folder without config.json, no matplotlib: one line
        sys.exit(error.report())
