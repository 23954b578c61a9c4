"""benchmarks/gpu_check.py refuses bad input in one line before anything runs;
benchmarks/gpu_wheels.py reads requirements for the target Python and repacks wheels that pip
installs."""

import importlib.util
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_out_that_is_no_folder_is_refused(tmp_path):
    missing = tmp_path / "absent"
    out = subprocess.run([sys.executable, str(SCRIPT), "--cpu-rehearsal", "--out", str(missing)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert f"--out {missing} is not a folder" in out.stderr
    assert not missing.exists()


WHEELS_SCRIPT = SCRIPT.parent / "gpu_wheels.py"
_spec = importlib.util.spec_from_file_location("gpu_wheels", WHEELS_SCRIPT)
gpu_wheels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_wheels)


def make_wheel(path: Path, requires: list[str]) -> Path:
    meta = "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("demo-1.0.dist-info/METADATA", meta)
        z.writestr("demo-1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        tool = zipfile.ZipInfo("demo/bin/tool")
        tool.external_attr = (stat.S_IFREG | 0o755) << 16  # an executable, as Ray's raylet is
        z.writestr(tool, b"\x7fELF" + bytes(5000))
        z.writestr("demo/jars/big.jar", bytes(range(256)) * 400)
        z.writestr("demo-1.0.dist-info/RECORD",
                   "demo/bin/tool,sha256=x,5004\ndemo/jars/big.jar,sha256=y,102400\n")
    return path


def test_requirements_follow_the_target_python_and_extras(tmp_path):
    wheel = make_wheel(tmp_path / "demo-1.0-py3-none-any.whl", [
        "click>=7", 'async-timeout; python_version < "3.11"', 'pandas; extra == "tune"',
        'pydantic<3; python_version < "3.14" and extra == "train"',
        'pywin32; sys_platform == "win32"'])

    def names(extras: set[str]) -> list[str]:
        return sorted(r.name for r in gpu_wheels.requirements(wheel, extras, "3.12"))

    assert names(set()) == ["click"]
    assert names({"train", "tune"}) == ["click", "pandas", "pydantic"]
    assert [r.name for r in gpu_wheels.requirements(wheel, set(), "3.10")] == ["click",
                                                                                "async-timeout"]


def test_repack_leaves_out_a_folder_keeps_every_other_file_and_its_mode(tmp_path):
    wheel = make_wheel(tmp_path / "demo-1.0-py3-none-any.whl", [])
    with zipfile.ZipFile(wheel) as z:
        tool = z.read("demo/bin/tool")
    saved = gpu_wheels.repack(wheel, ("demo/jars/",))
    assert saved > 0
    with zipfile.ZipFile(wheel) as z:
        assert sorted(z.namelist()) == ["demo-1.0.dist-info/METADATA", "demo-1.0.dist-info/RECORD",
                                        "demo-1.0.dist-info/WHEEL", "demo/bin/tool"]
        info = z.getinfo("demo/bin/tool")
        assert info.compress_type == zipfile.ZIP_LZMA and info.external_attr >> 16 == stat.S_IFREG | 0o755
        assert z.read("demo/bin/tool") == tool
        assert "jars" not in z.read("demo-1.0.dist-info/RECORD").decode()
    # pip installs the repacked wheel, executable bit included.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--target", str(site), str(wheel)], check=True, capture_output=True)
    assert (site / "demo" / "bin" / "tool").stat().st_mode & 0o111
    assert not (site / "demo" / "jars").exists()
