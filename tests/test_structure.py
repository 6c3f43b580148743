"""The code's structure stays as docs/architecture.md writes it down: imports of the project's own
modules run one way (to a lower layer, at a module's top), there are no cycles, no module imports an
entry point, and no line is squeezed past the formatter."""

import ast
import re

from conftest import ROOT

MODULES = sorted(path.stem for path in ROOT.glob("*.py"))
ROW = re.compile(r"^\|\s*(\d+)\s*\|(.*?)\|")


def documented_layers() -> dict[str, int]:
    """{module: layer} from the table of docs/architecture.md."""
    layers = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        row = ROW.match(line)
        if row:
            for module in re.findall(r"`(\w+)\.py`", row.group(2)):
                layers[module] = int(row.group(1))
    return layers


def own_imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported own module, line, whether the import stands at the module's top level) of every import."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        else:
            continue
        found += [(name, node.lineno, id(node) in top) for name in names if name in MODULES]
    return found


def entry_points() -> set[str]:
    """The modules with an `if __name__ == "__main__":` block."""
    return {
        m for m in MODULES if re.search(r'^if __name__ == "__main__":', (ROOT / f"{m}.py").read_text(), re.M)
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), or of one importing itself."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_every_module_is_in_the_documented_layers():
    layers = documented_layers()
    assert sorted(layers) == MODULES, "docs/architecture.md's table and the .py files differ"
    top = max(layers.values())
    assert {m for m, layer in layers.items() if layer == top} == entry_points(), (
        "the top layer: the entry points"
    )


def test_own_modules_are_imported_at_the_top_and_only_from_a_lower_layer():
    layers = documented_layers()
    late, upward = [], []
    for module in MODULES:
        for imported, line, at_top in own_imports(module):
            if not at_top:
                late.append(f"{module}.py:{line} imports {imported} inside a function or block")
            if layers[imported] >= layers[module]:
                where = f"{module}.py:{line} (layer {layers[module]})"
                upward.append(f"{where} imports {imported} (layer {layers[imported]})")
    assert late == [] and upward == []


def test_the_import_graph_has_no_cycle_and_no_entry_point_is_imported():
    graph = {module: {imported for imported, _, _ in own_imports(module)} for module in MODULES}
    assert cycles(graph) == []
    imported_entry_points = sorted(
        f"{module} imports {imported}" for module in MODULES for imported in graph[module] & entry_points()
    )
    assert imported_entry_points == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def lines_where(condition) -> list[str]:
    """'file:line' of every line of the code and the tests for which condition(line) holds."""
    return [
        f"{path.relative_to(ROOT)}:{number}"
        for path in [*ROOT.glob("*.py"), *(ROOT / "tests").glob("*.py")]
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if condition(line)
    ]


def test_no_line_is_kept_from_the_formatter():
    """No formatter escape (the fmt-skip comment) anywhere: a line that needs one says too much. Every
    line of the code and the tests within the 110 characters of pyproject.toml (ruff's E501 says so too)."""
    assert lines_where(lambda line: "fmt: " + "skip" in line) == []
    assert "line-length = 110" in (ROOT / "pyproject.toml").read_text()
    assert lines_where(lambda line: len(line) > 110) == []
