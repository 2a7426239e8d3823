"""The architecture, checked from the source: which layer may import which, no import cycle, short files.

    cli ──► viz ──► online (plan, draws, inputs, transform, mlm, timix, relevance, mixgen, losses)
     │                 ├──► text    (grounding, tags, tokenize, align)
     │                 ├──► bank    (format, reader, writer, index: the contract between the stages)
     │                 └──► kernels (torch and triton only)
     └──► builder (offline: images -> bank) ──► bank

All of them may use the shared modules (errors, concepts, _deps); nothing but the CLI imports the
offline stage. Every import counts, those inside functions and under TYPE_CHECKING included: a lazy
import is still a dependency. Read with `ast`, nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"cmcaug": ROOT / "cmcaug", "cmcaug.kernels": ROOT / "kernels", "cmcaug.cli": ROOT / "cli",
           "cmcaug.benchmarks": ROOT / "benchmarks"}
ONLINE = {"cmcaug.plan", "cmcaug.text_encoders", "cmcaug.vlmixer", "cmcaug.draws", "cmcaug.inputs", "cmcaug.transform", "cmcaug.mlm", "cmcaug.timix",
          "cmcaug.relevance", "cmcaug.mixgen", "cmcaug.losses", "cmcaug.batch", "cmcaug.negatives", "cmcaug.plan_checks"}
SHARED = {"cmcaug", "cmcaug.errors", "cmcaug.concepts", "cmcaug._deps", "cmcaug._checkout", "cmcaug._version", "cmcaug._generator",
          "cmcaug.crops"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join([package, *parts])
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = modules()


def imports(name: str) -> set[str]:
    """The cmcaug modules `name` imports (a `from package import module` counts as the module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
            found |= submodules or {base}
    ancestors = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}  # loaded first, not depended on
    return {m for m in found if m in MODULES and m != name and m not in ancestors}


def layer(name: str) -> str:
    for prefix in ("cmcaug.kernels", "cmcaug.cli", "cmcaug.benchmarks", "cmcaug.bank", "cmcaug.builder",
                   "cmcaug.text", "cmcaug.viz"):
        if name == prefix or name.startswith(prefix + "."):
            return prefix.removeprefix("cmcaug.")
    if name in ONLINE:
        return "online"
    return "shared" if name in SHARED else name


# What each layer may import, besides itself and the shared modules (errors, concepts, _deps, the package).
ALLOWED = {
    "kernels": set(),
    "bank": set(),
    "text": set(),
    "builder": {"bank"},
    "online": {"kernels", "bank", "text", "online"},
    "viz": {"kernels", "bank", "text", "online"},
    "shared": set(),
    "cmcaug.synth": set(),
    "cmcaug._checkout": set(),
}


@pytest.mark.parametrize("name", sorted(m for m in MODULES if layer(m) not in ("cli", "benchmarks") and m != "cmcaug"))
def test_each_module_imports_only_the_layers_below_it(name):
    own = layer(name)
    allowed = ALLOWED[own] | {own}
    wrong = {m for m in imports(name) if layer(m) not in allowed and m not in SHARED}
    if own == "kernels":  # the kernels know only torch, triton and the errors (and the checkout guard)
        wrong |= {m for m in imports(name) if m in SHARED and m not in ("cmcaug.errors", "cmcaug._checkout")}
    assert not wrong, f"{name} ({own}) imports {sorted(wrong)}"


def test_no_import_cycle():
    graph = {name: imports(name) - {"cmcaug"} for name in MODULES}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_every_module_says_what_it_holds_and_stays_short():
    for name, path in MODULES.items():
        source = path.read_text()
        assert ast.get_docstring(ast.parse(source)), f"{path.relative_to(ROOT)} has no opening docstring"
        assert source.count("\n") <= 420, f"{path.relative_to(ROOT)} has {source.count(chr(10))} lines"
