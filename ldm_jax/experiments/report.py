"""Collecting an experiment's results into a paper-style table, a CSV and a plot.

    python -m ldm_jax.experiments report runs/guidance --out experiments/results

reads <root>/experiment.json and every point's result file, groups the points that differ only
in their `seed`, and writes:

* `<name>.csv`: a row per group: `point` (its name without the seed), its override values (as
  Python literals; `(base)` where a point leaves the key at the base config's value), `seeds`
  (how many), then every number of every metric as a column
  `metric/key/...` (the mean over seeds), each followed by `<column>_std` (the sample standard
  deviation; empty for one seed).
* `<name>.md`: the question (the experiment file's docstring), the base config, the table of the
  sweep's columns (mean ± std), the plot, and the experiment file's FINDINGS.
* `<name>.png`: each table column against the sweep's numeric axis (one line per combination of
  the other axes), when it has one.
"""
from __future__ import annotations

import csv
import glob
import json
import math
import os

from ldm_jax.experiments import SEED_KEY, format_value, load_experiment, name_of, point_name

BASE_VALUE = "(base)"  # a varying key that a point does not set: the base config's (or the CLI's) value

# Headline numbers of each metric (the table's default columns): paths into its result, "*"
# standing for each split.
HEADLINE = {
    "bpd": ["total"],
    "prompt_accuracy": ["*/ok"],
    "digit_accuracy": ["*/accuracy"],
    "digits_fid": ["*/digits_fid"],
    "fid": ["*/fid"],
    "clip_score": ["*/clip_score"],
    "recon": ["*/psnr"],
    "shapes_fid": ["*/shapes_fid"],
    "diversity": ["*/diversity_ratio", "*/diversity"],
}


def load_results(root: str) -> tuple[dict, list[dict]]:
    """(<root>/experiment.json, the points' result records in the sweep's order)."""
    root = os.path.abspath(os.path.expanduser(root))
    path = os.path.join(root, "experiment.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{root} has no experiment.json: not an experiment root "
                                "(python -m ldm_jax.experiments run ... --root writes it)")
    with open(path) as f:
        meta = json.load(f)
    records = []
    for result in sorted(glob.glob(os.path.join(root, "*", "experiment", "*.json"))):
        if os.path.basename(result) == "spec.json":
            continue
        with open(result) as f:
            records.append(json.load(f))
    order = {point_name(p): i for i, p in enumerate(_points(meta))}
    records.sort(key=lambda r: order.get(r["point"], len(order)))
    return meta, records


def _points(meta: dict) -> list[dict]:
    return [{k: _tuple(v) for k, v in p.items()} for p in meta["points"]]


def _tuple(value):
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value


def flatten(tree, prefix: str = "") -> dict:
    """The numbers of a result tree as {"a/b/c": value} (lists, i.e. curves, are left out)."""
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(tree, bool):
        pass
    elif isinstance(tree, (int, float)):
        out[prefix] = float(tree)
    return out


def numbers(record: dict) -> dict:
    """Every number of a point's metrics, as `metric/key/...` columns."""
    out = {}
    for metric, rec in record["metrics"].items():
        out.update(flatten(rec["result"], metric))
    return out


def group(records: list[dict]) -> list[dict]:
    """Points that differ only in their seed, with each number's mean and std over them."""
    groups: dict[str, dict] = {}
    for record in records:
        overrides = {k: _tuple(v) for k, v in record["overrides"].items() if k != SEED_KEY}
        name = name_of(overrides, "base")
        g = groups.setdefault(name, {"point": name, "overrides": overrides, "values": []})
        g["values"].append(numbers(record))
    rows = []
    for g in groups.values():
        columns = {}
        for key in dict.fromkeys(k for values in g["values"] for k in values):
            xs = [v[key] for v in g["values"] if key in v]
            mean = sum(xs) / len(xs)
            std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
            columns[key] = (mean, std)
        rows.append({"point": g["point"], "overrides": g["overrides"], "seeds": len(g["values"]), "columns": columns})
    return rows


def default_columns(metrics: list[str], rows: list[dict]) -> list[str]:
    """The headline columns of `metrics` that the rows have."""
    present = list(dict.fromkeys(k for row in rows for k in row["columns"]))
    out = []
    for metric in metrics:
        for pattern in HEADLINE.get(metric, []):
            parts = f"{metric}/{pattern}".split("/")
            out.extend(k for k in present if _matches(k.split("/"), parts) and k not in out)
    return out


def _matches(key: list[str], pattern: list[str]) -> bool:
    return len(key) == len(pattern) and all(p in ("*", k) for k, p in zip(key, pattern))


def axes(rows: list[dict]) -> list[str]:
    """The override keys whose value varies between rows, in first-seen order."""
    keys = list(dict.fromkeys(k for row in rows for k in row["overrides"]))
    return [k for k in keys if len({repr(row["overrides"].get(k)) for row in rows}) > 1]


def numeric_axis(rows: list[dict], varying: list[str]) -> str | None:
    """The one varying key whose values are all numbers, if there is exactly one."""
    numeric = [k for k in varying
               if all(isinstance(row["overrides"].get(k), (int, float)) and not isinstance(row["overrides"].get(k), bool)
                      for row in rows)]
    return numeric[0] if len(numeric) == 1 else None


def write_csv(rows: list[dict], keys: list[str], path: str) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row["columns"]))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["point", *keys, "seeds", *[c for col in columns for c in (col, f"{col}_std")]])
        for row in rows:
            values = []
            for col in columns:
                mean, std = row["columns"].get(col, (None, None))
                values += ["" if mean is None else f"{mean:.6g}", "" if std is None else f"{std:.6g}"]
            writer.writerow([row["point"], *[repr(row["overrides"][k]) if k in row["overrides"] else BASE_VALUE
                                             for k in keys], row["seeds"], *values])
    return path


def _cell(mean_std) -> str:
    mean, std = mean_std
    if mean is None:
        return "–"
    return f"{mean:.4g}" + (f" ± {std:.2g}" if std is not None else "")


def markdown(meta: dict, rows: list[dict], keys: list[str], columns: list[str], plot: str | None,
             findings: str | None, expected: int) -> str:
    question = meta["question"].strip().splitlines()
    lines = [f"# Experiment `{meta['name']}`", "", *question, "",
             f"Base config: `{os.path.relpath(meta['base'], os.path.dirname(os.path.dirname(meta['path'])))}`; "
             f"metrics: {', '.join(meta['metrics'])}; {sum(r['seeds'] for r in rows)} of {expected} points complete."]
    if meta.get("common"):
        lines.append("Every point also sets " + ", ".join(f"`{k}={format_value(v)}`" for k, v in meta["common"].items())
                     + (", and the command line set " + ", ".join(f"`{k}={format_value(v)}`" for k, v in meta["sets"].items())
                        if meta.get("sets") else "") + ".")
    lines += ["", "| " + " | ".join([*keys, "seeds", *columns]) + " |", "|" + "---|" * (len(keys) + 1 + len(columns))]
    for row in rows:
        cells = [f"`{format_value(row['overrides'][k])}`" if k in row["overrides"] else BASE_VALUE for k in keys]
        cells += [str(row["seeds"]), *[_cell(row["columns"].get(c, (None, None))) for c in columns]]
        lines.append("| " + " | ".join(cells) + " |")
    if plot:
        lines += ["", f"![{meta['name']}]({os.path.basename(plot)})"]
    lines += ["", "## Findings", "", findings.strip() if findings else "(not written yet)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], x: str, columns: list[str], path: str, xscale: str = "linear") -> str:
    """Each column against `x`, a line per combination of the other varying keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k for k in axes(rows) if k != x]
    lines: dict[str, list] = {}
    for row in rows:
        label = ", ".join(f"{k}={format_value(row['overrides'].get(k))}" for k in others) or "all"
        lines.setdefault(label, []).append(row)
    fig, panels = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.4), squeeze=False)
    for ax, col in zip(panels[0], columns):
        for label, members in lines.items():
            pts = sorted((r["overrides"][x], *r["columns"][col]) for r in members if col in r["columns"])
            if not pts:
                continue
            xs, means, stds = zip(*pts)
            ax.errorbar(xs, means, yerr=[s or 0.0 for s in stds], marker="o", capsize=3, label=label)
        ax.set_xscale(xscale)
        ax.set_xlabel(x)
        ax.set_title(col, fontsize=9)
        ax.grid(alpha=0.3)
    if len(lines) > 1:
        panels[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(root: str, out: str | None = None) -> dict:
    """Write the CSV, the markdown report and (with a numeric axis) the plot of the experiment at
    `root`: into `out` as <name>.csv/.md/.png, or into the root as report.*. Returns their paths."""
    meta, records = load_results(root)
    if os.path.isfile(meta["path"]):  # the file's current findings and columns (written after running)
        experiment = load_experiment(meta["path"])
        findings, sweep = experiment.findings, experiment.sweep
        columns_spec, x, xscale = sweep.columns, sweep.x, sweep.xscale
    else:
        findings, columns_spec, x, xscale = None, meta.get("columns"), meta.get("x"), meta.get("xscale", "linear")
    rows = group(records)
    varying = axes(rows)
    keys = varying or list(dict.fromkeys(k for row in rows for k in row["overrides"]))
    columns = columns_spec or default_columns(meta["metrics"], rows)
    x = x or numeric_axis(rows, varying)
    folder = os.path.abspath(os.path.expanduser(out or root))
    os.makedirs(folder, exist_ok=True)
    stem = meta["name"] if out else "report"
    paths = {"csv": write_csv(rows, keys, os.path.join(folder, f"{stem}.csv"))}
    if x and rows and columns:
        paths["png"] = plot(rows, x, columns, os.path.join(folder, f"{stem}.png"), xscale)
    text = markdown(meta, rows, keys, columns, paths.get("png"), findings, expected=len(meta["points"]))
    paths["md"] = os.path.join(folder, f"{stem}.md")
    with open(paths["md"], "w") as f:
        f.write(text)
    return paths
