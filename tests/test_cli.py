"""CLI behaviour shared by every command: progress styles, help, version, one-line errors."""
import json

from conftest import run_cli, write_sparse

MiB = 1 << 20


def test_progress_json_lines(tmp_path):
    src = tmp_path / "s.raw"
    write_sparse(src, 16 * MiB, [(0, b"x" * MiB)])
    res = run_cli("convert", "-O", "raw", "--progress", "json", src, tmp_path / "d.raw")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stderr.splitlines()]
    assert lines and lines[-1]["done"] == lines[-1]["total"] == 16 * MiB
    assert lines[-1]["percent"] == 100.0 and lines[-1]["task"] == "convert"


def test_quiet_and_default_are_silent_off_a_terminal(tmp_path):
    src = tmp_path / "s.raw"
    write_sparse(src, MiB, [(0, b"x")])
    for extra in (["-q"], []):
        dst = tmp_path / f"d{len(extra)}.raw"
        res = run_cli("convert", "-O", "raw", *extra, src, dst)
        assert res.returncode == 0 and res.stderr == "" and res.stdout == ""


def test_progress_bar_with_p(tmp_path):
    src = tmp_path / "s.raw"
    write_sparse(src, 8 * MiB, [(0, b"x" * MiB)])
    res = run_cli("convert", "-O", "raw", "-p", src, tmp_path / "d.raw")
    assert res.returncode == 0 and "convert" in res.stderr


def test_help_and_version():
    res = run_cli("--help")
    assert res.returncode == 0 and "convert" in res.stdout and "Exit codes" in res.stdout
    res = run_cli("--version")
    assert res.returncode == 0 and "imgkit" in res.stdout


def test_usage_errors_exit_2():
    res = run_cli("convert")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    res = run_cli("no-such-command")
    assert res.returncode == 2


def test_info_json_keys_follow_qemu(tmp_path):
    src = tmp_path / "s.raw"
    write_sparse(src, 3 * MiB, [(MiB, b"x" * 4096)])
    res = run_cli("info", "--output", "json", src)
    data = json.loads(res.stdout)
    assert data["format"] == "raw" and data["virtual-size"] == 3 * MiB
    assert {"filename", "actual-size", "dirty-flag"} <= set(data)
