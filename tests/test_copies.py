"""复制漂移检查（DESIGN §3）：同名的顶层函数、类或模块级常量（GPT2_PAT、HF_REPOS……）出现在多个编号脚本里时，
源码必须逐字相同，除非它在 INTENDED_VARIANTS 里登记为有意的变体（并写明理由）。"""
import ast
from collections import defaultdict

from conftest import ROOT

# (名字, 脚本) -> 这个脚本里的版本为什么可以不同
INTENDED_VARIANTS = {
    ("MultiHeadAttention", "02_attention.py"):
        "02 是讲解版（手写掩码与 softmax）；03 起的副本多了 SDPA 快速路径",
    ("LayerNorm", "04_pretrain.py"): "同一公式交给 F.layer_norm 融合内核，训练提速（测试证明数值一致）",
    ("GELU", "04_pretrain.py"): "同一 tanh 近似交给 F.gelu 融合内核，训练提速（测试证明数值一致）",
    # 05 起复制 04 的融合内核版：理由写得一字不差，这几份就归为一组，组内仍须逐字相同
    ("LayerNorm", "05_finetune_cls.py"): "同一公式交给 F.layer_norm 融合内核，训练提速（测试证明数值一致）",
    ("GELU", "05_finetune_cls.py"): "同一 tanh 近似交给 F.gelu 融合内核，训练提速（测试证明数值一致）",
    ("LayerNorm", "06_finetune_instruct.py"): "同一公式交给 F.layer_norm 融合内核，训练提速（测试证明数值一致）",
    ("GELU", "06_finetune_instruct.py"): "同一 tanh 近似交给 F.gelu 融合内核，训练提速（测试证明数值一致）",
    ("LayerNorm", "07_lora.py"): "同一公式交给 F.layer_norm 融合内核，训练提速（测试证明数值一致）",
    ("GELU", "07_lora.py"): "同一 tanh 近似交给 F.gelu 融合内核，训练提速（测试证明数值一致）",
    ("LayerNorm", "08_dpo.py"): "同一公式交给 F.layer_norm 融合内核，训练提速（测试证明数值一致）",
    ("GELU", "08_dpo.py"): "同一 tanh 近似交给 F.gelu 融合内核，训练提速（测试证明数值一致）",
    ("LayerNorm", "09_kvcache.py"): "同一公式交给 F.layer_norm 融合内核，训练提速（测试证明数值一致）",
    ("GELU", "09_kvcache.py"): "同一 tanh 近似交给 F.gelu 融合内核，训练提速（测试证明数值一致）",
    ("LayerNorm", "10_ddp.py"): "同一公式交给 F.layer_norm 融合内核，训练提速（测试证明数值一致）",
    ("GELU", "10_ddp.py"): "同一 tanh 近似交给 F.gelu 融合内核，训练提速（测试证明数值一致）",
    ("MultiHeadAttention", "09_kvcache.py"): "09 加了 KV 缓存（拼接 / 预分配两种）和批量生成用的掩码",
    ("TransformerBlock", "09_kvcache.py"): "09 把 use_cache、mask 传给带缓存的注意力",
    ("GPTModel", "09_kvcache.py"): "09 的 forward 多了 use_cache、positions、mask，另有 reset_cache()",
    ("generate", "09_kvcache.py"): "09 的生成带 KV 缓存：预填充 + 逐词解码，满了跳窗口，支持左侧填充的批量",
    ("load_classifier", "07_lora.py"): "07 载入的是 LoRA 文件：按记录重建底座、核对指纹，再装上 A、B 和分类头",
}

# 每个脚本自己的命令行入口与默认设置：名字相同是约定，内容本来就各不相同
ENTRY_POINTS = {"main", "run", "build_parser", "check_args", "make_settings", "DEFAULTS", "QUICK"}


def _assigned_names(node):
    """顶层赋值语句给哪些名字赋了值：A = ...、A: int = ...、A, B = ...。"""
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign):
        targets = [node.target]
    else:
        return []
    names = []
    for target in targets:
        elts = target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]
        names += [t.id for t in elts if isinstance(t, ast.Name)]
    return names


def top_level_definitions(path):
    """返回 {名字: 源码文本}：模块顶层的 def / class，以及模块级常量的赋值语句。
    同一个名字在一个脚本里赋值多次时，把几段源码按顺序拼起来一起比较。"""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    found = defaultdict(list)
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        else:
            names = _assigned_names(node)
        # 取整行（含装饰器和行尾注释）：只差一条注释也算漂移
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        for name in names:
            found[name].append("\n".join(lines[first - 1:node.end_lineno]))
    return {name: "\n".join(parts) for name, parts in found.items()}


def collect_copies(paths):
    copies = defaultdict(dict)  # 名字 -> {脚本: 源码}
    for path in paths:
        for name, source in top_level_definitions(path).items():
            copies[name][path.name] = source
    return copies


def find_drift(paths, variants=INTENDED_VARIANTS):
    """返回漂移了的名字列表（每项 "名字: [脚本, ...]"）；入口函数不算。
    登记过的变体按理由分组：同一理由的几份彼此逐字相同，未登记的几份彼此逐字相同。"""
    drifted = []
    for name, by_script in collect_copies(paths).items():
        if name in ENTRY_POINTS:
            continue
        groups = {}
        for script, src in by_script.items():
            groups.setdefault(variants.get((name, script)), {})[script] = src
        for versions in groups.values():
            if len(set(versions.values())) > 1:
                drifted.append(f"{name}: {sorted(versions)}")
    return drifted


def scripts():
    return sorted(ROOT.glob("[0-9][0-9]_*.py"))


def test_shared_definitions_are_identical_copies():
    drifted = find_drift(scripts())
    assert not drifted, "这些同名定义在不同脚本里不一致（修正副本，或登记为有意的变体）：\n" + \
        "\n".join(drifted)


def test_every_listed_variant_still_exists():
    copies = collect_copies(scripts())
    stale = [key for key in INTENDED_VARIANTS
             if key[1] not in copies.get(key[0], {}) or len(copies[key[0]]) < 2]
    assert not stale, f"登记的变体已不存在或不再有副本，请从 INTENDED_VARIANTS 删除：{stale}"


def test_drift_check_catches_changed_functions_and_constants(tmp_path):
    # 自检：用真正的检查函数 find_drift 跑两个小文件。函数差一个字符、常量（正则）差一个分支、
    # 类的一个默认值不同、行尾注释不同，都必须被报出来；完全相同的定义和入口函数不报。
    # 把 find_drift 里的比较关掉（比如总返回空列表），这个测试就会失败。
    (tmp_path / "01_a.py").write_text(
        "PAT = r\"'s| ?\\p{L}+\"\nSAME = 1\n\n\ndef f():\n    return 1\n\n\n"
        "class C:\n    size = 4\n\n\ndef g():\n    return 1  # 注释甲\n\n\n"
        "def main():\n    pass\n", encoding="utf-8")
    (tmp_path / "02_b.py").write_text(
        "PAT = r\" ?\\p{L}+\"\nSAME = 1\n\n\ndef f():\n    return 2\n\n\n"
        "class C:\n    size = 8\n\n\ndef g():\n    return 1  # 注释乙\n\n\n"
        "def main():\n    return 0\n", encoding="utf-8")
    drifted = find_drift(sorted(tmp_path.glob("*.py")), variants={})
    assert sorted(item.split(":")[0] for item in drifted) == ["C", "PAT", "f", "g"]
    # 登记为变体后就不再报
    assert find_drift(sorted(tmp_path.glob("*.py")),
                      variants={(name, "02_b.py"): "" for name in "PAT f g C".split()}) == []
    # 同一理由登记的两份变体彼此不同：仍然报出来
    (tmp_path / "03_c.py").write_text("def f():\n    return 3\n", encoding="utf-8")
    variants = {(name, "02_b.py"): "" for name in "PAT g C".split()}
    variants |= {("f", "02_b.py"): "快版", ("f", "03_c.py"): "快版"}
    assert find_drift(sorted(tmp_path.glob("*.py")), variants) == ["f: ['02_b.py', '03_c.py']"]


def test_constants_and_tuple_assignments_are_collected(tmp_path):
    path = tmp_path / "03_c.py"
    path.write_text("A, B = 1, 2\nC: int = 3\nD = 4\nD = 5\nprint(A)\n", encoding="utf-8")
    defs = top_level_definitions(path)
    assert set(defs) == {"A", "B", "C", "D"}
    assert defs["D"] == "D = 4\nD = 5"
