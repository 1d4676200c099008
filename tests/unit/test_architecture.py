"""The layering of docs/architecture.md, checked on every import statement of the service:
a module imports only from its own layer or lower ones (type-only imports under
`TYPE_CHECKING` excepted where the document lists them)."""
from __future__ import annotations

import ast
from pathlib import Path

import sampler_service

PACKAGE = Path(sampler_service.__file__).parent
#: Top-level module or package of sampler_service -> layer, from the bottom (docs/architecture.md).
LAYERS = {
    "errors": 1, "device": 1, "logs": 1, "kernels": 1,
    "text": 2,
    "policy": 3,
    "state": 4, "step_logits": 4,
    "engine": 5,
    "groups": 6, "speculative": 6,
    "service": 7, "saved": 7, "policy_admin": 7,
    "transport": 8, "server": 8,
    "cli": 9, "docgen": 9, "__main__": 9, "__init__": 0,
}
#: Upward imports allowed under TYPE_CHECKING only: (importing module, imported module).
TYPE_ONLY = {
    ("sampler_service.policy.processors.base", "sampler_service.groups.base"),
    ("sampler_service.policy.processors.constraints", "sampler_service.state"),
    ("sampler_service.policy.processors.structured", "sampler_service.state"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def _imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(imported sampler_service module, whether under `if TYPE_CHECKING:`) of every import."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, type_only) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, type_only))
            if node.module == "sampler_service":  # from sampler_service import speculative
                found.extend((f"sampler_service.{a.name}", type_only) for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(tree, False)
    return [(name, t) for name, t in found
            if name.startswith("sampler_service.") and name != "sampler_service"]


def test_every_top_level_module_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert names <= set(LAYERS), names - set(LAYERS)


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path)
        for target, type_only in _imports(ast.parse(path.read_text(), str(path))):
            if _layer(target) > _layer(source) and not (
                    type_only and any(source == s and target.startswith(t) for s, t in TYPE_ONLY)):
                upward.append(f"{source} -> {target}{' (type only)' if type_only else ''}")
    assert upward == []
