"""The paper's figures of the trade-off, drawn from the rows tradeoff.py and timing.py compute (matplotlib).

`plot` puts them in one PNG, as `infer.py --eval` writes it: Figure 2 (quality against expected saving, with the
static models), the exit rules compared, Figure 4 (each off-ramp alone), Figure 3 (measured against expected
saving), Figure 6 (where examples exit). matplotlib is imported only when a figure is drawn: most runs of
infer.py draw nothing, and would otherwise pay 0.7 s to start. tutorial/figures.py draws them one by one."""

from deebert.files import write_atomically

BLUE, ORANGE, GREY = "#1f77b4", "#f5a623", "grey"


def new_figure(**size):
    """A matplotlib Figure (no pyplot: no GUI backend, no global state), or None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(**size)


def save(figure, path):
    figure.tight_layout()
    return write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))


def label_points(axes, points: list) -> None:
    """Label (x, y, text) points; neighbours closer than 3% of the width share one label, "S=0, 0.001"."""
    width = (max(x for x, _, _ in points) - min(x for x, _, _ in points)) or 1.0
    labels = []
    for x, y, text in points:
        if labels and abs(labels[-1][0] - x) < 0.03 * width and abs(labels[-1][1] - y) < 1:
            labels[-1][2] += ", " + text.removeprefix("S=")
        else:
            labels.append([x, y, text])
    for x, y, text in labels:  # slanted, so that neighbouring labels do not run into each other
        axes.annotate(text, (x, y), textcoords="offset points", xytext=(2, 5), fontsize=7, rotation=35)


def draw_static(axes, static: list, metric: str) -> None:
    """Static models, each one point: K layers always, saving 1 - K/n."""
    if static:
        axes.plot([100 * r["expected_saving"] for r in static], [100 * r[metric] for r in static], "s",
                  color=ORANGE, label="static: the first K layers")
        label_points(axes, [(100 * r["expected_saving"], 100 * r[metric], f"K={r['threshold']:g}") for r in static])


def draw_tradeoff(axes, rows: list[dict], metric: str, static: list | None = None) -> None:
    """Figure 2: the metric against the expected saving, one point per S, the full model and static models."""
    points = [row for row in rows if row["S"] is not None]
    x = [100 * row["expected_saving"] for row in points]
    y = [100 * row[metric] for row in points]
    axes.plot(x, y, "o-", color=BLUE, label="DeeBERT, one point per S")
    label_points(axes, [(xi, yi, f"S={row['S']:g}") for xi, yi, row in zip(x, y, points)])
    draw_static(axes, static, metric)
    full = next(row for row in rows if row["S"] is None)
    axes.axhline(100 * full[metric], linestyle="--", color=GREY, linewidth=1, label="full model")
    axes.margins(y=0.3)  # room for the labels
    axes.legend(loc="lower left", fontsize=8)
    axes.set(xlabel="expected saving of layers (%)", ylabel=f"{metric} (%)", title="quality against saving")


def draw_rules(axes, rules: dict, metric: str) -> None:
    """Every exit rule over its grid: one curve each, points sorted by saving; static models as points."""
    for name, rule in rules.items():
        if name != "static":
            points = sorted(rule["points"], key=lambda p: p["expected_saving"])
            axes.plot([100 * p["expected_saving"] for p in points], [100 * p[metric] for p in points], ".-",
                      label=name, linewidth=1, markersize=3)
    draw_static(axes, rules.get("static", {}).get("points"), metric)
    axes.legend(loc="lower left", fontsize=8)
    axes.set(xlabel="expected saving of layers (%)", ylabel=f"{metric} (%)", title="exit rules, one full pass")


def draw_per_layer(axes, per_layer: dict, metric: str, majority: float | None = None) -> None:
    """Figure 4: each off-ramp's metric, for every {name: per-layer metrics} given (e.g. after each stage)."""
    for name, metrics in per_layer.items():
        axes.plot(range(1, len(metrics) + 1), [100 * m[metric] for m in metrics], "o-", label=name)
    if majority is not None:
        axes.axhline(100 * majority, linestyle=":", color=GREY, label="always the majority class")
    axes.legend(fontsize=8)
    axes.set(xlabel="off-ramp (layer)", ylabel=f"{metric} (%)", title="each off-ramp alone")


def draw_measured(axes, timing: list[dict]) -> None:
    """Figure 3: the measured wall-clock saving against the expected one, with spreads; the diagonal is 1:1."""
    timing = [row for row in timing if row["S"] is not None]
    for batch_size in dict.fromkeys(row["batch_size"] for row in timing):
        points = [row for row in timing if row["batch_size"] == batch_size]
        x = [100 * r["expected_saving"] for r in points]
        y = [100 * r["measured_saving"] for r in points]
        axes.errorbar(x, y, yerr=[100 * r["spread"] for r in points], fmt="o", capsize=2, label=f"batch {batch_size}")
    last = [row for row in timing if row["batch_size"] == batch_size]  # the S of the last batch size, labelled
    label_points(axes, [(100 * r["expected_saving"], 100 * r["measured_saving"], f"S={r['S']:g}") for r in last])
    axes.axline((0, 0), slope=1, color=GREY, linestyle="--", linewidth=1)
    axes.legend(fontsize=8, loc="upper left")
    axes.set(xlabel="expected saving (%)", ylabel="measured saving (%)", title="wall clock against layer count")


def share_at_one_layer(row: dict) -> float:
    """The largest share of the examples that exit at one same layer: 1.0 when all exit together."""
    return max(row["exits_per_layer"]) / sum(row["exits_per_layer"])


def telling_exits(rows: list[dict], count: int = 4) -> list[dict]:
    """Up to `count` rows of the sweep, spread over it, leaving out, where there are others, the S under which every
    example exits at the same layer (the last near S = 0; the first above ln C) or 95% do: such bars say little."""
    rows = [row for row in rows if row["S"] is not None]
    telling = [row for row in rows if share_at_one_layer(row) < 1] or rows
    rows = [row for row in telling if share_at_one_layer(row) <= 0.95] or telling
    count = min(count, len(rows))
    return [rows[round(k * (len(rows) - 1) / max(1, count - 1))] for k in range(count)]


def draw_exits(axes, row: dict) -> None:
    """Figure 6, one panel: how many examples exit at each layer under one S."""
    layers = range(1, len(row["exits_per_layer"]) + 1)
    axes.bar(layers, row["exits_per_layer"], color=BLUE)
    axes.set(xlabel="exit layer", ylabel="examples", title=f"S = {row['S']:g}", xticks=list(layers))


def plot(path, rows: list[dict], metric: str, per_layer: dict, timing: list | None = None,
         rules: dict | None = None, majority: float | None = None):
    """The figures of one `infer.py --eval` in one PNG: Figures 2 and the rules, 4 and 3 (when timed), 6.
    Returns the path, or None when matplotlib is not installed (the CSV has every number)."""
    figure = new_figure(figsize=(12, 11), dpi=100)
    if figure is None:
        return None
    grid = figure.add_gridspec(3, 4)
    static = (rules or {}).get("static", {}).get("points")
    panels = [(grid[0, :2], lambda a: draw_tradeoff(a, rows, metric, static)),
              (grid[1, :2], lambda a: draw_per_layer(a, per_layer, metric, majority))]
    if rules:
        panels.append((grid[0, 2:], lambda a: draw_rules(a, rules, metric)))
    if timing:
        panels.append((grid[1, 2:], lambda a: draw_measured(a, timing)))
    for k, row in enumerate(telling_exits(rows)):
        panels.append((grid[2, k], lambda a, row=row: draw_exits(a, row)))
    for place, draw in panels:
        axes = figure.add_subplot(place)
        draw(axes)
        axes.grid(alpha=0.3)
    return save(figure, path)
