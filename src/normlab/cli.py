"""Command line: ``normlab info``, ``normlab bench`` and ``normlab study``."""

from __future__ import annotations

import argparse
import os
import platform
import sys

from normlab._machine import cpu_flags, cpu_model, version


def info_lines() -> list[str]:
    import normlab

    lines = [f"normlab {normlab.__version__}",
             f"python {platform.python_version()} ({sys.executable})",
             f"platform {platform.platform()}"]
    for dist in ("numpy", "numba", "torch", "triton", "scikit-learn", "matplotlib", "mnist1d"):
        lines.append(f"  {dist:<13} {version(dist)}")
    lines.append(f"cpu {cpu_model()}; {os.cpu_count()} logical cores; "
                 f"vector units: {', '.join(cpu_flags()) or 'unknown'}")
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                lines.append(f"gpu {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB")
        else:
            lines.append("gpu none (torch.cuda.is_available() is False)")
    except Exception as e:  # torch missing or broken: say so, do not hide it
        lines.append(f"gpu unknown (torch not importable: {e})")
    try:
        from normlab.kernels import available_backends

        backends = available_backends()
    except Exception as e:  # say what is broken rather than hide it
        lines.append(f"backends: unknown (normlab.kernels not importable: {type(e).__name__}: {e})")
    else:
        lines.append("backends:")
        per_device = {d: available_backends(d) for d in ("cpu", "cuda")}
        for name, b in backends.items():
            state = "available" if b["available"] else f"unavailable ({b['reason']})"
            default = f"; default for {', '.join(b['default_for'])}" if b["default_for"] else ""
            where = ""
            if b["available"] and "*" not in b["devices"]:
                where = "; runs here on " + ", ".join(
                    f"{d}: yes" if per_device[d][name]["available"]
                    else f"{d}: no ({per_device[d][name]['reason']})"
                    for d in b["devices"] if d in per_device)
            lines.append(f"  {name:<7} {state}; {b['description']}{default}{where}")
    lines.append(f"NORMLAB_BACKEND={os.environ.get('NORMLAB_BACKEND', '(unset)')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="normlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions, backends and CPU/GPU facts")
    from normlab import bench

    bench.add_arguments(sub.add_parser(
        "bench", help="time the kernels against torch, NumPy, scikit-learn and a memory copy",
        description="Time normlab's kernels against torch.nn.functional, the NumPy tutorial code, "
                    "scikit-learn and memory-copy bandwidth (see benchmarks/README.md)."))
    from normlab import study

    study.add_arguments(sub.add_parser(
        "study", help="measure BatchNorm's known strengths and failure modes on real data, with verdicts",
        description="Run the studies (default: all, quick profile, about 10 minutes on 2 cores) and write "
                    "results.jsonl, one PNG per study, report.md and report.html to --out."))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command == "info":
        print("\n".join(info_lines()))
        return 0
    if args.command == "bench":
        args.argv = argv[1:]
        return bench.run(args)
    if args.command == "study":
        return study.run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
