"""The command line: info output, the demo, and errors as messages with exit code 2."""
import json
import subprocess
import sys

import pytest

import fastmerge
from fastmerge import cli


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastmerge", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_info_lines_are_aligned_key_value(capsys):
    assert cli.main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = [line.split(":", 1)[0] for line in lines]
    assert keys == list(fastmerge.build_info())
    # values start in one column
    starts = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in lines}
    assert len(starts) == 1


def test_info_json_has_build_keys(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("version", "native", "cuda", "cuda_archs", "cpu_simd", "threads"):
        assert key in info
    assert info["version"] == fastmerge.__version__
    assert isinstance(info["cuda_archs"], list)


def test_python_m_fastmerge_info_json():
    proc = run_cli("info", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["version"] == fastmerge.__version__


def test_demo_quick_exits_zero():
    proc = run_cli("demo", "--quick", "--no-mergekit")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from fastmerge.demo import DEMO_METHODS

    for method in DEMO_METHODS:
        assert method in proc.stdout
    assert "Traceback" not in proc.stderr


def test_fastmerge_error_is_message_and_exit_2():
    proc = run_cli("demo", "--quick", "--no-mergekit", "--density", "1.5")
    assert proc.returncode == 2
    assert "density" in proc.stderr and "1.5" in proc.stderr
    assert proc.stderr.startswith("fastmerge: error:")
    assert "Traceback" not in proc.stderr + proc.stdout


def test_guarded_maps_fastmerge_errors_only(capsys):
    def boom():
        raise fastmerge.InvalidArgumentError("tensor 'x' is bad")

    assert cli.guarded(boom) == 2
    assert capsys.readouterr().err == "fastmerge: error: tensor 'x' is bad\n"

    def bug():
        raise RuntimeError("a bug keeps its traceback")

    with pytest.raises(RuntimeError):
        cli.guarded(bug)


def test_usage_errors_exit_2():
    proc = run_cli("demo", "--threads", "0")
    assert proc.returncode == 2
    assert "positive integer" in proc.stderr
