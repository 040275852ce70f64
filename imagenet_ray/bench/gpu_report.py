"""The GPU script's short Markdown report (report.md), made from its results.json dictionary."""

from __future__ import annotations

from typing import Any


def _rate(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return "error: " + str(entry["error"]).splitlines()[0][:120]
    windows = entry.get("window_images_per_s") or [entry["images_per_s"]]
    return f"{entry['images_per_s']:,.0f} ({min(windows):,.0f}–{max(windows):,.0f})"


def markdown_report(r: dict[str, Any]) -> str:
    lines = [
        "# GPU benchmark (`python -m imagenet_ray.bench.gpu`)",
        "",
        f"{r.get('device')}, torch {r.get('torch')}, torchvision {r.get('torchvision')}, CUDA {r.get('cuda')}, "
        f"{r.get('cpu_count')} CPU cores; {r.get('elapsed_s', 0):.0f} s of a {r['settings']['budget_s']:.0f} s "
        f"budget{'' if r.get('finished') else ' (NOT finished: cut short)'}.",
        "",
        "Anchors (published, not measured here): "
        + "; ".join(f"{a['what']}: {a['images_per_s']:,} img/s" for a in r["anchors"])
        + ". Goals on one H200: "
        + ", ".join(f"≥ {g:,} img/s at {s}" for s, g in r["goals"]["training_step_images_per_s"].items())
        + f", data wait < {r['goals']['data_wait_frac']:.0%}.",
        "",
        "## Training step (images/s: median of the timed windows, min–max)",
        "",
        "| mode @ size | images/s | ratio to goal | first step s (compile) | CUDA-graph skips | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for key, e in r.get("training_step", {}).items():
        ratio = f"{e['ratio_to_goal']:.2f}" if "ratio_to_goal" in e else "—"
        cells = [e.get(k, "—") for k in ("first_step_s", "cudagraph_skips", "peak_memory_gib")]
        lines.append(f"| {key} | {_rate(e)} | {ratio} | " + " | ".join(map(str, cells)) + " |")
    images = r.get("data", {}).get("images", {})
    lines += ["", "## JPEG decode on the device (nvJPEG on CUDA)", ""]
    if "error" in images:
        lines.append(f"No images: {images['error'].splitlines()[0]}")
    elif images:
        lines.append(
            f"{images['count']} JPEGs from {images['source']} (mean {images['mean_kb']} KB, "
            f"{images['mean_width']}×{images['mean_height']} px), through prepare's shard writer."
        )
    lines += ["", "| what | images/s | CPU cores busy |", "|---|---|---|"]
    decode = r.get("decode", {})
    for key, e in ({"decode": decode} if "error" in decode else decode).items():
        lines.append(f"| {key} | {_rate(e)} | {e.get('cpu_cores_busy', '—')} |")
    lines += [
        "",
        "## End to end: GPU decode feeding the step",
        "",
        "| mode @ size | images/s | data wait | slowdown vs ceiling | process cores | in next() | read cores |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, e in r.get("end_to_end", {}).items():
        if "error" in e:
            lines.append(f"| {key} | {_rate(e)} | | | | | |")
            continue
        lines.append(
            f"| {key} | {_rate(e)} | {e['data_wait_frac']:.1%} | {e.get('slowdown_vs_ceiling', '—')} | "
            f"{e['process_cpu_cores']} | {e['feed_cpu_cores']} | {e.get('parquet_read_cores_at_this_rate', '—')} |"
        )
    if r.get("skipped"):
        lines += ["", "## Skipped (time budget)", ""]
        lines += [f"- {s['what']}: needs ~{s['estimate_s']} s, {s['left_s']} s left" for s in r["skipped"]]
    return "\n".join(lines) + "\n"
