"""From raw benchmark times to ratios, targets, a Markdown report and a plot.

Conventions (docs/performance.md explains them for readers):

- every time is a median over repetitions, shown with its min-max range;
- a comparison of two interleaved variants is taken per repetition first (the
  difference or ratio of the pair run back to back), then the median of those;
- exposed sync = DDP step - bare step: the part of gradient sync that backward did
  not hide. The raw all-reduce row measures the same for the bare step plus one
  ``all_reduce`` of every gradient in a single flat buffer: the cost of a sync that is
  not overlapped at all, so exposed / raw < 1 means DDP's overlap paid off.
"""

from __future__ import annotations

import statistics

from ddp_demo.bench import report_trainer
from ddp_demo.bench.numbers import ms, paired, ratio, spread, stats, table
from ddp_demo.bench.timing import MB

# (key in summary["targets"], what it is, threshold, True if lower is better)
TARGETS = [
    ("cnn_weak_scaling_efficiency_n2", "CNN weak-scaling efficiency at N = 2", 0.90, False),
    ("mlp_exposed_sync_ratio_stock", "MLP exposed DDP sync / raw all-reduce, stock DDP, N = 2", 1.0, True),
    ("cnn_ddp_overhead_n1", "CNN: DDP at N = 1 over the bare module", 0.03, True),
    ("accelerate_over_torchrun", "accelerate step time / torchrun step time", 1.02, True),
    ("mlp_trainer_over_bare_loop", "MLP: trainer step / minimal DDP loop step, N = 2", 1.02, True),
    ("cnn_trainer_over_bare_loop", "CNN: trainer step / minimal DDP loop step, N = 2", 1.02, True),
]


def weak_scaling(results: dict, cores: int) -> list[dict]:
    """Samples/s and efficiency per workload and N. At a fixed per-rank batch, efficiency =
    throughput_N / (N x throughput_1) = t(1) / t(N), with t(1) the step on rank 0 alone in
    the same job. It splits (about) into core sharing, t_bare(1) / t_bare(N): the ranks
    compete for cores, caches and memory; times sync, t_bare(N) / t_DDP(N)."""
    rows = []
    for n, per_workload in results["weak_scaling"].items():
        for label, m in per_workload.items():
            t, ddp = m["step_s"], stats(m["step_s"]["DDP"])
            rows.append({"workload": label, "n": int(n), "params": m["params"], "oversubscribed": int(n) > cores,
                         "step_s": ddp, "samples_per_s": int(n) * m["batch"] / ddp["median"],
                         "solo_step_s": stats(t["solo DDP"]),
                         "solo_samples_per_s": m["batch"] / statistics.median(t["solo DDP"]),
                         "efficiency": ratio(t, "solo DDP", "DDP"), "core_sharing": ratio(t, "solo bare", "bare"),
                         "sync": ratio(t, "bare", "DDP"), "tuned_efficiency": ratio(t, "solo DDP tuned", "DDP tuned"),
                         "page_faults_per_step": m.get("page_faults_per_step")})
    return rows


def overhead_n1(results: dict) -> dict:
    """DDP (stock and tuned) at N = 1 (rank 0 alone, in the N = 2 job) over the bare module."""
    def over_bare(t: dict, v: str) -> dict:
        return paired(t[f"solo {v}"], t["solo bare"], lambda a, b: a / b - 1)

    return {label: {v: over_bare(m["step_s"], v) for v in ("DDP", "DDP tuned")}
            for label, m in results["weak_scaling"]["2"].items()}


def knobs(results: dict) -> list[dict]:
    rows = results["knobs"]["rows"]
    raw = next(r for r in rows if r["flat_all_reduce"])
    raw_exposed = paired(raw["step_s"], raw["local_s"], lambda a, b: a - b)["median"]
    return [knob_row(r, raw_exposed) for r in rows]


def knob_row(r: dict, raw_exposed: float) -> dict:
    k = r["accumulate"]  # times per micro-batch: sync happens once every k of them
    exposed = paired(r["step_s"], r["local_s"], lambda a, b: (a - b) / k)
    peaks = [p for p in r["rss_peak_mb"] if p is not None]
    added = [p - b for p, b in zip(r["rss_peak_mb"], r["rss_base_mb"], strict=True) if p is not None and b is not None]
    return {"name": r["name"], "buckets_mb": r.get("buckets_mb"), "step_s": stats([t / k for t in r["step_s"]]),
            "exposed_s": exposed, "ratio_to_raw": exposed["median"] / raw_exposed,
            "rss_peak_mb": max(peaks, default=None), "rss_added_mb": max(added, default=None)}


def scratch(results: dict) -> list[dict]:
    """ScratchDDP against stock DDP and the raw all-reduce, per workload: step times and paired ratios."""
    rows = []
    for label, m in results["scratch"].items():
        t = m["step_s"]
        rows.append({"workload": label, "params": m["params"], "batch": m["batch"],
                     "step_s": {name: stats(times) for name, times in t.items()},
                     "scratch_over_ddp": ratio(t, "ScratchDDP", "DDP"),
                     "raw_over_ddp": ratio(t, "raw all-reduce", "DDP"),
                     "max_diff_vs_ddp": m["max_diff_vs_ddp"]})
    return rows


def busbw(results: dict, n: int = 2) -> list[dict]:
    """busbw = S / t * 2(N-1)/N: what each link carries in a ring all-reduce (nccl-tests' definition)."""
    rows = []
    for r in results["busbw"]:
        t = stats(r["time_s"])
        rows.append({"size_mb": r["size_mb"], "time_s": t,
                     "busbw_gbps": r["size_mb"] * MB / t["median"] * 2 * (n - 1) / n / 1e9,
                     "solo_time_s": stats(r["solo_time_s"]) if r.get("solo_time_s") else None})
    return rows


def launchers(results: dict) -> dict | None:
    lr = results.get("launchers")
    if not lr or "skipped" in lr:
        return lr
    t, a = stats(lr["torchrun"]["block_step_s"]), stats(lr["accelerate"]["block_step_s"])
    return {"torchrun_step_s": t, "accelerate_step_s": a, "ratio": a["median"] / t["median"],
            "torchrun_wall_s": stats(lr["torchrun"]["wall_s"]), "accelerate_wall_s": stats(lr["accelerate"]["wall_s"])}


def summarize(results: dict) -> dict:
    cores = results["machine"]["cores"]
    s = {"weak_scaling": weak_scaling(results, cores), "ddp_overhead_n1": overhead_n1(results)}
    if "knobs" in results:
        s |= {"knobs": knobs(results), "busbw": busbw(results)}
    if "scratch" in results:
        s["scratch"] = scratch(results)
    s["launchers"] = launchers(results)
    s |= {"trainer": report_trainer.trainer_rows(results), "command": report_trainer.command_summary(results)}
    s["targets"] = targets(s)
    return s


def targets(s: dict) -> list[dict]:
    by_name = {r["name"]: r for r in s.get("knobs", [])}
    values = {
        "cnn_weak_scaling_efficiency_n2": next((r["efficiency"]["median"] for r in s["weak_scaling"]
                                                if r["workload"] == "cnn" and r["n"] == 2), None),
        "mlp_exposed_sync_ratio_stock": by_name.get("DDP", {}).get("ratio_to_raw"),
        "cnn_ddp_overhead_n1": s["ddp_overhead_n1"].get("cnn", {}).get("DDP", {}).get("median"),
        "accelerate_over_torchrun": (s["launchers"] or {}).get("ratio"),
    } | {f"{r['model']}_trainer_over_bare_loop": r["trainer_over_bare"]["median"] for r in s.get("trainer", [])}
    out = []
    for key, what, limit, lower in TARGETS:
        v = values.get(key)
        met = None if v is None else (v <= limit if lower else v >= limit)
        out.append({"key": key, "what": what, "value": v, "target": ("<= " if lower else ">= ") + f"{limit:g}",
                    "met": met})
    return out


def headline(results: dict) -> str:
    lines = []
    for t in results["summary"]["targets"]:
        value = "not measured" if t["value"] is None else f"{t['value']:.3f}"
        verdict = {True: "met", False: "MISSED", None: "-"}[t["met"]]
        lines.append(f"{t['what']}: {value} (target {t['target']}: {verdict})")
    return "\n".join(lines)


def params(n: int) -> str:
    return f"{n / 1e6:.2f}M params" if n >= 100_000 else f"{n:,} params"


def machine_line(results: dict) -> str:
    m, r = results["machine"], results["plan"]["reps"]
    where = f"{m['gpu']} (nccl)" if m["gpu"] else f"{m['cpu']}, {m['cores']} cores (gloo on CPU)"
    load = "/".join(f"{x:.2f}" for x in m["load_average_before"][:1] + m["load_average_after"][:1])
    others = m.get("cpu_share_used_by_others")
    load += "" if others is None else f"; other processes used {others:.1%} of the machine's CPU during the run"
    allocator = ("glibc, keeping freed memory (--malloc keep)" if results.get("malloc_keeps_freed_memory")
                 else "glibc's default")
    return (f"Measured on {where}, torch {m['torch']}, Python {m['python']}, one thread per rank, "
            f"allocator: {allocator}; "
            f"{r['warmup']} warm-up steps, then {r['reps']} timed repetitions; medians [min–max]. "
            f"Load average before/after: {load}. Whole benchmark: {results['wall_time_s']:.0f} s.")


def markdown(results: dict) -> str:
    s = results["summary"]
    parts = ["# ddp_demo benchmark\n", machine_line(results) + "\n"]
    if results["quick"]:
        parts.append("> `--quick` run: tiny models, 2 repetitions. It checks the pipeline; the numbers mean nothing.\n")
    parts += ["## Targets\n", table(["what", "measured", "target", "met"], [
        [t["what"], "–" if t["value"] is None else f"{t['value']:.3f}", t["target"],
         {True: "yes", False: "**no**", None: "not measured"}[t["met"]]] for t in s["targets"]])]
    parts += [weak_section(s), overhead_section(s)]
    if "knobs" in s:
        parts += [knobs_section(results), busbw_section(s)]
    if "scratch" in s:
        parts.append(scratch_section(s["scratch"]))
    if s.get("trainer"):
        parts.append(report_trainer.trainer_section(s))
    parts += [launchers_section(s["launchers"]), report_trainer.command_section(s)]
    return "\n".join(parts)


def weak_section(s: dict) -> str:
    rows = [[f"{r['workload']} ({params(r['params'])})", f"{r['n']}" + (" (oversubscribed)" if r["oversubscribed"]
             else ""), ms(r["step_s"]), f"{r['samples_per_s']:,.0f}", ms(r["solo_step_s"]),
             f"{r['solo_samples_per_s']:,.0f}", spread(r["efficiency"]), spread(r["core_sharing"]), spread(r["sync"]),
             spread(r["tuned_efficiency"])] for r in s["weak_scaling"]]
    faults = [[r["workload"], r["n"]] + [f"{r['page_faults_per_step'][v]:,.0f}" for v in ("solo bare", "bare", "DDP")]
              for r in s["weak_scaling"] if r.get("page_faults_per_step")]
    return ("## Weak scaling (same batch per rank at every N)\n\nN = 1 is rank 0 running alone inside the same job, "
            "interleaved with the N-rank steps. Efficiency = t(1) / t(N) ≈ core sharing × sync, each a median of "
            "per-repetition ratios [min–max]. Stock DDP is what ddp_demo.train wraps with; tuned DDP adds "
            "bucket_cap_mb=100, gradient_as_bucket_view, static_graph.\n\n"
            + table(["workload", "N", "DDP step, ms", "samples/s", "N = 1 step, ms", "N = 1 samples/s",
                     "efficiency", "core sharing", "sync", "tuned DDP efficiency"], rows)
            + "\nPage faults per step (worst rank): memory the allocator gave back to the OS and the step touched "
              "again.\n\n" + table(["workload", "N", "N = 1 bare", "bare", "DDP"], faults))


def overhead_section(s: dict) -> str:
    def pct(o: dict) -> str:
        return f"{o['median']:+.1%} [{o['min']:+.1%} to {o['max']:+.1%}]"

    return "## DDP at N = 1 vs the bare module (rank 0 alone, in the N = 2 job)\n\n" + table(
        ["workload", "stock DDP", "tuned DDP"], [[w, pct(o["DDP"]), pct(o["DDP tuned"])]
                                                 for w, o in s["ddp_overhead_n1"].items()])


def knobs_section(results: dict) -> str:
    s, k = results["summary"], results["knobs"]
    rows = [[r["name"], buckets(r["buckets_mb"]), ms(r["step_s"]), ms(r["exposed_s"]), f"{r['ratio_to_raw']:.2f}",
             mib(r["rss_peak_mb"]), mib(r["rss_added_mb"])] for r in s["knobs"]]
    local = stats([t for r in k["rows"] if r["accumulate"] == 1 for t in r["local_s"]])
    check = k["check"]
    return (f"## Where the time goes at N = 2: MLP, {params(k['params'])}, batch {k['batch']} per rank"
            f"\n\nBare step (no sync), all repetitions: {ms(local)} ms. One all_reduce of all "
            f"{size_label(k['params'] * 4 / MB)} of gradients alone, no step around it: "
            f"{ms(stats(k['all_reduce_alone_s']))} ms. Exposed sync = step − bare step, paired per repetition; "
            "no_sync rows are per micro-batch. Buckets: DDP's gradient buckets in the order they are all-reduced. "
            "Memory: peak RSS of the worst rank (MiB) from DDP construction through warm-up, and how much of it "
            "the variant added.\n\n"
            f"The raw all-reduce is checked against DDP: largest gradient difference "
            f"{check['max_diff_raw_vs_ddp']:.1e} (without any sync: {check['max_diff_unsynced_vs_ddp']:.1e}).\n\n"
            + table(["variant", "buckets, MB", "step, ms", "exposed sync, ms", "× raw all-reduce", "peak RSS",
                     "added"], rows))


def mib(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def buckets(sizes: list[float] | None) -> str:
    return "?" if not sizes else " + ".join(f"{b:.3g}" for b in sizes)


def size_label(mb: float) -> str:
    n = mb * MB
    return f"{mb:g} MB" if n >= MB else f"{n / 1000:g} KB" if n >= 1000 else f"{n:.0f} B"


def scratch_section(rows: list[dict]) -> str:
    return ("## ddp_demo's own DDP beside torch's at N = 2\n\nScratchDDP (ddp_demo/parallel/ddp.py) at DDP's "
            "default bucket sizes, stock DDP, and the bare step plus one raw all-reduce of all gradients, "
            "interleaved; ratios are paired per repetition. Max gradient difference: ScratchDDP's after its last "
            "step against DDP's.\n\n"
            + table(["workload", "bare, ms", "stock DDP, ms", "ScratchDDP, ms", "raw all-reduce, ms",
                     "ScratchDDP / DDP", "raw / DDP", "max gradient difference"],
                    [[f"{r['workload']} ({params(r['params'])}, batch {r['batch']})"]
                     + [ms(r["step_s"][v]) for v in ("bare", "DDP", "ScratchDDP", "raw all-reduce")]
                     + [spread(r["scratch_over_ddp"]), spread(r["raw_over_ddp"]), f"{r['max_diff_vs_ddp']:.1e}"]
                     for r in rows]))


def busbw_section(s: dict) -> str:
    return ("## gloo all-reduce at N = 2: latency and bus bandwidth\n\nbusbw = S / t × 2(N−1)/N, the bytes each "
            "rank sends and receives per second in a ring all-reduce; the small sizes measure latency, also on "
            "rank 0 alone (a group of one: no data moves, only the hand-over to gloo's thread and back).\n\n"
            + table(["size", "time, ms", "busbw, GB/s", "rank 0 alone, ms"],
                    [[size_label(r["size_mb"]), ms(r["time_s"]), f"{r['busbw_gbps']:.3g}",
                      ms(r["solo_time_s"]) if r["solo_time_s"] else ""] for r in s["busbw"]]))


def launchers_section(lr: dict | None) -> str:
    if lr is None:
        return "## accelerate vs torchrun\n\nNot run (--no-launchers).\n"
    if "skipped" in lr:
        return f"## accelerate vs torchrun\n\nSkipped: {lr['skipped']}.\n"
    return ("## accelerate vs torchrun (same job, step times the trainer logs)\n\n" + table(
        ["launcher", "step, ms", "whole command, s"],
        [["torchrun", ms(lr["torchrun_step_s"]), f"{lr['torchrun_wall_s']['median']:.1f}"],
         ["accelerate", ms(lr["accelerate_step_s"]), f"{lr['accelerate_wall_s']['median']:.1f}"]])
        + f"\naccelerate / torchrun step time: {lr['ratio']:.3f}\n")


def write(results: dict, out) -> None:
    """results.md under ``out`` (``bench.plot`` draws bench.png beside it)."""
    (out / "results.md").write_text(markdown(results))
