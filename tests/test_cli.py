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


def test_check_answers_63_only_for_formats_without_checks(tmp_path):
    import struct
    from imgkit import api
    raw = tmp_path / "s.raw"
    write_sparse(raw, MiB, [(0, b"x")])
    assert run_cli("check", raw).returncode == 63
    img = tmp_path / "v9.qcow2"
    api.convert(raw, img, "qcow2")
    data = bytearray(img.read_bytes())
    data[4:8] = struct.pack(">I", 9)                 # a qcow2 version imgkit cannot open
    img.write_bytes(bytes(data))
    res = run_cli("check", img)
    assert res.returncode == 1 and "version" in res.stderr


def test_map_into_a_closed_pipe_exits_like_sigpipe(tmp_path):
    import subprocess
    import sys
    src = tmp_path / "s.raw"
    write_sparse(src, 64 * MiB, [(i * MiB, b"x") for i in range(0, 64, 2)])
    proc = subprocess.Popen([sys.executable, "-m", "imgkit", "map", src], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    assert proc.wait(timeout=60) == 141 and proc.stderr.read() == b""
