"""python -m minisd.bench gpu-check --out DIR: every GPU goal of minisd measured by one command, in under 8
minutes on a bare GPU machine with its own torch, every compile included; --dry-run: the same code on a CPU at
reduced sizes, every part one step or one call (the test suite runs it, so the check cannot rot).

    python -m minisd.bench gpu-wheels                            # here, once: .whl/gpu-wheels.tar.xz
    python -m minisd.bench gpu-check --out DIR                   # there, from the repository root
    python -m minisd.bench gpu-check --out DIR --parts kd dreambooth     # some parts only, in this order
    python -m minisd.bench gpu-check --dry-run --out /tmp/check

The parts (PARTS; their code is gpu_parts.py) run in order, each under its own time cap and all within
--budget, which counts from the start, the wheels' install included. A part that would start with less time
left than it needs is skipped, and one that reaches its cap is stopped (a SIGALRM raises CapReached in it, a
BaseException, so no `except Exception` on the way swallows it), each with the reason in the report. The
report, DIR/gpu-check.md and DIR/gpu-check.json (gpu_report.py), is written again whenever a part records a
figure, so a run that is killed still leaves what it measured; DIR/gpu-check.log holds the scripts' output and
every traceback.

First the wheels (wheels.py) are installed into a folder that goes first on PYTHONPATH, and the check goes
on in a new process that sees them (--resume: it reads its state back from DIR/gpu-check.json). Until then
nothing beyond the standard library is imported: the machine may have torch alone. A CUDA error that leaves
the process unusable sends the remaining parts to a new process the same way.
"""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from minisd.bench import wheels

SITE = Path(tempfile.gettempdir()) / "minisd-gpu-check-site"  # where the wheels are installed
BUDGET = 450.0  # s: 8 minutes, less half a minute for a stopped part's clean-up and the report
DRY_BUDGET = 3600.0  # the dry run's: a shared CPU may be slow, and no part of it may be cut
MAX_RESTARTS = 2  # new processes after a CUDA error or a crash, at most


class Part:
    def __init__(self, name: str, title: str, cap: float, needs: float):
        """cap: the most seconds it may run; needs: the least worth starting it with (its compiles)."""
        self.name, self.title, self.cap, self.needs = name, title, cap, needs


PARTS = [  # the goals first, cheap ones first; then the scripts' own runs
    Part("sample-eager", "Sampling, eager, batch 1: SD-v1.4, BK-SDM-Small, BK-SDM-Tiny against diffusers",
         100, 40),
    Part("tiny-memory", "Peak memory of BK-SDM-Tiny sampling, fp16, batch 1", 30, 10),
    Part("sample-b16", "Sampling at batch 16: BK-SDM-Small, images/s and % of peak", 45, 20),
    Part("lcm", "BK-SDM-Tiny, 4 LCM steps with TAESD, against SD-v1.4 at 25 PNDM steps with CFG", 35, 15),
    # kd first among the slow parts: its goals are the ones not yet measured. Caps from an H200 (2026-12-04):
    # train.py ran 20 steps in 54 s after the harness had compiled the same step (inductor's on-disk cache may
    # have served it: cold, allow a minute or two more); sample-compiled took 91 s; dreambooth.py's compiled
    # first step was not done after 120 s, so the check runs it eager
    Part("kd", "Distillation at 512 px, batch 32, BK-SDM-Small from SD-v1.4: train.py (compiled, bf16, fused "
         "AdamW; then sample.py loads its checkpoint) against BK-SDM's reference step", 240, 150),
    Part("sample-compiled", "Sampling, compiled with CUDA graphs, batch 1: BK-SDM-Small against diffusers",
         150, 100),
    Part("dreambooth", "dreambooth.py --lora --no-compile on BK-SDM-Small at 512 px: steps/s and peak memory",
         90, 45),
]
PART_NAMES = [p.name for p in PARTS]
FINISHED = ("done", "skipped", "stopped", "failed")


class CapReached(BaseException):
    """A part's time cap has passed (raised by SIGALRM in the main thread)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minisd.bench gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu-check.md, .json and .log")
    p.add_argument("--dry-run", action="store_true",
                   help="on the CPU, every model at reduced size, every part one step or one call")
    p.add_argument("--parts", nargs="+", choices=PART_NAMES, default=PART_NAMES,
                   help="the parts to run, in this order (default: all)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole check, from its start (default {BUDGET:.0f}; dry run "
                        f"{DRY_BUDGET:.0f})")
    p.add_argument("--peak-tflops", type=float, default=790.0,
                   help="the GPU's peak for %% of peak (default 790: a bf16 8192^3 matmul measured on an "
                        "H200; the dry run measures the CPU's)")
    p.add_argument("--wheels", type=Path, default=wheels.PACK,
                   help="the wheels' pack, installed first when it is there (default .whl/gpu-wheels.tar.xz)")
    p.add_argument("--resume", action="store_true",
                   help="go on from DIR/gpu-check.json: the parts it has finished are not run again (the "
                        "check starts itself so after installing the wheels and after a CUDA error)")
    args = p.parse_args(argv)
    for flag in ("budget", "peak_tflops"):  # minisd.cli's positive_float imports torch, not yet installed
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{flag.replace('_', '-')} must be a positive finite number, not {value}")
    args.budget = args.budget or (DRY_BUDGET if args.dry_run else BUDGET)
    if args.resume and not (args.out / "gpu-check.json").is_file():
        p.error(f"--resume goes on from {args.out / 'gpu-check.json'}, which is not there: drop --resume")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file: give a folder")
    return args


class State:
    """Everything the report shows, kept in DIR/gpu-check.json and rendered to DIR/gpu-check.md on every save
    (by gpu_report once it can be imported; a placeholder before the wheels are in)."""

    def __init__(self, out: Path, data: dict):
        self.out, self.data, self.render = out, data, None

    @classmethod
    def new(cls, args, argv: list[str]) -> "State":
        parts = {p.name: dict(name=p.name, title=p.title, status="pending")
                 for p in PARTS if p.name in args.parts}
        data = dict(started=time.time(), budget=args.budget, dry_run=args.dry_run, restarts=0, argv=argv,
                    command="python -m minisd.bench " + " ".join(argv), parts=parts, order=args.parts)
        return cls(args.out, data)

    @classmethod
    def load(cls, out: Path) -> "State":
        return cls(out, json.loads((out / "gpu-check.json").read_text()))

    def part(self, name: str) -> dict:
        return self.data["parts"][name]

    def left(self) -> float:
        return self.data["budget"] - (time.time() - self.data["started"])

    def save(self) -> None:
        self.data["elapsed"] = round(time.time() - self.data["started"], 1)
        self.out.mkdir(parents=True, exist_ok=True)
        markdown = self.render(self.data) if self.render else placeholder(self.data)
        for name, text in (("gpu-check.json", json.dumps(self.data, indent=1, default=str)),
                           ("gpu-check.md", markdown)):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text + "\n")
            os.replace(tmp, self.out / name)  # a kill mid-write leaves the last whole report


def placeholder(data: dict) -> str:
    return (f"# GPU check\n\n- command: `{data['command']}`\n- wheels: {data.get('wheels', 'installing')}\n\n"
            "The check stopped before its first part (see gpu-check.log).")


def main(argv: list[str]) -> int:
    if argv[0] == "gpu-wheels":
        return wheels.main(argv[1:])
    args = parse_args(argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    if args.resume:
        return run(args, State.load(args.out))
    state = State.new(args, argv)
    state.data["wheels"] = install_wheels(args)
    state.save()
    if "installed" in state.data["wheels"]:
        path = os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")]))
        # offline: a machine that needs the wheels has no network, where a request may wait for its timeout
        env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1")
        return go_on_in_new_process(args.out, argv, env)
    return run(args, state)


def install_wheels(args) -> dict:
    """The wheels' pack into SITE, when there is one for this Python; what happened, for the report."""
    if not args.wheels.is_file():
        return {"none": f"no {args.wheels}: the packages of this environment"}
    python = wheels.pack_python(args.wheels)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python != here:
        return {"none": f"{args.wheels} is for Python {python}, this is {here}: the packages of this "
                        "environment"}
    print(f"gpu-check: installing {args.wheels} into {SITE}", flush=True)
    try:
        done = wheels.install(args.wheels, SITE)
    except Exception as e:  # pip's failure, a broken pack, a Python without lzma: the report says which
        return {"failed": f"{type(e).__name__}: {e}"}
    return {"installed": f"{len(done['wheels'])} wheels in {done['seconds']} s into {SITE} (by {done['by']})",
            "wheels": done["wheels"]}


def go_on_in_new_process(out: Path, argv: list[str], env: dict | None = None) -> int:
    """The check goes on in `python -m minisd.bench gpu-check ... --resume`, and again after a crash of that
    process (ended by a signal: a segfault, the kernel's out-of-memory killer) while parts are left."""
    argv = [a for a in argv if a != "--resume"] + ["--resume"]
    for _ in range(MAX_RESTARTS + 1):
        code = subprocess.run([sys.executable, "-m", "minisd.bench", *argv], env=env).returncode
        parts = State.load(out).data["parts"].values()
        if code >= 0 or all(p["status"] in FINISHED for p in parts):
            break
    return code


def run(args, state: State) -> int:
    # Imported only now, once the wheels are in: they need numpy, PIL, safetensors, ... and torch
    from minisd.bench import gpu_parts, gpu_report

    state.render = gpu_report.markdown
    log = args.out / "gpu-check.log"
    ctx = gpu_parts.Context(args, state, log)
    for name in state.data["order"]:
        record = state.part(name)
        if record["status"] == "running":  # the process that ran it crashed in it
            record.update(status="failed", reason="the process running it ended (a crash, or a kill)")
        if record["status"] in FINISHED:
            continue
        part = next(p for p in PARTS if p.name == name)
        left = state.left()
        if left < (0 if args.dry_run else part.needs):
            record.update(status="skipped", reason=f"{max(left, 0):.0f} s of the budget left; it needs about "
                                                   f"{part.needs:.0f} s (run it alone: --parts {name})")
            state.save()
            continue
        measure = getattr(gpu_parts, part.name.replace("-", "_"))
        ctx.current = name
        run_part(state, name, lambda: measure(ctx), left if args.dry_run else min(part.cap, left), log)
        if not ctx.clean_up() and state.data["restarts"] < MAX_RESTARTS:
            state.data["restarts"] += 1
            ctx.note("the CUDA context was unusable after this part: the next parts ran in a new process")
            ctx.finish()
            return go_on_in_new_process(args.out, state.data["argv"])
    ctx.finish()
    print(gpu_report.markdown(state.data), flush=True)
    return 1 if any(r["status"] == "failed" for r in state.data["parts"].values()) else 0


def within(seconds: float, fn) -> None:
    """fn(), raising CapReached in it once `seconds` have passed."""
    def alarm(signum, frame):
        raise CapReached()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_part(state: State, name: str, fn, cap: float, log: Path) -> None:
    """fn() under its cap, its outcome in the part's record (status, seconds, reason); the traceback of a
    failure goes to the log."""
    record = state.part(name)
    record.update(status="running", cap=round(cap), started=round(time.time() - state.data["started"], 1))
    state.save()
    print(f"gpu-check: {name} (cap {cap:.0f} s, {state.left():.0f} s of the budget left)", flush=True)
    start = time.time()
    try:
        within(cap, fn)
        record.update(status="done")
    except CapReached:
        record.update(status="stopped", reason=f"reached its cap of {cap:.0f} s; what it measured by then is "
                                               f"below (run it alone: --parts {name})")
    except Exception as e:  # the report says which part failed and why; the next part runs
        record.update(status="failed", reason=f"{type(e).__name__}: {e}"[:1000])
        with open(log, "a") as f:
            f.write(f"\n--- {name} failed:\n{traceback.format_exc()}")
    record["seconds"] = round(time.time() - start, 1)
    state.save()
    print(f"gpu-check: {name} {record['status']} in {record['seconds']} s", flush=True)
