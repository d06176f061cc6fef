"""Dependencies run one way, checked on the source (every import, module-level, in functions or for type
checking): the contract (``shared``) knows no server; the stage server framework (``shared.serving``) knows
no stage and not central; a stage never imports central or another stage; and no two modules import each
other, directly or around a longer loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("shared", "central", "text_encoder", "diffusion_unet", "vae_decoder")
STAGES = ("text_encoder", "diffusion_unet", "vae_decoder")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The project modules ``path`` imports (``from a.b import c`` counts a.b, and a.b.c when it is one)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in out if name.split(".")[0] in PACKAGES}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in files and m != name} for name, path in files.items()}


def test_the_contract_knows_no_server(graph: dict[str, set[str]]) -> None:
    for name, deps in graph.items():
        if name.startswith("shared") and not name.startswith("shared.serving"):
            assert not {d for d in deps if d.startswith("shared.serving") or not d.startswith("shared")}, name


def test_the_serving_layer_knows_no_stage_nor_central(graph: dict[str, set[str]]) -> None:
    for name, deps in graph.items():
        if name.startswith("shared.serving"):
            assert all(d.startswith("shared") for d in deps), (name, deps)


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_only_itself_and_shared(graph: dict[str, set[str]], stage: str) -> None:
    for name, deps in graph.items():
        if name.split(".")[0] == stage:
            assert all(d.split(".")[0] in ("shared", stage) for d in deps), (name, deps)


def test_centrals_client_imports_no_server(graph: dict[str, set[str]]) -> None:
    assert all(d.startswith("shared") and not d.startswith("shared.serving") for d in graph["central.clients"])


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
