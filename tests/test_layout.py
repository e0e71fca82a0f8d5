"""阅读预算与附录检查（DESIGN §3）：
- 章节部分（第一个 "# ===== 附录" 或 "# ===== 进阶" 横幅之前）不超过 700 行（01：600；11：1000）；
- 除去附录，整个文件不超过 1300 行（11：1800）。附录不计：它只装前几章逐字复制来的部件
  （下面的测试检查这一点，test_copies.py 检查逐字相同），读者在前几章已经读过；
  04 起要载入 GPT-2 的脚本光是下载、safetensors、参数名映射这条链就有约 330 行副本；
- 附录里逐字复制来的每个名字，本脚本都真的用到了（直接用，或被用到的其他副本间接用到）。"""
import ast
import re

import pytest

from conftest import ROOT

BANNER = re.compile(r"#\s*=+\s*(附录|进阶)")
APPENDIX = re.compile(r"#\s*=+\s*附录")
SCRIPTS = sorted(ROOT.glob("[0-9][0-9]_*.py"))


def budget(name):
    """(章节部分上限, 整个文件上限)。"""
    if name.startswith("11_"):
        return 1000, 1800
    return (600 if name.startswith("01_") else 700), 1300


def appendix_start(lines):
    """第一个附录横幅所在的行号（从 0 数）；没有附录就是文件行数。"""
    return next((i for i, line in enumerate(lines) if APPENDIX.match(line)), len(lines))


def chapter_lines(lines):
    """章节部分的行数 = 第一个附录/进阶横幅之前的行数（没有横幅就是整个文件）。"""
    return next((i for i, line in enumerate(lines) if BANNER.match(line)), len(lines))


def unused_appendix_names(source):
    """附录（第一个 "# ===== 附录" 横幅之后）里定义、却没有被脚本用到的顶层名字。
    "用到"按传递关系算：章节代码引用的名字是活的，活的定义里引用的名字也是活的。"""
    lines = source.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if APPENDIX.match(line)), None)
    if start is None:
        return []
    tree = ast.parse(source)
    defined, refs, outside = {}, {}, set()
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - set(names)
        if names and node.lineno > start:
            for name in names:
                defined[name], refs[name] = node.lineno, used
        else:
            outside |= used
    live, todo = set(), [n for n in defined if n in outside]
    while todo:
        name = todo.pop()
        if name not in live:
            live.add(name)
            todo += [n for n in refs[name] if n in defined]
    return sorted(set(defined) - live)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_keeps_its_reading_budget(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    chapter_max, file_max = budget(path.name)
    assert chapter_lines(lines) <= chapter_max, \
        f"{path.name} 的章节部分有 {chapter_lines(lines)} 行，超过 {chapter_max}：把可跳过的内容移到进阶节"
    own = appendix_start(lines)
    assert own <= file_max, f"{path.name} 除附录外共 {own} 行，超过 {file_max}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_appendix_holds_only_copies_from_earlier_scripts(path):
    # 附录不计入行数预算的前提：里面每个顶层定义都是更早的编号脚本里已有的名字（逐字相同由 test_copies 查）
    source = path.read_text(encoding="utf-8")
    start = appendix_start(source.splitlines())
    earlier = set()
    for other in SCRIPTS:
        if other.name < path.name:
            earlier |= top_level_names(other.read_text(encoding="utf-8"))
    own = {name for node in ast.parse(source).body if node.lineno > start
           for name in node_names(node)}
    assert own <= earlier, f"{path.name} 的附录里有不是副本的定义：{sorted(own - earlier)}"


def node_names(node):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    return [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]


def top_level_names(source):
    return {name for node in ast.parse(source).body for name in node_names(node)}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_appendix_copy_is_used(path):
    unused = unused_appendix_names(path.read_text(encoding="utf-8"))
    assert not unused, f"{path.name} 的附录里有没用到的副本，请删掉：{unused}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_main_guard_is_the_last_statement(path):
    # 附录和进阶节在 main() 之后定义：守卫必须在文件最后，否则 main() 运行时这些名字还不存在
    last = ast.parse(path.read_text(encoding="utf-8")).body[-1]
    assert isinstance(last, ast.If) and "__main__" in ast.unparse(last.test), \
        f"{path.name} 的 if __name__ == '__main__' 应当是文件的最后一条语句"


def test_budget_checks_can_fail():
    # 自检：横幅定位与"没用到的副本"检测都要能报出问题
    assert chapter_lines(["a", "b", "# ===== 进阶：x =====", "c"]) == 2
    assert chapter_lines(["a", "b"]) == 2
    source = ("def chapter():\n    return used()\n\n\n# ===== 附录：副本 =====\n"
              "def used():\n    return helper()\n\n\ndef helper():\n    return 1\n\n\n"
              "def unused():\n    return 2\n\n\nLIMIT = 3\n")
    assert unused_appendix_names(source) == ["LIMIT", "unused"]
