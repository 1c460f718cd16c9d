"""The GPU check's report (gpu_check.py) as Markdown: the performance goals against what the parts measured,
then each part's outcome, tables and figures. Rendered from the check's state, the same dict that
DIR/gpu-check.json holds, at every save: a part that was stopped or killed shows what it had measured."""

import datetime

from minisd.bench.report import SAMPLE_COLUMNS, TRAIN_COLUMNS, ratios, table

LABELS = {"sd": "SD-v1.4", "small": "BK-SDM-Small", "tiny": "BK-SDM-Tiny"}
FIGURES = {
    "peak_allocated_gb": "peak allocated over the part, models included (GB)",
    "peak_reserved_gb": "peak reserved by CUDA's caching allocator (GB)",
    "train_exit": "train.py's exit code",
    "train_s": "train.py's wall time, loading and compiling included (s)",
    "steps": "steps run", "steps_per_s": "steps/s (log rows after the first, which holds the compiles)",
    "samples_per_s": "samples/s (likewise)", "peak_gb": "peak memory the script logged (GB)",
    "checkpoint": "its last checkpoint", "sample_exit": "sample.py's exit code on it",
    "sample_s": "sample.py's wall time (s)", "image": "sample.py's image (px)",
    "dreambooth_exit": "dreambooth.py's exit code",
    "dreambooth_s": "dreambooth.py's wall time, class images included (s)",
    "lora_mb": "the LoRA file (MiB)",
}


def rows(data: dict, part: str, name: str, lib: str = "minisd") -> list[dict]:
    """The part's rows of config `name` (sd, small, tiny) and library `lib`."""
    found = data["parts"].get(part, {}).get("rows", [])
    return [r for r in found
            if r["lib"] == lib and r["config"].split()[0].removesuffix("-reduced") == f"v1-{name}"]


def verdict(value, target: float, at_most: bool = False) -> str:
    if value is None:
        return "n/a"
    if (value <= target) if at_most else (value >= target):
        return "met"
    return f"missed by {abs(value - target) / target:.0%}"


def why_not(data: dict, part: str) -> str:
    record = data["parts"].get(part)
    if record is None:
        return f"not run ({part} was not among --parts)"
    if record["status"] == "done" and data.get("no_reference"):
        return "minisd's side alone: the reference side does not import"
    if record["status"] == "done":  # e.g. peak memory, which train.py logs on CUDA only
        return "done, without this figure"
    return f"{record['status']}" + (f": {record['reason'][:160]}" if record.get("reason") else "")


def goal(data: dict, part: str, text: str, value, target: float, shown: str, at_most: bool = False) -> list:
    if value is None:
        return [text, "n/a", shown, why_not(data, part)]
    fmt = "{:.1%}" if shown.endswith("%") else "{:.2f}"
    return [text, fmt.format(value), shown, verdict(value, target, at_most)]


def ratio(data: dict, part: str, name: str, key: str, theirs: str = "diffusers"):
    ours, ref = rows(data, part, name), rows(data, part, name, theirs)
    return ours[0][key] / ref[0][key] if ours and ref and ref[0][key] else None


def value(data: dict, part: str, name: str, key: str):
    found = rows(data, part, name)
    return found[0][key] if found else None


def against_reference(data: dict, key: str):
    """train.py's figure (the kd part's, from its log) over the reference step's row."""
    ours = data["parts"].get("kd", {}).get("figures", {}).get(key)
    ref = rows(data, "kd", "small", "BK-SDM reference")
    return ours / ref[0][key] if ours is not None and ref and ref[0][key] else None


def goals(data: dict) -> list[list]:
    """[goal, measured, target, verdict] for each goal of the performance issue."""
    trained = data["parts"].get("kd", {}).get("figures", {})
    out = [goal(data, "sample-eager", f"U-Net it/s at batch 1, minisd / diffusers eager, {LABELS[n]}",
                ratio(data, "sample-eager", n, "unet_its"), 1.5, ">= 1.5x") for n in ("sd", "small", "tiny")]
    out += [
        goal(data, "sample-compiled", "U-Net it/s at batch 1, minisd / diffusers, both compiled (CUDA "
             "graphs), BK-SDM-Small", ratio(data, "sample-compiled", "small", "unet_its"), 1.1, ">= 1.1x"),
        goal(data, "sample-b16", "fraction of peak at batch 16, BK-SDM-Small (minisd)",
             value(data, "sample-b16", "small", "fraction_of_peak"), 0.4, ">= 40%"),
        goal(data, "kd", "KD samples/s, BK-SDM-Small from SD-v1.4, 512 px, batch 32 (train.py)",
             trained.get("samples_per_s"), 60, ">= 60"),
        goal(data, "kd", "KD samples/s, train.py / BK-SDM's reference step",
             against_reference(data, "samples_per_s"), 2, ">= 2x"),
        goal(data, "kd", "KD peak memory, train.py / BK-SDM's reference step",
             against_reference(data, "peak_gb"), 1, "<= 1x", at_most=True),
        goal(data, "tiny-memory", "BK-SDM-Tiny sampling peak memory, fp16, batch 1 (GB)",
             value(data, "tiny-memory", "tiny", "peak_gb"), 4, "< 4 GB", at_most=True),
    ]
    ran = trained.get("train_exit") == 0 and trained.get("sample_exit") == 0
    out.append(["train.py runs on the GPU and writes a checkpoint that sample.py loads",
                "ran" if ran else "n/a", "runs", "met" if ran else why_not(data, "kd")])
    if data["dry_run"]:  # the verdicts are worked out all the same, so that their code runs too
        out = [row[:3] + [f"(dry run) {row[3]}"] for row in out]
    return out


def status(record: dict) -> str:
    seconds, cap, reason = record.get("seconds"), record.get("cap"), record.get("reason", "")
    after = f" after {seconds} s" if seconds is not None else ""  # none when its process crashed
    return {"done": f"done in {seconds} s (cap {cap} s)", "skipped": f"skipped: {reason}",
            "stopped": f"stopped{after}: {reason}", "failed": f"failed{after}: {reason}",
            "running": f"running since {record.get('started')} s into the check (the report was written "
                       "while it ran, or the check was killed in it)",
            "pending": "not reached"}[record["status"]]


def section(number: int, record: dict, data: dict) -> str:
    parts = [f"### {number}. {record['title']}", f"*{status(record)}*"]
    found = record.get("rows", [])
    if found and "unet_its" in found[0]:
        parts += [table(found, SAMPLE_COLUMNS), ratios(found, "minisd", "diffusers", [
            ("unet_its", "U-Net it/s"), ("images_per_s", "images/s"), ("peak_gb", "peak memory")],
            ("config", "compiled", "batch"))]
    elif found:  # the kd part's: the reference step alone
        parts.append(table(found, TRAIN_COLUMNS))
    if record["name"] == "kd" and (speed := against_reference(data, "samples_per_s")):
        memory = against_reference(data, "peak_gb")
        parts.append(f"train.py's step runs {speed:.2f}x the reference step's samples/s"
                     + (f" at {memory:.2f}x its peak memory" if memory else "")
                     + " (train.py's figures below are from its log).")
    if record["name"] == "lcm":
        fast = value(data, "lcm", "tiny", "images_per_s")
        sd = value(data, "sample-eager", "sd", "images_per_s")
        if fast and sd:
            parts.append(f"BK-SDM-Tiny with 4 LCM steps and TAESD draws {fast / sd:.1f}x the images/s of "
                         "SD-v1.4 at 25 PNDM steps with CFG (minisd, batch 1; SD's row is part 1's).")
    figures = record.get("figures", {})
    if figures:
        shown = [{"figure": FIGURES.get(k, k), "value": f"{v:.3g}" if isinstance(v, float) else str(v)}
                 for k, v in figures.items()]
        parts.append(table(shown, [("figure", "figure", "{}"), ("value", "value", "{}")]))
    parts += [f"- {note}" for note in record.get("notes", [])]
    return "\n\n".join(p for p in parts if has_rows(p))


def has_rows(md: str) -> bool:
    """Text, or a Markdown table with a row under its header (ratios() has none without both libraries)."""
    return not md.startswith("|") or md.count("\n") >= 2


def markdown(data: dict) -> str:
    env = data.get("environment", {})
    started = datetime.datetime.fromtimestamp(data["started"], datetime.timezone.utc)
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    wheels = "; ".join(f"{k}: {v}" for k, v in data.get("wheels", {}).items() if k != "wheels")
    if "no_reference" not in data:
        reference = "not needed by the parts run so far"
    elif data["no_reference"]:
        reference = f"the reference side does not import ({data['no_reference']}): minisd's side alone"
    else:
        reference = "diffusers and transformers import: both sides run"
    peak = data.get("peak")
    device = env.get("device", "")
    lines = [f"# GPU check{' (dry run)' if data['dry_run'] else ''}: {device}", "",
             f"- started {started:%Y-%m-%d %H:%M} UTC; {data.get('elapsed', 0):.0f} s of the "
             f"{data['budget']:.0f} s budget used",
             f"- command: `{data['command']}`", f"- software: {versions or 'not read yet'}",
             f"- wheels: {wheels or 'not installed yet'}", f"- reference side: {reference}"]
    if peak:
        lines.append(f"- peak for % of peak: {peak[0]:.4g} TFLOP/s ({peak[1]})")
    if data["dry_run"]:
        lines += ["", "**Dry run**: on the CPU, every model at reduced size, 32 px, one step or one call per "
                      "part. It shows that every part runs; its figures measure nothing."]
    lines += ["", "## Goals", "", table([dict(zip("gmtv", g)) for g in goals(data)],
                                        [("g", "goal", "{}"), ("m", "measured", "{}"), ("t", "target", "{}"),
                                         ("v", "verdict", "{}")]),
              "", "## Parts", ""]
    lines += [section(i + 1, data["parts"][name], data) + "\n" for i, name in enumerate(data["order"])]
    return "\n".join(lines)
