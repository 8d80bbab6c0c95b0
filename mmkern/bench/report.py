"""`mmkern report RESULT.json... --out DIR`: saved pytest-benchmark JSON -> a Markdown report and plots.

    DIR/report.md   a header (device, versions, the measured ceilings, date, commit), then one table per
                    benchmark group: each implementation's median time, TFLOP/s, GB/s, their fractions
                    of the device's ceilings, and its time relative to the fastest in the group
    DIR/tflops.png  TFLOP/s against the series' x (sequence length for attention), one line per implementation
    DIR/gbps.png    GB/s against the series' x (hidden size for the norms, elements for diffusion ops,
                    cache length for decode), one line per implementation
Each plot holds one panel per series (extra_info["series"]); a result's metric is extra_info["metric"]
(else TFLOP/s when it counted FLOPs, else GB/s). The plots need matplotlib (pip install matplotlib);
without it the Markdown is still written and the command says so. Several JSON files (two runs, two
devices) merge into one report; each result is labelled by its run when more than one is given.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Row:
    run: str
    group: str
    name: str
    impl: str
    median_s: float
    rounds: int
    info: dict = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return self.info.get("metric") or ("TFLOP/s" if "TFLOP/s" in self.info else "GB/s")


def _impl_of(bench: dict) -> str:
    info = bench.get("extra_info") or {}
    if "impl" in info:
        return str(info["impl"])
    params = bench.get("params") or {}
    return str(params.get("impl", bench.get("name", "?")))


def load(paths: list[str]) -> tuple[list[dict], list[Row]]:
    """(one header dict per file, every result row)."""
    headers, rows = [], []
    for i, path in enumerate(paths):
        with open(path) as fh:
            data = json.load(fh)
        if "benchmarks" not in data:
            raise ValueError(f"mmkern report: {path} is not pytest-benchmark JSON (no 'benchmarks' key)")
        run = Path(path).stem if len(paths) > 1 else ""
        machine = data.get("machine_info") or {}
        mm = machine.get("mmkern") or {}
        headers.append(dict(file=str(path), run=run, datetime=data.get("datetime", "?"),
                            commit=(data.get("commit_info") or {}).get("id", "?"),
                            device=mm.get("device") or (machine.get("cpu") or {}).get("brand_raw", "?"),
                            versions={k: mm[k] for k in ("mmkern", "torch", "cuda", "triton", "python") if k in mm}
                            or {"python": machine.get("python_version", "?")},
                            ceilings=mm.get("ceilings"), backends=mm.get("backends"), sizes=mm.get("sizes"),
                            triton_interpret=mm.get("triton_interpret")))
        for b in data["benchmarks"]:
            stats = b.get("stats") or {}
            if not stats.get("median"):
                continue
            rows.append(Row(run, b.get("group") or b.get("name"), b.get("name", "?"), _impl_of(b),
                            float(stats["median"]), int(stats.get("rounds", 0)), dict(b.get("extra_info") or {})))
    return headers, rows


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _fmt(value, percent=False) -> str:
    if value is None:
        return ""
    return f"{100 * value:.1f}%" if percent else f"{value:.4g}"


def markdown(headers: list[dict], rows: list[Row], plots: list[str], note: str = "") -> str:
    lines = ["# mmkern benchmark report", ""]
    for h in headers:
        lines.append(f"- **{h['device']}**{' (run ' + h['run'] + ')' if h['run'] else ''}: "
                     + ", ".join(f"{k} {v}" for k, v in h["versions"].items())
                     + f"; {h['datetime']}; commit {str(h['commit'])[:12]}; file `{Path(h['file']).name}`")
        if h.get("ceilings"):
            c = h["ceilings"]
            lines.append(f"  - ceilings measured in this run: copy {c['copy_gbps']:.4g} GB/s (read + write), "
                         f"{c['matmul_dtype']} matmul {c['matmul_tflops']:.4g} TFLOP/s")
        if h.get("backends") is not None:
            lines.append(f"  - mmkern backends usable: {', '.join(h['backends']) or 'none'}"
                         + (f"; sizes: {h['sizes']}" if h.get("sizes") else "")
                         + ("; TRITON_INTERPRET=1 (Triton on the CPU interpreter)" if h.get("triton_interpret") == "1"
                            else ""))
    lines += ["", "Times are the median round in device time (CUDA events on a GPU). Rates count the FLOPs and the "
              "fewest bytes of each op (mmkern/bench/counts.py); '% matmul' and '% copy' divide them by the "
              "ceilings above. 'vs best' is the time over the fastest result in its group.", ""]
    if note:
        lines += [note, ""]
    for name in plots:
        lines += [f"![{name}]({name})", ""]
    by_group: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_group[r.group].append(r)
    for group in sorted(by_group):
        members = sorted(by_group[group], key=lambda r: r.median_s)
        best = members[0].median_s
        shape = members[0].info.get("shape", "")
        lines += [f"### {group}" + (f" ({shape})" if shape else ""), "",
                  "| implementation | median | TFLOP/s | GB/s | % matmul | % copy | vs best |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in members:
            label = f"{r.impl} [{r.run}]" if r.run else r.impl
            lines.append(f"| {label} | {_fmt_time(r.median_s)} | {_fmt(r.info.get('TFLOP/s'))} | "
                         f"{_fmt(r.info.get('GB/s'))} | {_fmt(r.info.get('fraction_of_matmul'), True)} | "
                         f"{_fmt(r.info.get('fraction_of_copy'), True)} | {r.median_s / best:.2f}x |")
        lines.append("")
    if not rows:
        lines.append("No timed results in these files (a --benchmark-disable run records none).")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], metric: str, path: Path, title: str) -> bool:
    """One panel per series, one line per implementation: metric against x. False if nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        if r.metric == metric and metric in r.info and "x" in r.info:
            series[r.info.get("series", r.group)].append(r)
    if not series:
        return False
    names = sorted(series)
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in series[name]:
            lines[f"{r.impl} [{r.run}]" if r.run else r.impl].append((float(r.info["x"]), float(r.info[metric])))
        for label in sorted(lines):
            xs, ys = zip(*sorted(lines[label]))
            ax.plot(xs, ys, marker="o", label=label)
        if len({x for pts in lines.values() for x, _ in pts}) > 1:
            ax.set_xscale("log", base=2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(series[name][0].info.get("x_label", "x"))
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_report(paths: list[str], out: str | Path) -> tuple[Path, list[Path], str]:
    """Write DIR/report.md and the plots; return (report path, plot paths, a note on what is missing)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    headers, rows = load(paths)
    title = " / ".join(sorted({h["device"] for h in headers}))
    plots, note = [], ""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        note = ("Plots not drawn: matplotlib is not installed here (pip install matplotlib, then run "
                "`mmkern report` again on the same JSON).")
    else:
        for metric, filename in (("TFLOP/s", "tflops.png"), ("GB/s", "gbps.png")):
            if plot(rows, metric, out / filename, f"{metric} - {title}"):
                plots.append(out / filename)
    report = out / "report.md"
    report.write_text(markdown(headers, rows, [p.name for p in plots], note))
    return report, plots, note


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json / --benchmark-autosave "
                                                "output, or `mmkern bench --json`)")
    parser.add_argument("--out", default="benchmark-report", help="folder for report.md and the PNG plots "
                                                                  "(default: ./benchmark-report)")


def main(args: argparse.Namespace) -> int:
    try:
        report, plots, note = write_report(args.json, args.out)
    except (OSError, ValueError) as exc:
        print(f"mmkern report: {exc}")
        return 2
    print(f"wrote {report}" + "".join(f", {p}" for p in plots))
    if note:
        print(note)
    return 0
