"""The transformers floor: pyproject states the version the code really needs, and an older one is refused
in one line before it can load a model in the wrong dtype. (The suite's core was run against the floor
itself, transformers 4.56.2: benchmarks/RESULTS.md, "Reliability".)"""
import re
import tomllib
from pathlib import Path

import pytest

from perta_fast.cli import main
from perta_fast.hf import TRANSFORMERS_MIN


def test_pyproject_floor_is_the_code_floor():
    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(re.match(r"transformers>=([\d.]+)$", d.split("#")[0].strip()) for d in deps if d.startswith("transformers"))
    assert tuple(int(x) for x in floor.group(1).split(".")) == TRANSFORMERS_MIN


@pytest.mark.parametrize("version,refused", [("4.55.4", True), ("4.46.0", True), ("4.56.0", False), ("5.0.0.dev0", False)])
def test_older_transformers_is_refused_in_one_line(monkeypatch, capsys, tiny_dir, tmp_path, version, refused):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    (tmp_path / "d.json").write_text('[{"question": "q", "answer": "a"}]')
    code = main(["finetune", "--model", str(tiny_dir), "--data", str(tmp_path / "d.json"), "--out",
                 str(tmp_path / "o"), "--epochs", "1"])
    err = capsys.readouterr().err
    if refused:
        assert code == 2 and err == f"perta-fast: error: transformers {version} is too old: perta-fast needs 4.56 " \
            "or newer (pip install \"transformers>=4.56\")\n"
        assert not (tmp_path / "o").exists()
    else:
        assert code == 0, err


def test_no_benchmark_script_shadows_an_installed_module():
    """`python benchmarks/X.py` puts benchmarks/ first on sys.path, so a script named like an installed top-level
    module replaces it for everything the script imports: benchmarks/kernels.py hid Hugging Face's `kernels`,
    which transformers >= 5.25 imports, and every model load in a benchmark failed."""
    import importlib.util
    import sys

    bench = (Path(__file__).parents[1] / "benchmarks").resolve()
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != bench]
    try:
        clashes = [f.stem for f in bench.glob("*.py") if f.stem not in sys.modules and importlib.util.find_spec(f.stem)]
        clashes += [f.stem for f in bench.glob("*.py") if f.stem in sys.modules
                    and Path(getattr(sys.modules[f.stem], "__file__", None) or bench).resolve().parent != bench]
    finally:
        sys.path[:] = saved
    assert clashes == []


def test_the_package_version_is_pyprojects():
    from perta_fast import __version__

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__

