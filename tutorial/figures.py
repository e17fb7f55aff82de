"""The tutorial's figures, drawn with matplotlib from what train.py and infer.py --eval write into a run folder.

    python tutorial/figures.py                        # every figure, from runs/sst-2, into tutorial/figures/
    python tutorial/figures.py --run runs/rte --out /tmp/rte-figures

The model (the paper's Figure 1), entropy against confidence, each off-ramp after each stage (Figure 4), where
examples exit (Figure 6), measured against expected saving (Figure 3), the trade-off with the static models
(Figure 2), the exit rules compared, and early exit's compaction of a batch. The panels of the trade-off are
deebert/plot.py's, which `infer.py --eval` draws into one PNG; the others only the tutorial needs.
"""

import csv
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: the package is the repository's

from deebert import plot
from deebert.config import BertConfig
from deebert.errors import DeeBertError, Parser
from deebert.glue import get_task
from deebert.tradeoff import PAPER_THRESHOLDS


def read_csv(path) -> list[dict]:
    """A CSV infer.py wrote -> its rows: S None for "full", numbers as floats, "3 1 0" as a list of ints."""
    def value(key, text):
        if key == "S" and text == "full":
            return None
        if key == "rule":
            return text
        if key == "exits_per_layer":
            return [int(x) for x in text.split()]
        return float(text) if text else None

    with open(path, newline="", encoding="utf-8") as f:
        return [{key: value(key, text) for key, text in row.items()} for row in csv.DictReader(f)]


def timing_rows(rows: list[dict]) -> list[dict]:
    """tradeoff.csv's wall-clock columns (measured_saving_batch1, ...) back as one row per S and batch size."""
    sizes = [key.removeprefix("measured_saving_batch") for key in rows[0] if key.startswith("measured_saving_batch")]
    return [{"S": row["S"], "batch_size": int(B), "measured_saving": row[f"measured_saving_batch{B}"],
             "spread": row[f"spread_batch{B}"], "expected_saving": row[f"expected_saving_batch{B}"]}
            for B in sizes for row in rows if row["S"] is not None]


def rules_of(points: list[dict]) -> dict:
    """rules.csv's rows -> {rule: {"points": its rows}}, as deebert.tradeoff.compare_rules gives them."""
    rules = {}
    for point in points:
        rules.setdefault(point["rule"], {"points": []})["points"].append(point)
    return rules


JOINT = "joint training (not the paper)"
STAGES = {"stage1": "after stage 1", "stage2": "after stage 2", "joint": JOINT,
          "stagejoint": JOINT}  # "stagejoint": how results.json named "joint" before the stages had names


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
        box(2.3, y, 1.5, plot.ORANGE, f"off-ramp {i}")
        arrow((0.8, y - 0.3), (0.8, y))  # the hidden state goes up
        arrow((1.6, y + 0.3), (2.3, y + 0.3))  # and into the off-ramp
        arrow((3.8, y + 0.3), (4.5, y + 0.3), plot.BLUE)
        text = "answer" if i == n else "exit if entropy < S"
        axes.text(4.6, y + 0.3, text, va="center", fontsize=8, color=plot.BLUE)
    title = f"DeeBERT on a {n}-layer BERT (hidden {config.hidden_size})"
    axes.set(xlim=(-0.2, 6.6), ylim=(-0.2, 0.9 * n + 0.8), title=title)
    axes.axis("off")


def binary_entropy(p: float) -> float:
    return -p * math.log(p) - (1 - p) * math.log(1 - p)


def draw_entropy(axes) -> None:
    """Binary entropy against the top class's probability, each of the paper's thresholds S marked where the curve
    crosses it: an input exits when its top class is more probable than that. S = 0.7 lies above ln 2, the largest
    entropy two classes can have: under it every input exits at layer 1."""
    p = [0.5 + 0.4999 * k / 400 for k in range(401)]
    axes.plot([100 * x for x in p], [binary_entropy(x) for x in p], color=plot.BLUE)
    for S in [S for S in PAPER_THRESHOLDS if 0.05 <= S < math.log(2)]:
        low, high = 0.5, 1 - 1e-12  # entropy falls from ln 2 to 0 here: bisect for entropy = S
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if binary_entropy(middle) > S else (low, middle)
        axes.plot(100 * low, S, "o", color=plot.ORANGE)
        axes.annotate(f"S={S:g}: {100 * low:.1f}%", (100 * low, S), textcoords="offset points", xytext=(5, 2),
                      fontsize=7)
    axes.axhline(math.log(2), color=plot.GREY, linestyle="--", linewidth=1)
    axes.axhline(0.7, color=plot.ORANGE, linestyle=":", linewidth=1)
    axes.text(99, math.log(2), "ln 2 = 0.693, the most an entropy of 2 classes can be", ha="right", va="top",
              fontsize=7)
    axes.text(99, 0.7, "S = 0.7: every input exits at layer 1", ha="right", va="bottom", fontsize=7,
              color=plot.ORANGE)
    axes.set(xlabel="probability of the top class (%)", ylabel="entropy (nats)", ylim=(0, 0.78),
             title="two classes: an input exits when entropy < S")


def draw_compaction(axes, exits: list[int], lengths: list[int]) -> None:
    """Early exit on a batch: row r (an example, `lengths[r]` tokens) runs layers 1..exits[r]; at each layer the
    rows that exited are gone, and so are the columns past the longest row still running (padding only)."""
    from matplotlib import patches

    n, T = max(exits), max(lengths)
    for layer in range(1, n + 1):
        running = [r for r in range(len(exits)) if exits[r] >= layer]
        width = max(lengths[r] for r in running)  # the columns left: the longest example still running
        x0 = (layer - 1) * (T + 3)
        for r in range(len(exits)):
            if exits[r] >= layer:
                axes.add_patch(patches.Rectangle((x0, -r), lengths[r], 0.8, color=plot.BLUE))
                axes.add_patch(patches.Rectangle((x0 + lengths[r], -r), width - lengths[r], 0.8, color="#cfe3f7"))
            if exits[r] == layer:
                axes.text(x0 + width + 0.3, -r + 0.4, "exits", va="center", fontsize=7, color=plot.ORANGE)
        axes.text(x0 + T / 2, 1.3, f"layer {layer}: {len(running)} x {width}", ha="center", fontsize=8)
    axes.set(xlim=(-1, n * (T + 3)), ylim=(-len(exits), 2.2), title="a batch, layer by layer: tokens (dark), "
             "padding computed on (light); exited rows and trimmed columns are gone")
    axes.axis("off")


def main(argv=None) -> None:
    parser = Parser(prog="tutorial/figures.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/sst-2", help="a run folder: config.json, results.json, tradeoff.csv "
                        "(default: %(default)s)")
    parser.add_argument("--out", default="tutorial/figures", help="where the PNGs go (default: %(default)s)")
    args = parser.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    config = BertConfig.from_file(run / "config.json")
    metric = get_task(config.task).main_metric if config.task else "accuracy"
    draws = {"model": lambda a: draw_model(a, config), "entropy": draw_entropy,
             "compaction": lambda a: draw_compaction(a, exits=[1, 3, 2, 4, 1, 4], lengths=[9, 12, 6, 7, 12, 4])}
    if (run / "results.json").is_file():  # written by train.py
        results = json.loads((run / "results.json").read_text())
        joint = run.with_name(run.name + "-joint") / "results.json"  # train.py --joint --output_dir <run>-joint
        if joint.is_file():
            results.update({key: value for key, value in json.loads(joint.read_text()).items() if "joint" in key})
        per_layer = {STAGES[key]: value["dev_per_layer"] for key, value in results.items() if key in STAGES}
        majority = results.get("dev_majority_class")
        draws["off-ramps"] = lambda a: plot.draw_per_layer(a, per_layer, metric, majority)
    if (run / "tradeoff.csv").is_file():  # written by infer.py --eval
        rows = read_csv(run / "tradeoff.csv")
        rules = rules_of(read_csv(run / "rules.csv")) if (run / "rules.csv").is_file() else {}
        static = rules.get("static", {}).get("points")
        draws["tradeoff"] = lambda a: plot.draw_tradeoff(a, rows, metric, static)
        draws["exits"] = [lambda a, row=row: plot.draw_exits(a, row) for row in plot.telling_exits(rows)]
        if rules:
            draws["rules"] = lambda a: plot.draw_rules(a, rules, metric)
        if any(key.startswith("measured_saving_batch") for key in rows[0]):
            draws["measured"] = lambda a: plot.draw_measured(a, timing_rows(rows))
    for name, draw in draws.items():
        panels = draw if isinstance(draw, list) else [draw]
        sizes = {"model": (6, 6), "compaction": (11, 3.2), "exits": (3 * len(panels), 3)}
        figure = plot.new_figure(figsize=sizes.get(name, (6, 4)), dpi=110)
        if figure is None:
            raise DeeBertError("tutorial/figures.py draws with matplotlib, which is not installed; "
                               "pip install matplotlib")
        for k, panel in enumerate(panels, start=1):
            axes = figure.add_subplot(1, len(panels), k)
            panel(axes)
            if name not in ("model", "compaction"):
                axes.grid(alpha=0.3)
        print(f"wrote {plot.save(figure, out / f'{name}-{run.name}.png')}")
    missing = {"off-ramps": "results.json (train.py)", "tradeoff": "tradeoff.csv (infer.py --eval)"}
    for name, source in missing.items():
        if name not in draws:
            print(f"skipped {name}: {run} has no {source}")


if __name__ == "__main__":
    try:
        main()
    except DeeBertError as error:  # a run folder without config.json, no matplotlib: one line
        sys.exit(error.report())
