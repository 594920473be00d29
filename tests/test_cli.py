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
