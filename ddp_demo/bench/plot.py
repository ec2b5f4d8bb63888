"""The benchmark's picture: four panels, one per question, drawn from ``results["summary"]``.

matplotlib is the ``bench`` extra (``pip install -e ".[bench]"``); the Agg backend
draws straight to a PNG file, with no display needed.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

from ddp_demo.bench.report import params, size_label  # noqa: E402


def plot(results: dict, path) -> None:
    s = results["summary"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    weak_scaling_panel(axes[0][0], s)
    if "knobs" in s:
        time_panel(axes[0][1], s)
        busbw_panel(axes[1][0], s)
    overhead_panel(axes[1][1], s)
    m = results["machine"]
    where = m["gpu"] or f"{m['cpu']}, {m['cores']} cores"
    allocator = "glibc keeping freed memory" if results.get("malloc_keeps_freed_memory") else "glibc default malloc"
    fig.suptitle(f"ddp_demo benchmark: {where}, torch {m['torch']}, {m['backend']}, {allocator}"
                 + ("  [--quick: numbers mean nothing]" if results["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def weak_scaling_panel(ax, s: dict) -> None:
    """Efficiency per workload and N, whiskers from the per-repetition ratios' min-max."""
    rows = s["weak_scaling"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))  # in the plan's order
    ns = sorted({r["n"] for r in rows})
    width = 0.8 / len(workloads)
    for i, workload in enumerate(workloads):
        mine = [r for r in rows if r["workload"] == workload]
        xs = [ns.index(r["n"]) + (i - (len(workloads) - 1) / 2) * width for r in mine]
        eff = [r["efficiency"]["median"] for r in mine]
        err = [[e - r["efficiency"]["min"] for e, r in zip(eff, mine, strict=True)],
               [r["efficiency"]["max"] - e for e, r in zip(eff, mine, strict=True)]]
        bars = ax.bar(xs, eff, width, yerr=err, capsize=3, label=f"{workload} ({params(mine[0]['params'])})")
        for bar, r in zip(bars, mine, strict=True):
            bar.set_hatch("//" if r["oversubscribed"] else "")
            ax.text(bar.get_x() + bar.get_width() / 2, 0.02, f"{r['efficiency']['median']:.2f}", ha="center",
                    fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.9, color="k", ls="--", lw=1, label="target 0.90 (cnn, N = 2)")
    ax.set_xticks(range(len(ns)), [f"N = {n}" + ("\n(oversubscribed: hatched)" if any(
        r["oversubscribed"] for r in rows if r["n"] == n) else "") for n in ns])
    ax.set_ylabel("efficiency = t(1) / t(N)")
    ax.set_ylim(0, 1.15)
    ax.set_title("Weak scaling, same batch per rank, stock DDP")
    ax.legend(fontsize=8, loc="upper right")


def time_panel(ax, s: dict) -> None:
    """Bare step + exposed sync per DDP variant, MLP at N = 2; labels give memory added."""
    rows = s["knobs"][::-1]
    names = [r["name"] for r in rows]
    exposed = [max(r["exposed_s"]["median"], 0) * 1e3 for r in rows]
    bare = [r["step_s"]["median"] * 1e3 - e for r, e in zip(rows, exposed, strict=True)]
    ax.barh(names, bare, color="0.75", label="bare step (no sync)")
    ax.barh(names, exposed, left=bare, color="tab:red", label="exposed sync")
    for i, r in enumerate(rows):
        added = "" if r["rss_added_mb"] is None else f", +{r['rss_added_mb']:.0f} MiB"
        ax.text(bare[i] + exposed[i], i, f" {r['ratio_to_raw']:.2f}× raw{added}", va="center", fontsize=8)
    ax.set_xlabel("ms per step (no_sync rows: per micro-batch)")
    ax.set_title("Where the time goes: MLP, N = 2")
    ax.set_xlim(0, max(b + e for b, e in zip(bare, exposed, strict=True)) * 1.45)
    ax.legend(fontsize=8, loc="lower right")


def busbw_panel(ax, s: dict) -> None:
    """Bus bandwidth for the MB sizes; the latency of the small ones as a note."""
    rows = [r for r in s["busbw"] if r["size_mb"] >= 1]
    sizes = [r["size_mb"] for r in rows]
    bw = [r["busbw_gbps"] for r in rows]
    lo = [b - b * r["time_s"]["median"] / r["time_s"]["max"] for b, r in zip(bw, rows, strict=True)]
    hi = [b * r["time_s"]["median"] / r["time_s"]["min"] - b for b, r in zip(bw, rows, strict=True)]
    ax.errorbar(sizes, bw, yerr=[lo, hi], marker="o", capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{x:g}" for x in sizes])
    ax.set_xlabel("all-reduce size, MB")
    ax.set_ylabel("busbw, GB/s  (S/t · 2(N−1)/N)")
    ax.set_title("gloo all-reduce, N = 2")
    ax.set_ylim(bottom=0)
    small = [f"{size_label(r['size_mb'])}: {r['time_s']['median'] * 1e3:.2f} ms"
             for r in s["busbw"] if r["size_mb"] < 1]
    if small:
        ax.text(0.02, 0.04, "latency (median per all-reduce)\n" + "\n".join(small), transform=ax.transAxes, fontsize=8)


def overhead_panel(ax, s: dict) -> None:
    """What the wrappers cost: DDP at N = 1 over the bare module, accelerate over torchrun, the
    trainer's step over the minimal DDP loop's (N = 2);
    whiskers: the per-repetition (per-block for the launchers) min-max."""
    labels, values, lows, highs, colors, limits = [], [], [], [], [], []

    def add(label: str, o: dict, scale: float, color: str, limit: float | None) -> None:
        labels.append(label)
        values.append(o["median"] * scale)
        lows.append((o["median"] - o["min"]) * scale)
        highs.append((o["max"] - o["median"]) * scale)
        colors.append(color)
        limits.append(limit)

    for workload, o in s["ddp_overhead_n1"].items():
        for variant, color in (("DDP", "tab:blue"), ("DDP tuned", "tab:green")):
            add(f"{workload.replace(', ', chr(10))}\n{variant}", o[variant], 100, color,
                3.0 if (workload, variant) == ("cnn", "DDP") else None)
    lr = s.get("launchers")
    if lr and "ratio" in lr:
        t, a = lr["torchrun_step_s"], lr["accelerate_step_s"]
        ratio = {"median": lr["ratio"] - 1, "min": a["min"] / t["max"] - 1, "max": a["max"] / t["min"] - 1}
        add("accelerate /\ntorchrun", ratio, 100, "tab:purple", 2.0)
    for r in s.get("trainer") or []:  # the trainer's step over the minimal DDP loop's, N = 2
        o = r["trainer_over_bare"]
        add(f"{r['model']}\ntrainer/loop", {k: v - 1 for k, v in o.items()}, 100, "tab:orange", 2.0)
    ax.bar(range(len(values)), values, yerr=[lows, highs], capsize=3, color=colors)
    for i, limit in enumerate(limits):
        if limit is not None:
            ax.hlines(limit, i - 0.4, i + 0.4, colors="k", linestyles="--")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylabel("overhead, % of the step")
    ax.set_title("Overheads: DDP at N = 1 / bare; accelerate / torchrun; trainer / bare DDP loop\n"
                 "(dashed: target; whiskers: min–max)", fontsize=10)
