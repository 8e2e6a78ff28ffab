"""The project stands on its own: no file of it points readers at files outside the repository."""

from __future__ import annotations

import subprocess

from tests.conftest import REPO

# the names of the steering folder's files, spelled so that this file does not contain them
OUTSIDE = ("FIELD" + "_NOTES", ".." + "/shared")


def test_no_file_points_outside_the_project():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    outside = [f for f in files if any(ref in (REPO / f).read_text(errors="replace") for ref in OUTSIDE)]
    assert outside == []


def _imports(path) -> list[str]:
    """Every module a file imports, at module level or inside a function."""
    import ast

    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _violations(folder: str, allowed, exclude: str | None = None) -> dict[str, list[str]]:
    out = {}
    for f in sorted((REPO / folder).rglob("*.py")):
        rel = f.relative_to(REPO).as_posix()
        if exclude and rel.startswith(exclude):
            continue
        bad = [m for m in _imports(f) if not allowed(m)]
        if bad:
            out[rel] = bad
    return out


CONTRACT = "hpctrain.launcher.contract"


def _is(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_contract_imports_nothing_of_the_project_and_no_torch():
    def allowed(m):
        if _is(m, "hpctrain"):
            return _is(m, CONTRACT)
        return not any(_is(m, heavy) for heavy in ("torch", "transformers", "deepspeed", "peft"))

    assert _violations("launcher/contract", allowed) == {}


def test_the_launcher_reaches_trainers_and_tools_only_through_a_command_line():
    def allowed(m):
        return not (_is(m, "hpctrain.trainers") or _is(m, "hpctrain.tools"))

    assert _violations("launcher", allowed, exclude="launcher/contract/") == {}


def test_trainers_and_tools_import_only_the_contract_from_the_launcher():
    def allowed(m):
        return not _is(m, "hpctrain.launcher") or _is(m, CONTRACT)

    assert _violations("trainers", allowed) == {}
    assert _violations("tools", allowed) == {}
    assert _violations("trainers", lambda m: not _is(m, "hpctrain.tools")) == {}
    assert _violations("tools", lambda m: not _is(m, "hpctrain.trainers")) == {}


def _python_files(*folders: str):
    for folder in folders:
        yield from sorted((REPO / folder).rglob("*.py"))


FINETUNE_NAMES = {"sft", "classify", "reward", "dpo", "grpo", "full", "lora", "qlora"}  # fine-tuning kinds and methods (their values)


def test_fine_tuning_kinds_and_methods_are_compared_only_in_the_contract():
    """A kind or method is asked for what it declares (its spec class, `Method`, its task module),
    never recognized by its name: adding a kind touches no `if kind == ...` elsewhere."""
    import ast

    found = []
    for f in _python_files("launcher", "trainers", "tools"):
        rel = f.relative_to(REPO).as_posix()
        if rel.startswith("launcher/contract/"):
            continue
        for node in ast.walk(ast.parse(f.read_text(), rel)):
            if isinstance(node, ast.Compare):
                parts = [node.left, *node.comparators]
                names = {p.value for p in parts if isinstance(p, ast.Constant)}
                names |= {e.value for p in parts if isinstance(p, ast.Tuple | ast.List | ast.Set)
                          for e in p.elts if isinstance(e, ast.Constant)}
                named = {p.attr if isinstance(p, ast.Attribute) else p.id for p in parts
                         if isinstance(p, ast.Attribute | ast.Name)}
                if names & FINETUNE_NAMES and named & {"kind", "method"}:
                    found.append(f"{rel}:{node.lineno}")
    assert found == []


def test_only_engine_class_reads_the_engine_type_in_the_trainers():
    """Trainers ask the engine (or its class) what they need; `engine_class` alone turns
    `engine.type` into a class."""
    import ast

    readers = []
    for f in _python_files("trainers"):
        rel = f.relative_to(REPO).as_posix()
        tree = ast.parse(f.read_text(), rel)
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Attribute) and node.attr == "type" and isinstance(node.value, ast.Attribute) \
                        and node.value.attr == "engine":
                    readers.append(f"{rel}:{fn.name}")
    assert sorted(set(readers)) == ["trainers/engines/__init__.py:engine_class"]


def test_no_function_runs_past_eighty_lines():
    import ast

    long = []
    for f in _python_files("launcher", "trainers", "tools"):
        rel = f.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(f.read_text(), rel)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 80:
                long.append(f"{rel}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


def test_every_source_folder_is_a_package_the_wheel_holds():
    """A folder of Python files left out of pyproject's `packages` is missing from a non-editable
    install (a container image's `pip install .`) while the editable install of the tests finds
    it anyway."""
    import tomllib

    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {v: k for k, v in setup["package-dir"].items()}
    want = set()
    for top in ("launcher", "trainers", "tools"):
        for f in (REPO / top).rglob("*.py"):
            rel = f.parent.relative_to(REPO).as_posix()
            if "__pycache__" in rel:
                continue
            base = max((d for d in folders if rel == d or rel.startswith(d + "/")), key=len)
            want.add(folders[base] + rel[len(base):].replace("/", "."))
    assert sorted(want - set(setup["packages"])) == []
