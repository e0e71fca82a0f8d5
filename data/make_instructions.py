"""data/make_instructions.py — 生成中文指令数据（Alpaca 格式，06_finetune_instruct.py 用）

大部分任务只有一个可验证的答案（加减法、比大小、反转与排序、数字数、大小写、数字与汉字、单位换算、
星期几、查小表），每种任务有好几种问法；答案由这里的代码算出，所以"完全匹配"就能打分。
另有几百条逐条手写的开放式指令在 data/instruct/handwritten/ 里（没有唯一答案，只能让评审模型打分）。

每种任务有 8 种问法，其中第 5 种只出现在测试集里（见 HELD_OUT）：测试准确率衡量的是会不会做这个任务，
而不是背下了训练时见过的那几句问法。这句测试问法里的词和格式（"倒序"、"升序排列：…"、空格分开的两个数）
在训练问法里都出现过，只是没有这样组合过——从零训练的小模型没读过别的中文，没见过的词它无从理解。

用法：
  python data/make_instructions.py --seed 7 --count 500 --out sample.json   # 只生成（用全部问法）
  python data/make_instructions.py --build-splits    # 重建 data/instruct/{train,val,test}.json
"""
import argparse
import datetime
import json
import random
import sys
from pathlib import Path

INSTRUCT_DIR = Path(__file__).resolve().parent / "instruct"
SPLIT_SEED, COUNTS = 2024, {"train": 24000, "val": 300, "test": 600}
OPEN_SHARE = {"val": 20, "test": 30}  # 手写的开放式指令各取多少条进验证集、测试集

DIGITS = "零一二三四五六七八九"
WEEKDAYS = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
CAPITALS = {"河北": "石家庄", "山西": "太原", "辽宁": "沈阳", "吉林": "长春", "黑龙江": "哈尔滨",
            "江苏": "南京", "浙江": "杭州", "安徽": "合肥", "福建": "福州", "江西": "南昌",
            "山东": "济南", "河南": "郑州", "湖北": "武汉", "湖南": "长沙", "广东": "广州",
            "海南": "海口", "四川": "成都", "贵州": "贵阳", "云南": "昆明", "陕西": "西安",
            "甘肃": "兰州", "青海": "西宁", "台湾": "台北", "内蒙古": "呼和浩特", "广西": "南宁",
            "西藏": "拉萨", "宁夏": "银川", "新疆": "乌鲁木齐"}
ELEMENTS = {"氢": "H", "氦": "He", "锂": "Li", "碳": "C", "氮": "N", "氧": "O", "氟": "F",
            "氖": "Ne", "钠": "Na", "镁": "Mg", "铝": "Al", "硅": "Si", "磷": "P", "硫": "S",
            "氯": "Cl", "钾": "K", "钙": "Ca", "铁": "Fe", "铜": "Cu", "锌": "Zn", "银": "Ag",
            "金": "Au", "汞": "Hg", "铅": "Pb"}
# 单位换算：(大单位, 小单位, 倍数, 大单位的取值范围)
UNITS = [("千米", "米", 1000, 20), ("千克", "克", 1000, 20), ("米", "厘米", 100, 30),
         ("元", "角", 10, 50), ("吨", "千克", 1000, 15), ("小时", "分钟", 60, 12),
         ("天", "小时", 24, 10), ("分钟", "秒", 60, 10)]


def chinese_number(n):
    """0 ≤ n < 100000 → 汉字写法：305 → 三百零五，10 → 十，1010 → 一千零一十。"""
    if n == 0:
        return "零"
    out, zero = "", False
    for value, unit in ((10000, "万"), (1000, "千"), (100, "百"), (10, "十"), (1, "")):
        digit, n = divmod(n, value)
        if digit:
            out += ("零" if zero else "") + DIGITS[digit] + unit
            zero = False
        elif out:
            zero = True  # 中间缺了位：下一个非零位前补一个"零"
    return out[1:] if out.startswith("一十") else out  # 十五，不说一十五


def letters(rng, k):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(k))


# ---- 每种任务：rng → (问法们, 填槽的值, 答案)。问法是 (instruction, input)，{} 里填值 ----

def task_add(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return [("计算 {a} + {b}。", ""), ("{a} 加 {b} 等于多少？", ""), ("求两个数的和。", "{a} 和 {b}"),
            ("算一算：{a}+{b}=？", ""), ("把下面两个数加起来。", "{a}，{b}"),
            ("下面两个数的和是多少？", "{a}，{b}"), ("把 {a} 和 {b} 加起来。", ""), ("两数相加：", "{a}，{b}")], \
        dict(a=a, b=b), str(a + b)


def task_sub(rng):
    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
    return [("计算 {a} - {b}。", ""), ("{a} 减 {b} 等于多少？", ""), ("求两个数的差（前一个减后一个）。", "{a} 和 {b}"),
            ("算一算：{a}-{b}=？", ""), ("用第一个数减去第二个数。", "{a}，{b}"),
            ("第一个数减第二个数等于几？", "{a}，{b}"), ("用 {a} 减去 {b}。", ""), ("两数相减（前减后）：", "{a}，{b}")], \
        dict(a=a, b=b), str(a - b)


def task_compare(rng):
    a = rng.randint(10, 9999)
    b = a + rng.choice([-1, 1]) * rng.randint(1, 50) if rng.random() < 0.5 else rng.randint(10, 9999)
    b = b if b != a and b > 0 else a + 7
    return [("{a} 和 {b} 哪个大？", ""), ("比较两个数，说出较大的那个。", "{a}，{b}"),
            ("下面两个数里哪个更大？", "{a} 和 {b}"), ("在 {a} 与 {b} 中选出大的。", ""),
            ("找出较大的数。", "{a} {b}"),
            ("找出 {a} 和 {b} 中较大的那个。", ""), ("哪个数较大？", "{a} {b}"), ("选出大的数：", "{a} {b}")], \
        dict(a=a, b=b), str(max(a, b))


def task_reverse(rng):
    items = rng.sample("123456789abcdefghjkmnpqrstuvwxyz", rng.randint(3, 5))
    return [("把这个列表倒过来。", "{x}"), ("反转下面的序列。", "{x}"), ("将列表 {x} 反转。", ""),
            ("把下列元素按相反的顺序写出来。", "{x}"), ("倒序输出：{x}", ""),
            ("把下面的元素倒序写出来。", "{x}"), ("反转：{x}", ""), ("请倒序输出这个列表。", "{x}")], \
        dict(x=", ".join(items)), ", ".join(reversed(items))


def task_sort(rng):
    nums = rng.sample(range(1, 100), rng.randint(3, 4))
    return [("把这些数从小到大排序。", "{x}"), ("按升序排列下面的数。", "{x}"), ("将 {x} 从小到大排好。", ""),
            ("给下列数字排序，小的在前。", "{x}"), ("升序排列：{x}", ""),
            ("从小到大排序：{x}", ""), ("请把下面的数升序排列。", "{x}"), ("排序（小的在前）：{x}", "")], \
        dict(x=", ".join(map(str, nums))), ", ".join(map(str, sorted(nums)))


def task_count(rng):
    # 先定要数的字母出现几次（1–4），再混进别的字母：答案不会总是"1"
    ch, k = rng.choice("abcdefghijklmnopqrstuvwxyz"), rng.randint(1, 3)
    others = [c for c in "abcdefghijklmnopqrstuvwxyz" if c != ch]
    chars = [ch] * k + [rng.choice(others) for _ in range(rng.randint(4, 7) - k)]
    rng.shuffle(chars)
    word = "".join(chars)
    return [("“{w}”里有几个 {c}？", ""), ("数一数字母 {c} 出现了几次。", "{w}"), ("字符串 {w} 中 {c} 出现几次？", ""),
            ("统计下面这串字母里 {c} 的个数。", "{w}"), ("{w} 含有几个 {c}？", ""),
            ("字母 {c} 在 {w} 里出现了几次？", ""), ("这串字母含有几个 {c}？", "{w}"), ("{w} 里有多少个 {c}？", "")], \
        dict(w=word, c=ch), str(word.count(ch))


def task_case(rng):
    word = letters(rng, rng.randint(3, 6))
    upper = rng.random() < 0.5
    src, dst, to = (word, word.upper(), "大写") if upper else (word.upper(), word, "小写")
    return [("把 {w} 转成{t}。", ""), ("将下面的单词改为{t}字母。", "{w}"), ("请写出 {w} 的{t}形式。", ""),
            ("改成{t}：", "{w}"), ("{w} 全部换成{t}是什么？", ""),
            ("把下面的字母全部换成{t}。", "{w}"), ("{w} 的{t}是什么？", ""), ("全部改成{t}：{w}", "")], \
        dict(w=src, t=to), dst


def task_numeral(rng):
    n = rng.randint(1, 9999) if rng.random() < 0.5 else rng.randint(1, 999)
    if rng.random() < 0.5:
        return [("把 {n} 写成汉字。", ""), ("用中文数字写出下面的数。", "{n}"), ("{n} 的汉字写法是什么？", ""),
                ("阿拉伯数字转汉字：", "{n}"), ("数字 {n} 用汉字怎么写？", ""),
                ("{n} 这个数的汉字写法？", ""), ("把数字 {n} 改写成汉字。", ""), ("下面的数字用汉字写出来。", "{n}")], \
            dict(n=n), chinese_number(n)
    return [("把“{z}”写成阿拉伯数字。", ""), ("用阿拉伯数字写出下面的数。", "{z}"), ("{z} 是多少？用数字回答。", ""),
            ("汉字转阿拉伯数字：", "{z}"), ("请把 {z} 改写成阿拉伯数字。", ""),
            ("把 {z} 改写成数字。", ""), ("请用阿拉伯数字写出 {z}。", ""), ("下面的数改写成阿拉伯数字。", "{z}")], \
        dict(z=chinese_number(n)), str(n)


def task_unit(rng):
    big, small, factor, top = rng.choice(UNITS)
    k = rng.randint(1, top)
    if rng.random() < 0.6:
        return [("{k} {b}等于多少{s}？", ""), ("把 {k} {b}换算成{s}。", ""), ("换算成{s}，只写数字。", "{k} {b}"),
                ("{k}{b}是几{s}？", ""), ("单位换算：{k} {b} = ? {s}", ""),
                ("换算：{k} {b}是多少{s}？", ""), ("换算成{s}：{k} {b} = ?", ""), ("单位换算，只写数字：", "{k} {b} → {s}")], \
            dict(k=k, b=big, s=small), str(k * factor)
    return [("{v} {s}等于多少{b}？", ""), ("把 {v} {s}换算成{b}。", ""), ("换算成{b}，只写数字。", "{v} {s}"),
            ("{v}{s}是几{b}？", ""), ("单位换算：{v} {s} = ? {b}", ""),
            ("换算：{v} {s}是多少{b}？", ""), ("换算成{b}：{v} {s} = ?", ""), ("单位换算，只写数字：", "{v} {s} → {b}")], \
        dict(v=k * factor, b=big, s=small), str(k)


def task_weekday(rng):
    day = datetime.date(2025, 1, 1) + datetime.timedelta(days=rng.randrange(365))
    d = f"{day.year}年{day.month}月{day.day}日"
    return [("{d}是星期几？", ""), ("下面这个日期是星期几？", "{d}"), ("请告诉我{d}是周几。", ""),
            ("查一下这天是星期几。", "{d}"), ("{d}那天星期几？", ""),
            ("{d}这一天是星期几？", ""), ("那天星期几？", "{d}"), ("请问{d}星期几？", "")], \
        dict(d=d), WEEKDAYS[day.weekday()]


def task_lookup(rng):
    if rng.random() < 0.55:
        prov = rng.choice(sorted(CAPITALS))
        return [("{p}的省会是哪里？", ""), ("说出下面这个省级行政区的省会。", "{p}"), ("{p}省会是哪座城市？", ""),
                ("省会查询：", "{p}"), ("请回答{p}的省会城市。", ""),
                ("请回答：{p}的省会是？", ""), ("{p}的省会城市是哪里？", ""), ("回答下面这个地方的省会城市。", "{p}")], \
            dict(p=prov), CAPITALS[prov]
    name = rng.choice(sorted(ELEMENTS))
    return [("{e}的元素符号是什么？", ""), ("写出下面这种元素的化学符号。", "{e}"), ("{e}元素用什么符号表示？", ""),
            ("元素符号查询：", "{e}"), ("请给出{e}的化学元素符号。", ""),
            ("请写出{e}的元素符号。", ""), ("{e}的化学符号是什么？", ""), ("给出下面这种元素的化学元素符号。", "{e}")], \
        dict(e=name), ELEMENTS[name]


TASKS = {"add": task_add, "sub": task_sub, "compare": task_compare, "reverse": task_reverse,
         "sort": task_sort, "count": task_count, "case": task_case, "numeral": task_numeral,
         "unit": task_unit, "weekday": task_weekday, "lookup": task_lookup}
HELD_OUT = 4  # 每种任务的第 5 种问法（下标 4）只用于测试集
N_PHRASINGS = 8


def make_item(rng, task, phrasings=None):
    """抽一个任务实例，phrasings 是允许用的问法下标；返回 Alpaca 格式的一条（外加 task 字段）。"""
    templates, values, answer = TASKS[task](rng)
    choices = phrasings if phrasings is not None else range(len(templates))
    instruction, inp = templates[rng.choice(list(choices))]
    return {"instruction": instruction.format(**values), "input": inp.format(**values),
            "output": answer, "task": task}


def generate(seed, count, phrasings=None, exclude=()):
    """count 条，各任务轮流出、比例相同；exclude 里的（instruction, input）一定不出现。
    同一份输出里尽量不重复：查表这类取值很少的任务，试 100 次都重复就允许重复；
    如果 100 次都落在 exclude 里（别的划分把它用完了），这种任务就不再出。"""
    rng, seen, items = random.Random(seed), set(), []
    tasks = sorted(TASKS)
    turn = 0
    while len(items) < count and tasks:
        task = tasks[turn % len(tasks)]
        turn += 1
        for _ in range(100):
            item = make_item(rng, task, phrasings)
            key = (item["instruction"], item["input"])
            if key not in exclude and key not in seen:
                break
        if key in exclude:
            tasks.remove(task)
            continue
        seen.add(key)
        items.append(item)
    return items


def dump_lines(items):
    """一条一行的 JSON 列表：比缩进格式小一半，git diff 也按条显示。"""
    return "[\n" + ",\n".join(json.dumps(x, ensure_ascii=False) for x in items) + "\n]\n"


def read_handwritten():
    items = []
    for file in sorted((INSTRUCT_DIR / "handwritten").glob("*.json")):
        items += [dict(entry, task="open") for entry in json.loads(file.read_text(encoding="utf-8"))]
    return items


def build_splits():
    """训练/验证集用第 5 种以外的 7 种问法，测试集只用第 5 种；三个划分之间没有重复的指令；
    手写的开放式指令按比例分进去。"""
    seen_phrasings = [i for i in range(N_PHRASINGS) if i != HELD_OUT]
    train = generate(SPLIT_SEED, COUNTS["train"], seen_phrasings)
    val = generate(SPLIT_SEED + 1, COUNTS["val"], seen_phrasings,
                   exclude={(x["instruction"], x["input"]) for x in train})
    # 测试集的问法训练时没见过：要答对，得真会做这个任务（值也和训练集不同，问法不同自然不会重复）
    test = generate(SPLIT_SEED + 2, COUNTS["test"], [HELD_OUT])
    hand = read_handwritten()
    random.Random(SPLIT_SEED).shuffle(hand)
    n_val, n_test = OPEN_SHARE["val"], OPEN_SHARE["test"]
    splits = {"train": train + hand[n_val + n_test:], "val": val + hand[:n_val],
              "test": test + hand[n_val:n_val + n_test]}
    for name, items in splits.items():
        random.Random(SPLIT_SEED).shuffle(items)
        (INSTRUCT_DIR / f"{name}.json").write_text(dump_lines(items), encoding="utf-8")
        print(f"{name}: {len(items)} 条（开放式 {sum(x['task'] == 'open' for x in items)}）")


def main(argv=None):
    p = argparse.ArgumentParser(description="生成中文指令数据（Alpaca 格式），或重建 data/instruct 的三个划分")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--out", type=Path, help="把生成的指令写到这个 JSON 文件")
    p.add_argument("--build-splits", action="store_true", help="重建 data/instruct/{train,val,test}.json")
    args = p.parse_args(argv)
    if args.build_splits:
        return build_splits()
    if args.out is None or not 1 <= args.count <= 200000:
        p.error("需要 --out FILE，且 --count 在 1 到 200000 之间")
    args.out.write_text(dump_lines(generate(args.seed, args.count)), encoding="utf-8")
    print(f"写出 {args.count} 条 → {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
