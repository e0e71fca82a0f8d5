"""复制漂移检查（DESIGN §3）：同名的顶层函数/类出现在多个编号脚本里时，源码必须逐字相同，
除非它在 INTENDED_VARIANTS 里登记为有意的变体（并写明理由）。"""
import ast
from collections import defaultdict

from conftest import ROOT

# (名字, 脚本) -> 这个脚本里的版本为什么可以不同
INTENDED_VARIANTS = {
    ("MultiHeadAttention", "02_attention.py"):
        "02 是讲解版（手写掩码与 softmax）；03 起的副本多了 SDPA 快速路径",
    ("LayerNorm", "04_pretrain.py"): "同一公式交给 F.layer_norm 融合内核，训练提速（测试证明数值一致）",
    ("GELU", "04_pretrain.py"): "同一 tanh 近似交给 F.gelu 融合内核，训练提速（测试证明数值一致）",
}

# 每个脚本自己的命令行入口：名字相同是约定，内容本来就各不相同
ENTRY_POINTS = {"main", "run", "build_parser", "check_args"}


def top_level_definitions(path):
    """返回 {名字: 源码文本}，只看模块顶层的 def / class。"""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    return {node.name: ast.get_source_segment(source, node)
            for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def collect_copies():
    copies = defaultdict(dict)  # 名字 -> {脚本: 源码}
    for path in sorted(ROOT.glob("[0-9][0-9]_*.py")):
        for name, source in top_level_definitions(path).items():
            copies[name][path.name] = source
    return copies


def test_shared_definitions_are_identical_copies():
    drifted = []
    for name, by_script in collect_copies().items():
        if name in ENTRY_POINTS:
            continue
        versions = {script: src for script, src in by_script.items()
                    if (name, script) not in INTENDED_VARIANTS}
        if len(set(versions.values())) > 1:
            drifted.append(f"{name}: {sorted(versions)}")
    assert not drifted, "这些同名定义在不同脚本里不一致（修正副本，或登记为有意的变体）：\n" + \
        "\n".join(drifted)


def test_every_listed_variant_still_exists():
    copies = collect_copies()
    stale = [key for key in INTENDED_VARIANTS
             if key[1] not in copies.get(key[0], {}) or len(copies[key[0]]) < 2]
    assert not stale, f"登记的变体已不存在或不再有副本，请从 INTENDED_VARIANTS 删除：{stale}"


def test_drift_check_catches_a_changed_copy(tmp_path):
    # 自检：两个文件里同名函数差一个字符，检查器必须能看出来
    (tmp_path / "a.py").write_text("def f():\n    return 1\n", encoding="utf-8")
    (tmp_path / "b.py").write_text("def f():\n    return 2\n", encoding="utf-8")
    a = top_level_definitions(tmp_path / "a.py")["f"]
    b = top_level_definitions(tmp_path / "b.py")["f"]
    assert a != b
