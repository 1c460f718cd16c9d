"""The benchmarks' outputs: the rows as JSON, Markdown tables (each library's figures, then the
minisd / reference ratios), and a PNG of images/s against batch size drawn with PIL."""

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

SAMPLE_COLUMNS = [("config", "config", "{}"), ("compiled", "compiled", "{}"), ("batch", "batch", "{}"),
                  ("lib", "library", "{}"), ("unet_its", "U-Net it/s", "{:.2f}"),
                  ("s_per_image", "s/image", "{:.3f}"), ("images_per_s", "images/s", "{:.3f}"),
                  ("peak_gb", "peak GB", "{:.2f}"), ("tflops", "TFLOP/s", "{:.3f}"),
                  ("fraction_of_peak", "% of peak", "{:.1%}")]
TRAIN_COLUMNS = [("config", "config", "{}"), ("batch", "batch", "{}"), ("lib", "library", "{}"),
                 ("samples_per_s", "samples/s", "{:.3f}"), ("peak_gb", "peak GB", "{:.2f}"),
                 ("tflops", "TFLOP/s", "{:.3f}"), ("fraction_of_peak", "% of peak", "{:.1%}"),
                 ("syncs_per_step", "host syncs/step", "{}")]
PROBE_COLUMNS = [("config", "config", "{}"), ("batch", "batch", "{}"),
                 ("checkpointing", "checkpointing", "{}"), ("fits", "fits", "{}"),
                 ("peak_gb", "peak GB", "{:.1f}")]
COLOURS = ["#1f77b4", "#ff7f0e", "#0b3d91", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]


LAYOUT_COLUMNS = [("level", "level", "{}"), ("config", "config", "{}"), ("variant", "variant", "{}"),
                  ("seconds", "s per call (median)", "{:.4f}"),
                  ("vs_reference", "speed against diffusers (= 1)", "{:.3f}x")]


def table(rows: list[dict], columns: list[tuple]) -> str:
    def cell(row, key, fmt):
        return "n/a" if row.get(key) is None else fmt.format(row[key])

    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, key, fmt) for key, _, fmt in columns) + " |" for r in rows]
    return "\n".join(lines)


def ratios(rows: list[dict], ours: str, theirs: str, keys: list[tuple[str, str]],
           group: tuple[str, ...]) -> str:
    """A table of ours / theirs for each `keys` figure, per group of rows (same config, batch, ...)."""
    by_group = {}
    for r in rows:
        by_group.setdefault(tuple(r[k] for k in group), {})[r["lib"]] = r
    lines = ["| " + " | ".join([*group, *(f"{title}, {ours} / {theirs}" for _, title in keys)]) + " |",
             "|" + "---|" * (len(group) + len(keys))]
    for values, libs in by_group.items():
        if ours in libs and theirs in libs:
            cells = [f"{libs[ours][k] / libs[theirs][k]:.2f}x" if libs[theirs][k] else "n/a" for k, _ in keys]
            lines.append("| " + " | ".join([*map(str, values), *cells]) + " |")
    return "\n".join(lines)


def header(env: dict, peak: tuple[float, str]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    device = env["device"] + ("" if peak is None else f"; peak {peak[0]:.3g} TFLOP/s ({peak[1]})")
    return (f"- date: {env['date']}\n- device: {device}\n"
            f"- software: {versions}\n- command: `{env['command']}`\n")


def write(kind: str, rows: list[dict], env: dict, peak: tuple[float, str] | None, out: Path,
          tag: str) -> list[Path]:
    """bench-{kind}-{tag}.json and .md (and .png for sampling) under out; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{kind}-{tag}"
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "peak_tflops": peak, "rows": rows},
                                                    indent=1))
    if kind == "sample":
        md = (table(rows, SAMPLE_COLUMNS) + "\n\n"
              + ratios(rows, "minisd", "diffusers", [("unet_its", "U-Net it/s"), ("images_per_s", "images/s"),
                                                      ("peak_gb", "peak memory")],
                       ("config", "compiled", "batch")))
        paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")]
        plot(rows, stem.with_suffix(".png"), f"images/s against batch size on {env['device']}")
    elif kind == "layout":
        md, paths = table(rows, LAYOUT_COLUMNS), [stem.with_suffix(".json"), stem.with_suffix(".md")]
    elif kind == "probe":
        md, paths = table(rows, PROBE_COLUMNS), [stem.with_suffix(".json"), stem.with_suffix(".md")]
    else:
        keys = [("samples_per_s", "samples/s"), ("peak_gb", "peak memory")]
        md = (table(rows, TRAIN_COLUMNS) + "\n\n" + ratios(rows, "minisd", "BK-SDM reference", keys,
                                                           ("config", "batch"))
              + "\n\n" + ratios(rows, "minisd (cached)", "BK-SDM reference", keys, ("config", "batch")))
        paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    stem.with_suffix(".md").write_text(header(env, peak) + "\n" + md + "\n")
    return paths


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """images/s against batch size (log2 axis), one line per library, config and compile setting."""
    series = {}
    for r in rows:
        label = f"{r['lib']} {r['config']}" + (" compiled" if r["compiled"] else "")
        series.setdefault(label, []).append((r["batch"], r["images_per_s"]))
    w, h, pad = 900, 520, 70
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    xs = [math.log2(x) for points in series.values() for x, _ in points]
    ymax = max(y for points in series.values() for _, y in points) * 1.1
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def xy(x, y):
        return pad + (w - 2 * pad) * (math.log2(x) - x0) / (x1 - x0), h - pad - (h - 2 * pad) * y / ymax

    draw.rectangle([pad, pad, w - pad, h - pad], outline="grey")
    for batch in sorted({x for points in series.values() for x, _ in points}):
        draw.text((xy(batch, 0)[0] - 4, h - pad + 8), str(batch), fill="black")
    for i in range(5):
        draw.text((8, h - pad - (h - 2 * pad) * i / 5 - 6), f"{ymax * i / 5:.3g}", fill="black")
    draw.text((w // 2 - 40, h - pad + 28), "batch size", fill="black")
    draw.text((8, pad - 30), "images/s", fill="black")
    draw.text((pad + 80, 12), title, fill="black")
    for i, (label, points) in enumerate(sorted(series.items())):
        colour = COLOURS[i % len(COLOURS)]
        points = sorted(points)
        if len(points) > 1:
            draw.line([xy(x, y) for x, y in points], fill=colour, width=3)
        for x, y in points:
            cx, cy = xy(x, y)
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
        draw.text((pad + 10, pad + 8 + 16 * i), label, fill=colour)
    image.save(path)
