"""The package's shape, checked: no import circle among its modules (function-level imports included), the
merge path loads neither transformers nor triton, every command's flags come from its options dataclasses,
the module map in DEVELOPERS.md names exactly the files there are, and the top-level kernels/ folder never
shadows the `kernels` package transformers imports."""
import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "perta_fast"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = ["perta_fast", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """perta_fast module -> the perta_fast modules it imports anywhere in its source (inside functions too;
    `from . import x` is the submodule x when there is one, else the package's __init__). kernels/ is
    installed as perta_fast.kernels; the C++ extension perta_fast._cpp imports nothing of ours."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    files.update({"perta_fast.kernels" + ("" if p.stem == "__init__" else f".{p.stem}"): p
                  for p in (ROOT / "kernels").glob("*.py")})
    modules = set(files) | {"perta_fast._cpp", "perta_fast.kernels"}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" or name == "perta_fast.kernels" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in modules else target)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                edges.update(m for m in mods if m in files)
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_circle_among_the_packages_modules():
    graph = import_graph()
    assert {"perta_fast.merge", "perta_fast.importance", "perta_fast.cli"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_circle():
    graph = import_graph()
    graph["perta_fast.memory"] = graph["perta_fast.memory"] | {"perta_fast.merge"}  # merge imports memory
    assert find_cycle(graph) is not None


def _loaded_after(code: str, *argv: str) -> set[str]:
    probe = code + "\nimport sys; print('LOADED:', *sorted(m for m in sys.modules if m.split('.')[0] in " \
                   "('transformers', 'triton', 'peft', 'scipy')))"
    proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.strip().splitlines()[-1].split()[1:])


def test_the_merge_path_stays_light(tmp_path):
    """import perta_fast.merge, `perta-fast merge --help` and a whole CPU merge: torch and safetensors only."""
    from helpers import random_tensors, write_checkpoint

    shapes = {"a.weight": (8, 4), "b.weight": (5,)}
    base = write_checkpoint(tmp_path / "base", random_tensors(shapes, seed=1))
    ft = write_checkpoint(tmp_path / "ft", random_tensors(shapes, seed=2))
    assert _loaded_after("import perta_fast.merge") == set()
    assert _loaded_after("from perta_fast.cli import main; assert main(['merge', '--help']) == 0") == set()
    merge = (f"from perta_fast.cli import main; assert main(['merge', '--base', {str(base)!r}, '--finetuned', "
             f"{str(ft)!r}, '--out', {str(tmp_path / 'out')!r}, '--method', 'tv', '-q']) == 0")
    assert _loaded_after(merge) == set()
    assert (tmp_path / "out" / "perta_merge.json").is_file()
    # the probe itself sees a heavy import when there is one
    assert "transformers" in _loaded_after("import perta_fast.merge, transformers")


def test_python_m_perta_fast_merge_help_imports_neither_transformers_nor_triton():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "perta_fast", "merge", "--help"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "--finetuned" in proc.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" in imported and not imported & {"transformers", "triton"}


# ---------------------------------------------------------------- options and flags

def _commands():
    from perta_fast.cli import COMMANDS_SPEC, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return COMMANDS_SPEC, sub.choices


def _flagged_fields(spec) -> set[str]:
    from perta_fast.cli import option_fields

    names = set()
    for s in spec:
        defaults, only = s if isinstance(s, tuple) else (s, None)
        names |= {f.name for f, _ in option_fields(defaults, only)}
    return names


@pytest.mark.parametrize("command", ["finetune", "importance", "merge", "calibrate", "unlearn", "baseline", "eval",
                                     "plan", "demo", "convert-gguf", "info"])
def test_every_flag_is_an_input_or_an_options_field_and_every_field_has_a_flag(command):
    spec, parsers = _commands()
    _, inputs, option_sets = spec[command]
    dests = {a.dest for a in parsers[command]._actions} - {"help", "verbosity"}
    input_dests = {flag.lstrip("-").replace("-", "_") for flag, _ in inputs}
    fields = _flagged_fields(option_sets)
    assert dests == input_dests | fields, (dests ^ (input_dests | fields))
    for s in option_sets:  # every field not hidden has a flag, nested options included
        defaults = s[0] if isinstance(s, tuple) else s
        only = s[1] if isinstance(s, tuple) else None
        for f in dataclasses.fields(defaults):
            value = getattr(defaults, f.name)
            if only is None and not f.metadata.get("hidden") and not dataclasses.is_dataclass(value):
                assert f.name in dests, f"{type(defaults).__name__}.{f.name} has no flag on {command}"


@pytest.mark.parametrize("command,cls", [("finetune", "FinetuneOptions"), ("importance", "ImportanceOptions"),
                                         ("merge", "MergeOptions"), ("calibrate", "CalibrateOptions"),
                                         ("unlearn", "UnlearnOptions"), ("baseline", "BaselineOptions"),
                                         ("eval", "EvalOptions"), ("plan", "PlanOptions"), ("demo", "DemoOptions")])
def test_flag_defaults_build_the_options_defaults(command, cls, tmp_path):
    """Parsing a command with only its required inputs gives exactly the options dataclass's defaults: no
    default is written a second time in the CLI."""
    from perta_fast import options
    from perta_fast.cli import build_options, build_parser

    required = {"finetune": ["--model", "m", "--data", "d", "--out", "o"], "merge": ["--base", "b", "--finetuned", "f",
                "--out", "o"], "calibrate": ["--base", "b", "--finetuned", "f", "--forget", "f", "--retain", "r"],
                "plan": ["--model", "m"], "eval": [], "demo": []}
    argv = required.get(command, ["--model", "m", "--forget", "f", "--retain", "r", "--out", "o"])
    a = build_parser().parse_args([command, *argv])
    want = getattr(options, cls)()
    assert build_options(type(want), a) == want


def test_options_live_where_users_import_them():
    from perta_fast import options
    from perta_fast.baselines import BaselineOptions
    from perta_fast.calibration import CalibrateOptions
    from perta_fast.eval import EvalOptions
    from perta_fast.importance import ImportanceOptions
    from perta_fast.merge import MergeOptions
    from perta_fast.pipeline import DemoOptions, UnlearnOptions
    from perta_fast.train import FinetuneOptions

    for cls in (BaselineOptions, CalibrateOptions, EvalOptions, ImportanceOptions, MergeOptions, DemoOptions,
                UnlearnOptions, FinetuneOptions):
        assert getattr(options, cls.__name__) is cls


def test_constants_the_options_repeat_are_the_codes():
    from perta_fast import dtypes, options, scoring

    assert options.DTYPE_NAMES == dtypes.NAMES and options.GENERATE_BATCH == scoring.GENERATE_BATCH


# ---------------------------------------------------------------- the module map and the kernels folder

def test_developers_module_map_names_every_module():
    text = (ROOT / "DEVELOPERS.md").read_text()
    section = text[text.index("## Module map"):]
    section = section[:section.index("\n## ", 4)]
    mapped = {line.split("|")[1].strip().strip("`") for line in section.splitlines()
              if line.startswith("| ") and not line.startswith("| module") and "---" not in line}
    files = {str(p.relative_to(ROOT).with_suffix("")).replace("/__init__", "").replace(os.sep, "/")
             for p in [*PACKAGE.rglob("*.py"), *(ROOT / "kernels").glob("*.py")]
             if p.name not in ("__main__.py", "_version.py")}
    files = {f.removeprefix("perta_fast/") for f in files} - {"perta_fast"}
    assert mapped == files, (sorted(mapped - files), sorted(files - mapped))


def test_the_kernels_folder_never_shadows_a_package_of_that_name(tmp_path):
    """Run from the checkout (its root first on sys.path, as `python -m` puts it), `import kernels` must
    find the installed package of that name (Hugging Face's, which transformers imports), never our folder:
    kernels/ is a plain folder, not a package, so any real package of the name wins over it."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'the installed package'\n")
    code = "import kernels; print(kernels.WHO)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path / 'site'}"})
    assert proc.returncode == 0 and proc.stdout.strip() == "the installed package", proc.stderr
    assert not (ROOT / "kernels" / "__init__.py").exists()
    from perta_fast.kernels import merge  # noqa: F401  and ours is still perta_fast.kernels
