"""python -m minisd.bench gpu-check: its dry run runs every part of the GPU check on the CPU (the same code,
at reduced sizes) and reports each; a part past its cap is stopped, one that fails is reported, one the budget
cannot hold is skipped, and the report is written as the check goes; the wheels are selected, packed and
installed as the GPU machine gets them."""

import importlib.metadata
import json
import subprocess
import sys
import time
import zipfile

import pytest

from minisd.bench import gpu_check, gpu_report, wheels
from minisd.bench.__main__ import main


def check(out, *flags) -> tuple[int, dict, str]:
    code = main(["gpu-check", "--out", str(out), "--wheels", str(out / "no-wheels.tar.xz"), *flags])
    return code, json.loads((out / "gpu-check.json").read_text()), (out / "gpu-check.md").read_text()


@pytest.mark.slow
def test_dry_run_runs_every_part(tmp_path):
    code, data, md = check(tmp_path, "--dry-run")
    assert code == 0
    parts = data["parts"]
    assert list(parts) == gpu_check.PART_NAMES and all(p["status"] == "done" for p in parts.values()), parts
    eager = parts["sample-eager"]["rows"]
    assert [(r["config"], r["lib"]) for r in eager] == [
        (f"v1-{n}-reduced", lib) for n in ("sd", "small", "tiny") for lib in ("minisd", "diffusers")]
    assert all(r["unet_its"] > 0 and r["images_per_s"] > 0 for r in eager)
    assert [r["lib"] for r in parts["tiny-memory"]["rows"]] == ["minisd"]
    assert {r["batch"] for r in parts["sample-b16"]["rows"]} == {2}
    assert parts["lcm"]["rows"][0]["config"] == "v1-tiny-reduced lcm-1 taesd"
    assert [r["lib"] for r in parts["kd"]["rows"]] == ["BK-SDM reference"]  # train.py is minisd's side
    assert all(r["compiled"] for r in parts["sample-compiled"]["rows"])
    trained = parts["kd"]["figures"]
    assert trained["train_exit"] == 0 and trained["sample_exit"] == 0 and trained["image"] == "32x32"
    assert trained["checkpoint"].startswith("checkpoint-") and trained["steps"] == 1
    personalized = parts["dreambooth"]["figures"]
    assert personalized["dreambooth_exit"] == 0 and personalized["steps_per_s"] > 0
    assert personalized["lora_mb"] > 0
    assert "**Dry run**" in md and "## Goals" in md and md.count("\n### ") == len(parts)
    goal = "train.py runs on the GPU and writes a checkpoint that sample.py loads"
    assert f"| {goal} | ran | runs | (dry run) met |" in md
    assert "| KD samples/s, train.py / BK-SDM's reference step | " in md
    assert "train.py's step runs " in md and "x the reference step's samples/s" in md


def test_budget_skips_and_a_killed_part_is_reported(tmp_path):
    """With no time left the parts are skipped, each with its reason; a part that was running when its
    process ended is reported failed when the check goes on (--resume)."""
    code, data, md = check(tmp_path, "--budget", "1", "--parts", "kd", "dreambooth")
    assert code == 0 and data["order"] == ["kd", "dreambooth"]
    assert all(p["status"] == "skipped" and "--parts" in p["reason"] for p in data["parts"].values())
    assert "skipped: " in md and "| KD samples/s, train.py / BK-SDM's reference step | n/a |" in md

    data["parts"]["kd"].update(status="running", reason=None)
    (tmp_path / "gpu-check.json").write_text(json.dumps(data))
    code, data, md = check(tmp_path, "--resume")
    assert code == 1 and data["parts"]["kd"]["status"] == "failed"
    assert "*failed: the process running it ended" in md


def test_bad_arguments(tmp_path, capsys):
    for flags, message in ((["--resume"], "--resume goes on from"), (["--parts", "nope"], "invalid choice"),
                           (["--budget", "nan"], "--budget must be"), (["--peak-tflops", "-1"], "--peak-tflops")):
        with pytest.raises(SystemExit) as stop:
            main(["gpu-check", "--out", str(tmp_path / "new"), *flags])
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_caps_and_failures(tmp_path):
    parts = {n: dict(name=n, title=n, status="pending") for n in "abc"}
    state = gpu_check.State(tmp_path, dict(started=time.time(), budget=100, dry_run=True, argv=[],
                                           command="c", order=list(parts), parts=parts))
    state.render = gpu_report.markdown
    log = tmp_path / "gpu-check.log"

    def fail():
        raise ValueError("bad input")

    gpu_check.run_part(state, "a", lambda: time.sleep(30), 0.3, log)
    gpu_check.run_part(state, "b", fail, 10, log)
    gpu_check.run_part(state, "c", lambda: None, 10, log)
    a, b, c = (state.part(n) for n in "abc")
    assert a["status"] == "stopped" and a["seconds"] < 5 and "cap of 0 s" in a["reason"]
    assert b["status"] == "failed" and b["reason"] == "ValueError: bad input"
    assert "bad input" in log.read_text()  # the traceback
    assert c["status"] == "done"
    md = (tmp_path / "gpu-check.md").read_text()  # written by every save, not only at the end
    assert "stopped after" in md and "failed after" in md and "done in" in md


def test_verdicts():
    assert gpu_report.verdict(1.2, 1.5) == "missed by 20%" and gpu_report.verdict(1.6, 1.5) == "met"
    assert gpu_report.verdict(3.5, 4, at_most=True) == "met"
    assert gpu_report.verdict(5.0, 4, at_most=True) == "missed by 25%"
    assert gpu_report.verdict(None, 1) == "n/a"


def test_wheel_selection():
    requires = {"diffusers": ["numpy", "filelock", "huggingface-hub"], "numpy": [],
                "huggingface-hub": ["click", "hf-xet", "tqdm", "tomli"], "tqdm": [], "click": [],
                "hf-xet": [], "transformers": ["typer", "numpy"], "typer": ["pydantic"], "pydantic": []}
    skip = wheels.TORCH_BRINGS | wheels.PRUNED
    assert wheels.needed(["diffusers", "transformers"], requires, skip) == [
        "diffusers", "huggingface-hub", "numpy", "tqdm", "transformers"]
    roots = [wheels.requirement_name(r) for r in wheels.roots()]
    assert {"diffusers", "transformers", "numpy", "pillow", "safetensors"} <= set(roots)
    assert not {"torch", "scipy", "pytest", "peft"} & set(roots)
    # what torch's install brings, as this environment's torch says, is left out
    brought = {wheels.requirement_name(r) for r in importlib.metadata.distribution("torch").requires
               if "extra ==" not in r}
    assert {n for n in brought if not n.startswith(("nvidia-", "cuda-", "triton"))} <= wheels.TORCH_BRINGS
    line = 'huggingface_hub<3.0,>=1.32.0; python_version < "3.11"'
    assert wheels.requirement_name(line) == "huggingface-hub"


def fake_wheel(folder, name: str, requires: list[str], in_data: bool = False):
    """A pure-Python wheel holding module `name` with VALUE = name (in_data: in its .data/purelib folder)."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    module = f"{name}-1.0.data/purelib/{name}.py" if in_data else f"{name}.py"
    files = {module: f"VALUE = {name!r}\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: " + name + "\nVersion: 1.0\n"
             + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, text in files.items():
            z.writestr(n, text)
    return path


def test_wheels_pack_and_install(tmp_path):
    made = [fake_wheel(tmp_path, "alpha_mod", ["beta-mod>=1"]), fake_wheel(tmp_path, "beta_mod", [], True)]
    assert wheels.wheel_requires(made[0]) == ["beta-mod"] and wheels.wheel_name(made[1]) == "beta-mod"
    pack = tmp_path / "whl" / "gpu-wheels.tar.xz"
    manifest = wheels.pack(made, pack, "3.12")
    assert wheels.pack_python(pack) == "3.12" and sorted(manifest["wheels"]) == sorted(p.name for p in made)
    code = "import alpha_mod, beta_mod; print(alpha_mod.VALUE, beta_mod.VALUE)"
    for use_pip in (True, False):  # pip as on the GPU machine; unzipped where a Python has no pip
        done = wheels.install(pack, tmp_path / "site", use_pip)
        assert len(done["wheels"]) == 2 and done["by"] == ("pip" if use_pip else "unzip")
        result = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(tmp_path / "site")},
                                capture_output=True, text=True)
        assert result.stdout.split() == ["alpha_mod", "beta_mod"], result.stderr
    # a pack for another Python is not installed: the check runs on this environment's packages
    other = tmp_path / "other" / "gpu-wheels.tar.xz"
    wheels.pack(made, other, "2.7")
    args = gpu_check.parse_args(["--out", str(tmp_path), "--wheels", str(other)])
    assert "is for Python 2.7" in gpu_check.install_wheels(args)["none"]
