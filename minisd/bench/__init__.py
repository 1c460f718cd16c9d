"""Side-by-side benchmarks of minisd and the reference implementations, in one process.

    python -m minisd.bench sample --config sd small tiny --batch 1 8 32 --compile both   # vs diffusers
    python -m minisd.bench train --config small tiny --batch 64                          # vs BK-SDM's KD step
    python -m minisd.bench train --config small --batch 48 64 96 128 --memory-probe
        # largest batch (CUDA)
    python -m minisd.bench sample --config tiny --small --size 64 --steps 2 --batch 1 2 --device cpu
        # smoke run
    python -m minisd.bench sample --config sd tiny --scheduler pndm lcm --vae sd tiny --batch 1 8
        # few-step BK-SDM: 25 PNDM steps with CFG beside 4 LCM steps, SD's decoder beside TAESD
    python -m minisd.bench layout --config sd tiny --threads 1
        # the U-Net, its transformer and attention alone, minisd's layouts against diffusers, 512 px, CPU
    python -m minisd.bench gpu-check --out DIR
        # every GPU goal in one command, under 8 minutes (--dry-run: the same on a CPU, reduced)

Models carry random weights at the real configs (models.py); the libraries alternate, warm-up
excluded, and the figures land in --out (default bench/) as JSON, Markdown and, for sampling, a PNG
of images/s against batch size. FLOPs come from the analytic count of minisd.flops.

    models.py     random-weight minisd pipelines
    reference.py  their diffusers/transformers twins: the only module that imports those libraries
    measure.py    timing, peak memory, the device's peak TFLOP/s, host-device sync counts
    sampling.py   `sample`: Pipeline vs StableDiffusionPipeline
    kd_steps.py   train.py's KD step, and BK-SDM's reference step (hooks, fp16, checkpointing)
    training.py   `train`: the two KD steps, and the memory probe
    report.py     JSON, Markdown tables and the plot
    commands.py   the `sample` and `train` commands (__main__.py only dispatches)
    gpu_check.py  `gpu-check`: the parts, their time caps and budget, the install of the wheels
    gpu_parts.py  what each part of the check runs: the harnesses above, and the real scripts
    gpu_report.py the check's report: the goals against the figures, then each part
    wheels.py     `gpu-wheels`: the wheels the check needs beyond torch, packed for a machine without network
diffusers and transformers (requirements-test.txt) are imported only when the reference side runs.
"""
