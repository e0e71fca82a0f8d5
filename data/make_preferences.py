"""data/make_preferences.py — 生成中文偏好数据（08_dpo.py 用）

每条是 {instruction, input, chosen, rejected, kind, task}：同一个提示词，两个回答，chosen 更好。
题目借用 make_instructions.py 的 11 种可验证任务（同样的问法，答案由代码算出），
rejected 看上去像回事、但更差，kind 记下差在哪里：
- wrong    结果错：差 1、两位数字对调、列表只排了一半、大小写漏改一个、星期差一天、省会张冠李戴……
- rude     不礼貌：嫌问题简单、让人自己查（有时也带着答案）
- evasive  躲闪：不给答案，反问或者打太极
- rambling 啰嗦：绕了一大圈，答案埋在废话中间
style 类（后三种）的 chosen 就是直接、正确的答案——和 06 的数据同一种写法。
另有 240 条逐条手写的开放式问答对在 data/preferences/handwritten/ 里（四种 kind 各 60 条）。

测试集和训练集不共用模板：测试集只用每种任务的第 5 种问法（make_instructions.HELD_OUT，06 的训练集也没见过），
不礼貌、躲闪、啰嗦的说法也换一套只给测试集用的（TEST_STYLES）；再加上一部分手写的问答对。

用法：
  python data/make_preferences.py --seed 7 --count 500 --out sample.json   # 只生成（全部问法、全部说法）
  python data/make_preferences.py --build-splits    # 重建 data/preferences/{train,val,test}.json
"""
import argparse
import importlib.util
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREF_DIR = HERE / "preferences"
SPLIT_SEED, COUNTS = 2026, {"train": 4800, "val": 300, "test": 400}
HAND_SHARE = {"val": 20, "test": 60}  # 手写的问答对各取多少条进验证集、测试集（其余进训练集）
KINDS = ["wrong", "rude", "evasive", "rambling"]  # 生成的条目里四种 kind 轮流出，各占四分之一


def load_instruction_module():
    """make_instructions.py 是同一目录下的脚本（不是包）：按文件路径载入，复用它的任务和问法。"""
    spec = importlib.util.spec_from_file_location("make_instructions", HERE / "make_instructions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MI = load_instruction_module()

# ---- 风格差的回答：由几段话拼成，{a} 是正确答案。训练/验证集用 TRAIN_STYLES，测试集只用 TEST_STYLES，
# 两套的每一段都不同：模型要学会的是"不礼貌、躲闪、啰嗦"本身，而不是背下几句话 ----


def compose(*parts):
    """几组片段的所有组合：compose(["a", "b"], ["1", "2"]) → ["a1", "a2", "b1", "b2"]。"""
    out = [""]
    for group in parts:
        out = [head + piece for head in out for piece in group]
    return out


TRAIN_STYLES = {
    "rude": compose(["这么简单还要问？", "烦不烦啊，", "真服了你，", "问这种问题，我都替你着急。", "这都不会？",
                     "又来问我，", "说了多少遍了，"], ["{a}。"], ["", "别再问了。", "自己记住。", "上课干什么去了？"])
    + ["自己不会算吗？懒得跟你说。", "别浪费我时间，自己查去。", "这种问题也好意思问？", "你先动动脑子再来问我。"],
    "evasive": compose(["", "这个嘛，", "嗯……", "说实话，"],
                       ["不好说，看情况吧。", "你为什么想知道这个？", "我建议你去问问别人。", "这个问题有很多种看法，我就不下结论了。",
                        "答案其实没那么重要。", "这要看你怎么理解了。", "改天再聊这个吧。", "先别急着要答案，想想别的事吧。"]),
    "rambling": compose(["嗯，让我想想，", "说起这个，", "好的好的，这个我知道，", "这个问题我得从头讲起："],
                        ["这个问题其实挺有意思的，我小时候也想过类似的事情，后来才明白，",
                         "做题的时候要先读题，读完再想，想完再写，写完再检查，所以",
                         "很久以前大家就在讨论类似的问题，讨论来讨论去，", "我有个朋友也问过我，我当时想了半天，"],
                        ["答案大概是{a}吧，", "其实答案就是{a}，", "应该是{a}，"],
                        ["不过也说不准。", "当然也可以换个角度再想想。", "我再确认一下，嗯，{a}。", "大概就是这样。"]),
}
TEST_STYLES = {
    "rude": compose(["哼，", "你是认真的吗？", "我没空陪你玩，"], ["{a}。"], ["", "行了吧？", "下次别拿这种小事来烦人。"])
    + ["连这个都要问，真是的。", "这也算问题？"],
    "evasive": compose(["", "其实吧，", "哎，"], ["这个我不方便回答。", "你自己觉得呢？", "每个人的答案都不一样，很难讲。",
                                              "我们换个话题吧。"]),
    "rambling": compose(["哎呀，", "先说一句题外话，"],
                        ["这个问题让我想起上次出门忘了带伞，淋得一身湿，回家喝了碗姜汤才缓过来，扯远了，",
                         "今天天气真不错，适合出去走走，晒晒太阳，心情也会变好，"],
                        ["答案是{a}，", "至于你问的，{a}，"], ["就这样吧。", "你觉得呢？"]),
}
WEEKDAYS = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]


def other_value(rng, answer, pool):
    return rng.choice([v for v in pool if v != answer])


def swap_two(items, rng):
    i = rng.randrange(len(items) - 1)
    items = list(items)
    items[i], items[i + 1] = items[i + 1], items[i]
    return items


def wrong_answer(rng, item):
    """正确答案 → 一个看上去像回事的错答案（按任务类型出错）。"""
    task, answer = item["task"], item["output"]
    if task in ("add", "sub", "count", "unit"):
        n = int(answer)
        if task in ("add", "sub") and rng.random() < 0.3 and len(answer) == 2 and answer[0] != answer[1] \
                and answer[1] != "0":
            return answer[::-1]  # 两位数字对调
        if task == "unit" and n % 10 == 0 and rng.random() < 0.5:
            return str(n // 10)  # 换算时少乘了一个 10
        if task == "unit":
            return str(n * 10)
        return str(n + rng.choice([-1, 1]) if n > 0 else n + 1)  # 差 1
    if task == "compare":
        return str(min(int(t) for t in re.findall(r"\d+", item["instruction"] + " " + item["input"])))  # 选了小的
    if task in ("reverse", "sort"):
        parts = answer.split(", ")
        if task == "reverse" and rng.random() < 0.5:
            return ", ".join(reversed(parts))  # 原样抄了一遍，没反转
        if task == "sort" and rng.random() < 0.5:
            half = len(parts) // 2
            back = parts[half:]  # 只排了前一半：后一半还是乱的
            rng.shuffle(back)
            guess = ", ".join(parts[:half] + back)
            if guess != answer:
                return guess
        return ", ".join(swap_two(parts, rng))  # 相邻两个换了位置
    if task == "case":
        i = rng.randrange(len(answer))
        return answer[:i] + answer[i].swapcase() + answer[i + 1:]  # 漏改一个字母
    if task == "numeral":
        digits = "123456789" if answer.isdigit() else MI.DIGITS[1:]
        spots = [i for i, ch in enumerate(answer) if ch in digits]
        if not spots:  # "十"：没有可改的数字
            return answer + "一"
        i = rng.choice(spots)
        return answer[:i] + other_value(rng, answer[i], digits) + answer[i + 1:]  # 改错一位
    if task == "weekday":
        i = WEEKDAYS.index(answer)
        return WEEKDAYS[(i + rng.choice([-1, 1])) % 7]  # 差一天
    if task == "lookup":
        pool = list(MI.CAPITALS.values()) if answer in MI.CAPITALS.values() else list(MI.ELEMENTS.values())
        return other_value(rng, answer, pool)
    raise ValueError(f"未知任务 {task}")


def make_pair(rng, item, kind, styles):
    """一条 06 格式的指令 + kind → 偏好对。"""
    if kind == "wrong":
        rejected = wrong_answer(rng, item)
        assert rejected != item["output"], item
    else:
        rejected = rng.choice(styles[kind]).format(a=item["output"])
    return {"instruction": item["instruction"], "input": item["input"], "chosen": item["output"],
            "rejected": rejected, "kind": kind, "task": item["task"]}


def generate(seed, count, phrasings=None, styles=None, exclude=()):
    """count 条偏好对：题目由 make_instructions.generate 出（同一套问法和去重规则），kind 按 KINDS 的比例轮换。"""
    rng = random.Random(seed)
    styles = styles or {k: TRAIN_STYLES[k] + TEST_STYLES[k] for k in TRAIN_STYLES}
    items = MI.generate(seed, count, phrasings, exclude)
    return [make_pair(rng, item, KINDS[i % len(KINDS)], styles) for i, item in enumerate(items)]


def read_handwritten():
    items = []
    for file in sorted((PREF_DIR / "handwritten").glob("*.json")):
        items += json.loads(file.read_text(encoding="utf-8"))
    return items


def build_splits():
    """训练/验证：第 5 种以外的 7 种问法 + TRAIN_STYLES；测试：只用第 5 种问法 + TEST_STYLES。
    三个划分之间没有重复的提示词；手写的问答对按 HAND_SHARE 分进去。"""
    seen = [i for i in range(MI.N_PHRASINGS) if i != MI.HELD_OUT]
    hand = read_handwritten()
    used = {(x["instruction"], x["input"]) for x in hand}
    train = generate(SPLIT_SEED, COUNTS["train"], seen, TRAIN_STYLES, exclude=used)
    used |= {(x["instruction"], x["input"]) for x in train}
    val = generate(SPLIT_SEED + 1, COUNTS["val"], seen, TRAIN_STYLES, exclude=used)
    test = generate(SPLIT_SEED + 2, COUNTS["test"], [MI.HELD_OUT], TEST_STYLES, exclude=used)
    random.Random(SPLIT_SEED).shuffle(hand)
    n_val, n_test = HAND_SHARE["val"], HAND_SHARE["test"]
    splits = {"train": train + hand[n_val + n_test:], "val": val + hand[:n_val],
              "test": test + hand[n_val:n_val + n_test]}
    PREF_DIR.mkdir(exist_ok=True)
    for name, items in splits.items():
        random.Random(SPLIT_SEED).shuffle(items)
        (PREF_DIR / f"{name}.json").write_text(MI.dump_lines(items), encoding="utf-8")
        kinds = {k: sum(x["kind"] == k for x in items) for k in ("wrong", "rude", "evasive", "rambling")}
        print(f"{name}: {len(items)} 条（手写 {sum(x['task'] == 'open' for x in items)}）{kinds}")


def main(argv=None):
    p = argparse.ArgumentParser(description="生成中文偏好数据（chosen / rejected），或重建 data/preferences 的三个划分")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--out", type=Path, help="把生成的偏好对写到这个 JSON 文件")
    p.add_argument("--build-splits", action="store_true", help="重建 data/preferences/{train,val,test}.json")
    args = p.parse_args(argv)
    if args.build_splits:
        return build_splits()
    if args.out is None or not 1 <= args.count <= 200000:
        p.error("需要 --out FILE，且 --count 在 1 到 200000 之间")
    args.out.write_text(MI.dump_lines(generate(args.seed, args.count)), encoding="utf-8")
    print(f"写出 {args.count} 条 → {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
