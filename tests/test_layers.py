"""The layers of gradus (docs/architecture.md): a module imports only from its own layer or the ones below it, so
nothing runs back up and there is no import circle between layers. Imports inside functions count too (a lazy
import is still a dependency), except those under `if TYPE_CHECKING:` (annotations only)."""

from __future__ import annotations

import ast
from pathlib import Path

import gradus

SRC = Path(gradus.__file__).parent

# bottom first; a module's layer is the first entry that is its path or a folder above it
LAYERS: list[tuple[str, ...]] = [
    ("objectives", "logprobs.py", "tasks", "threads.py", "config_spec.py", "config_aliases.py", "__init__.py"),
    ("config.py", "demo.py"),
    ("rewards", "models"),
    ("parallel",),
    ("algorithm.py", "rollout"),
    ("envs",),
    ("config_checks.py",),
    ("runtime",),
    ("train",),
    ("errors.py", "compare"),
    ("cli.py", "__main__.py"),
]


def layer_of(rel: str) -> int:
    for i, members in enumerate(LAYERS):
        for member in members:
            if rel == member or rel.startswith(member.rstrip("/") + "/"):
                return i
    raise AssertionError(f"{rel} is in no layer: add it to LAYERS (and docs/architecture.md)")


def _module_file(module: str) -> str | None:
    """gradus.train.update -> train/update.py; None outside gradus."""
    if module != "gradus" and not module.startswith("gradus."):
        return None
    parts = module.split(".")[1:]
    if not parts:
        return "__init__.py"
    path = SRC.joinpath(*parts)
    return f"{'/'.join(parts)}/__init__.py" if path.is_dir() else f"{'/'.join(parts)}.py"


def _imports(tree: ast.AST) -> list[str]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            for alias in node.names:  # `from gradus.train import moe`: the module moe itself
                file = _module_file(f"{node.module}.{alias.name}")
                if file and (SRC / file).exists():
                    found.append(f"{node.module}.{alias.name}")
    return found


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        mine = layer_of(rel)
        for module in _imports(ast.parse(path.read_text())):
            target = _module_file(module)
            if target is None or not (SRC / target).exists() or target.startswith(rel.rsplit("/", 1)[0] + "/"):
                continue
            if layer_of(target) > mine:
                upward.append(f"{rel} (layer {mine}) imports {module} (layer {layer_of(target)})")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import():
    """A test that could not fail would prove nothing: an import of the trainer from the objectives is caught."""
    tree = ast.parse("from gradus.train.trainer import Trainer\n")
    assert layer_of(_module_file(_imports(tree)[0])) > layer_of("objectives/policy.py")


def test_the_architecture_page_shows_these_layers():
    """docs/architecture.md's layer table is this order (one source: this file; the page must follow it)."""
    page = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    rows = [line.split("|")[2] for line in page.splitlines() if line.startswith("| ") and line.split("|")[1].strip()
            .isdigit()]
    shown = [tuple(sorted(m.strip(" `").rstrip("/") for m in row.split(",") if m.strip())) for row in rows]
    wanted = [tuple(sorted(m.rstrip("/") for m in layer if m != "__init__.py")) for layer in LAYERS]
    assert shown == wanted
