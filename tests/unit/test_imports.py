"""The architecture as a rule over the import graph: the runtime imports nothing else of the trainer; data and
model import the runtime and the config, never each other; no room imports the run's modules above it."""
import ast
import shutil
from pathlib import Path

from tools.harness import ROOT

ROOMS = ("data", "model", "runtime")
MAY_IMPORT = {"runtime": {"runtime"}, "config": {"runtime", "config"}, "data": {"data", "runtime", "config"},
              "model": {"model", "runtime", "config"}}


def room(module: str) -> str:
    """trainer.data.batches -> data, trainer.config -> config, trainer.loop (a run module) -> run."""
    part = (module.split(".") + [""])[1]
    return part if part in ROOMS or part == "config" else "run"


def imported(path: Path) -> set[str]:
    """The trainer modules (or packages) a file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "trainer"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "trainer":
            found |= {f"trainer.{a.name}" for a in node.names} if node.module == "trainer" else {node.module}
    return found


def violations(trainer: Path) -> list[str]:
    wrong = []
    for path in sorted(trainer.rglob("*.py")):
        module = ".".join(("trainer", *path.relative_to(trainer).with_suffix("").parts))
        here = room(module)
        wrong += [f"{path.relative_to(trainer.parent)} ({here}) imports {target} ({room(target)})"
                  for target in sorted(imported(path)) if here != "run" and room(target) not in MAY_IMPORT[here]]
    return wrong


def test_each_room_imports_only_itself_the_runtime_and_the_config():
    assert violations(ROOT / "trainer") == []


def test_the_rule_sees_a_crossing_import_wherever_it_is_written(tmp_path):
    tree = shutil.copytree(ROOT / "trainer", tmp_path / "trainer", ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "data" / "augment.py").write_text((tree / "data" / "augment.py").read_text()
                                              + "\n\ndef f():\n    from trainer.model import ctc\n")
    (tree / "runtime" / "locks.py").write_text("from trainer import checkpoint\n"
                                               + (tree / "runtime" / "locks.py").read_text())
    assert violations(tree) == ["trainer/data/augment.py (data) imports trainer.model (model)",
                                "trainer/runtime/locks.py (runtime) imports trainer.checkpoint (run)"]


def test_each_package_says_what_it_holds_and_what_it_may_import():
    for name in ROOMS:
        doc = ast.get_docstring(ast.parse((ROOT / "trainer" / name / "__init__.py").read_text()))
        assert doc and "import" in doc.splitlines()[-1].lower(), name
