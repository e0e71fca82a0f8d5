"""独立性检查（DESIGN §3）：编号脚本不 import 兄弟脚本或项目模块，
除可选的 guarded import 外只依赖标准库、torch、tiktoken、numpy（以及 tiktoken 依赖的 regex）。"""
import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

ALLOWED = {"torch", "tiktoken", "numpy", "regex"}
SCRIPTS = sorted(ROOT.glob("[0-9][0-9]_*.py"))


def unguarded_imports(source):
    """返回不在 try/except ImportError 保护下的顶层模块名（函数体内的 import 也算）。"""
    tree = ast.parse(source)
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                _catches_import_error(h) for h in node.handlers):
            for inner in node.body:
                guarded.update(id(n) for n in ast.walk(inner))
    names = []
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # 相对导入 = 项目内模块
                names.append("." * node.level + (node.module or ""))
            else:
                names.append(node.module.split(".")[0])
    return names


def _catches_import_error(handler):
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(getattr(t, "id", None) in {"ImportError", "ModuleNotFoundError"} for t in types)


def test_there_are_scripts():
    assert SCRIPTS, "仓库里应当有编号脚本"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_imports_only_allowed_modules(path):
    source = path.read_text(encoding="utf-8")
    bad = [name for name in unguarded_imports(source)
           if name not in ALLOWED and name not in sys.stdlib_module_names]
    assert not bad, f"{path.name} 导入了不允许的模块：{bad}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_does_not_load_sibling_scripts(path):
    source = path.read_text(encoding="utf-8")
    for marker in ("spec_from_file_location", "import_module", "__import__", "runpy"):
        assert marker not in source, f"{path.name} 用 {marker} 动态加载模块，违反独立性"


def test_checker_flags_a_sibling_import():
    assert unguarded_imports("import helpers\nfrom . import x\n") == ["helpers", "."]
    assert unguarded_imports("try:\n    import matplotlib\nexcept ImportError:\n    pass\n") == []


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_help_is_chinese(path):
    # --help 的标题（argparse 写死的 usage/options）也是中文
    result = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("用法：") and "选项：" in result.stdout, result.stdout[:200]
    assert "show this help" not in result.stdout and "usage:" not in result.stdout
