"""The root folders install as `pefomed.*` and never shadow PyPI packages of the same name."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOT_PACKAGES = ("engine", "kernels", "models", "train", "evaluate", "bench")
SHADOWED = ("kernels", "evaluate")  # Hugging Face's packages of these names exist on PyPI


def run_python(code: str, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def write_stand_ins(folder: Path) -> None:
    """Top-level `kernels` and `evaluate` packages, as Hugging Face's would be installed."""
    (folder / "kernels").mkdir()
    (folder / "kernels" / "__init__.py").write_text(textwrap.dedent("""
        OWNER = "hf-stand-in"

        class _Kernel:
            @staticmethod
            def gemm_4bit_forward(*args):
                raise NotImplementedError

        def get_kernel(repo_id, version=None):
            assert repo_id.startswith("kernels-community/")
            return _Kernel()
    """))
    (folder / "evaluate").mkdir()
    (folder / "evaluate" / "__init__.py").write_text('OWNER = "hf-stand-in"\ndef load(name): return name\n')


def test_nothing_is_installed_at_top_level(tmp_path):
    code = f"""
        import importlib.util
        for name in {ROOT_PACKAGES!r}:
            assert importlib.util.find_spec(name) is None, name
        import pefomed
        for name in {ROOT_PACKAGES!r}:
            module = __import__("pefomed." + name, fromlist=["_"])
            assert module.__file__.startswith({str(ROOT)!r}), module.__file__
        print("ok")
    """
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_theirs_and_ours_import_side_by_side(tmp_path):
    write_stand_ins(tmp_path)
    code = """
        import kernels, evaluate
        assert kernels.OWNER == "hf-stand-in" and evaluate.OWNER == "hf-stand-in"
        import pefomed.kernels.nf4, pefomed.kernels.reference, pefomed.evaluate.score, pefomed.evaluate.metrics.vqa
        assert pefomed.evaluate.score.main and pefomed.kernels.nf4.to_nf4
        assert kernels.get_kernel("kernels-community/x") is not None  # still theirs after ours loaded
        print("ok")
    """
    result = run_python(code, cwd=tmp_path, pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_bitsandbytes_finds_the_real_kernels_package_not_ours(tmp_path):
    """bitsandbytes' CPU backend does `from kernels import get_kernel` on import.

    With a `kernels` package that has `get_kernel` on the path (here a stand-in for Hugging
    Face's; the real one would reach the Hub), it says nothing about kernels-community, even
    after pefomed's kernels are imported: ours no longer answer to `import kernels`.
    """
    pytest.importorskip("bitsandbytes")
    write_stand_ins(tmp_path)
    code = """
        import pefomed.kernels.nf4
        import bitsandbytes, kernels
        assert kernels.OWNER == "hf-stand-in"
        print("ok")
    """
    result = run_python(code, cwd=tmp_path, pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "kernels-community" not in result.stdout + result.stderr
    # Without any `kernels` package, the message is bitsandbytes' own about a missing module,
    # never the import error that a shadowing `kernels/` of ours used to cause.
    bare = run_python("import pefomed.kernels.nf4, bitsandbytes", cwd=tmp_path)
    assert bare.returncode == 0, bare.stderr
    assert "cannot import name 'get_kernel'" not in bare.stderr


def test_no_sys_path_editing_in_the_package():
    offenders = [
        str(p.relative_to(ROOT))
        for name in (*ROOT_PACKAGES, "pefomed")
        for p in (ROOT / name).rglob("*.py")
        if "sys.path.insert" in p.read_text() or "sys.path.append" in p.read_text()
    ]
    assert offenders == []


@pytest.mark.parametrize("command", [
    ["pefomed", "--help"],
    ["pefomed", "score", "--help"],
    ["pefomed", "eval", "--help"],
    ["pefomed", "ask", "--help"],
    ["pefomed", "train", "--help"],
    ["pefomed", "demo", "--help"],
    ["pefomed", "bench", "kernels", "--help"],
    [sys.executable, "-m", "pefomed", "--help"],
    [sys.executable, "-m", "pefomed.evaluate.score", "--help"],
    [sys.executable, "-m", "pefomed.train.run", "--help"],
    [sys.executable, str(ROOT / "train" / "run.py"), "--help"],
])
def test_every_entry_point_starts(command, tmp_path):
    if command[0] == "pefomed":
        command = [str(Path(sys.executable).with_name("pefomed")), *command[1:]]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_unknown_command_is_one_line_and_exit_2(tmp_path):
    pefomed = str(Path(sys.executable).with_name("pefomed"))
    result = subprocess.run([pefomed, "trian"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown command 'trian'")


def test_python_dash_m_inside_the_checkout_does_not_shadow_pypi_packages():
    """`python -m pefomed.<module>` from the checkout's root: `import kernels` is not our folder."""
    code = [sys.executable, "-m", "pefomed.engine.fetch", "--help"]
    assert subprocess.run(code, cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    probe = ("import pefomed, importlib.util; "
             "spec = importlib.util.find_spec('kernels'); "
             f"assert spec is None or not spec.origin.startswith({str(ROOT)!r}), spec.origin; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
