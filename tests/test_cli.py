"""The command line: `normlab info` prints versions, backends and hardware facts."""

import subprocess
import sys

from normlab import cli


def test_info_lists_versions_backends_and_hardware(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("normlab ")
    for dist in ("numpy", "numba", "torch", "scikit-learn"):
        assert dist in out
    assert "cpu " in out and "gpu " in out
    assert "backends:" in out


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "normlab", "info"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "normlab" in proc.stdout


def test_unknown_command_fails_with_usage(capsys):
    try:
        cli.main(["frobnicate"])
    except SystemExit as e:
        assert e.code == 2
    else:  # pragma: no cover - argparse always exits
        raise AssertionError("an unknown command must not succeed")
    assert "invalid choice" in capsys.readouterr().err


def test_bench_quick_smoke(tmp_path):
    """`normlab bench --quick` runs end to end (no timing assertion: CI machines are noisy)."""
    proc = subprocess.run([sys.executable, "-m", "normlab", "bench", "--quick", "--repeat", "1",
                           "--min-time", "0.002", "--out", str(tmp_path), "--tag", "smoke"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parity mismatches: 0, errors: 0" in proc.stdout
    assert "nn modules fwd+bwd vs torch.nn: median x" in proc.stdout and "MISMATCH" not in proc.stdout
    assert "training step, normlab norms vs torch.nn norms: x" in proc.stdout
    assert (tmp_path / "cpu-smoke.md").exists() and (tmp_path / "cpu-smoke.json").exists()


def test_info_lists_the_kernel_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numba   available" in out or "numba   unavailable" in out
    assert "numpy   available" in out
