"""python -m minisd.bench {sample,train,layout,gpu-check,gpu-wheels}: see minisd/bench/__init__.py.

Only a dispatcher, importing nothing at its top: gpu-check starts on a machine that may hold torch alone,
and installs minisd's other requirements before anything imports them (minisd/bench/wheels.py)."""

import sys

GPU_COMMANDS = ("gpu-check", "gpu-wheels")  # gpu_check.py; sample, train and layout: commands.py


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in GPU_COMMANDS:
        from minisd.bench import gpu_check

        return gpu_check.main(argv)
    from minisd.bench import commands

    return commands.main(argv)


if __name__ == "__main__":
    sys.exit(main())
