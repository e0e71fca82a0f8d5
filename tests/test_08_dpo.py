"""08_dpo.py：DPO 损失（手算）、回答部分的对数概率（对照完整的 log_softmax）、偏好对的 -100 位置（手算）、
参考模型不求梯度也不变、偏好准确率（对照逐条手算的隐式奖励）、快跑里奖励差上升、检查点的载入、
偏好数据生成器（确定性、错答案确实错、测试集的问法与说法训练时没有）、坏输入。"""
import copy
import json
import math
import random
import re
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, load_script, run_standalone

SCRIPT = "08_dpo.py"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
GENERATOR = ROOT / "data" / "make_preferences.py"
PAIR = {"instruction": "计算 12 + 30。", "input": "", "chosen": "42", "rejected": "43",
        "kind": "wrong", "task": "add"}


@pytest.fixture(scope="module")
def mod():
    return load_script(SCRIPT)


# 这个文件的每个测试都只用 1 个线程（见 conftest.py 的 one_thread）
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_policy(mod, seed=0):
    torch.manual_seed(seed)
    cfg = dict(mod.model_config("tiny", context_length=mod.CONTEXT),
               vocab_size=mod.load_project_tokenizer().n_vocab)
    return mod.GPTModel(cfg).eval()


def run_in_process(mod, args, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(mod, "PRETRAINED", tmp_path / "no-pretrain" / "ckpt.pt")
    monkeypatch.setattr(mod, "SFT_CHECKPOINT", tmp_path / "no-sft" / "model.pt")
    monkeypatch.chdir(tmp_path)
    try:
        mod.main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_dpo_loss_matches_a_hand_computation(mod):
    beta = 0.1
    pc, pr, rc, rr = [-3.0, -40.0, -2.0], [-6.0, -1.0, -2.0], [-5.0, -10.0, -2.0], [-5.0, -30.0, -2.0]
    want_losses, want_c, want_r = [], [], []
    for a, b, c, d in zip(pc, pr, rc, rr):
        z = beta * ((a - c) - (b - d))
        want_losses.append(-math.log(1 / (1 + math.exp(-z))))
        want_c.append(beta * (a - c))
        want_r.append(beta * (b - d))
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    loss, c, r = mod.dpo_loss(t(pc), t(pr), t(rc), t(rr), beta)
    assert loss.item() == pytest.approx(sum(want_losses) / 3, rel=1e-12)
    assert c.tolist() == pytest.approx(want_c) and r.tolist() == pytest.approx(want_r)
    # 策略 = 参考时损失正好是 log 2；奖励差极大时也不溢出（softplus 写法）
    same, _, _ = mod.dpo_loss(t([-5.0]), t([-5.0]), t([-5.0]), t([-5.0]), beta)
    assert same.item() == pytest.approx(math.log(2))
    huge, _, _ = mod.dpo_loss(t([0.0]), t([-1e5]), t([0.0]), t([0.0]), beta)
    assert math.isfinite(huge.item()) and huge.item() < 1e-12
    worst, _, _ = mod.dpo_loss(t([-1e5]), t([0.0]), t([0.0]), t([0.0]), beta)
    assert worst.item() == pytest.approx(1e4)


def test_collate_pairs_masks_the_prompt_and_padding_by_hand(mod):
    pad = 0
    chosen, rejected = [11, 12, 13, 14, 15], [11, 12, 13, 16]  # 提示词是前 3 个 token
    x, y = mod.collate_pairs([(chosen, rejected, 3)], pad, context=100)
    assert x.tolist() == [[11, 12, 13, 14, 15], [11, 12, 13, 16, pad]]
    # 目标 = 输入右移一位；提示词内部的目标（12、13）换成 -100；回答和第一个结束符留着，其余填充 -100
    assert y.tolist() == [[-100, -100, 14, 15, pad], [-100, -100, 16, pad, -100]]
    # 两对：前两行是 chosen，后两行是 rejected
    x2, _ = mod.collate_pairs([(chosen, rejected, 3), ([1, 2], [1, 3], 1)], pad, context=100)
    assert x2[0, :5].tolist() == chosen and x2[1, :2].tolist() == [1, 2]
    assert x2[2, :4].tolist() == rejected and x2[3, :2].tolist() == [1, 3]


def test_sequence_logprobs_equal_the_full_log_softmax(mod):
    model = tiny_policy(mod)
    tokenizer = mod.load_project_tokenizer()
    pairs = [mod.encode_pair(tokenizer, PAIR, "alpaca"),
             mod.encode_pair(tokenizer, {**PAIR, "chosen": "四十二", "rejected": "烦不烦啊，四十二。"}, "alpaca")]
    x, y = mod.collate_pairs(pairs, tokenizer.eot_token, mod.CONTEXT)
    with torch.no_grad():
        got = mod.sequence_logprobs(model, x, y)
        logp = F.log_softmax(model(x).double(), dim=-1)
    for row in range(x.shape[0]):
        want = sum(logp[row, t, y[row, t]].item() for t in range(x.shape[1]) if y[row, t] != -100)
        assert got[row].item() == pytest.approx(want, abs=1e-4)
    # 只数回答：第 0 行（chosen "42" + 结束符）计入的位置数 = 回答的 token 数 + 1
    answer = tokenizer.encode_ordinary("42")
    assert int((y[0] != -100).sum()) == len(answer) + 1


def test_reference_gets_no_gradients_and_does_not_change(mod, tmp_path):
    tokenizer = mod.load_project_tokenizer()
    policy = tiny_policy(mod)
    reference = mod.freeze(copy.deepcopy(policy))
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    items = [PAIR, {**PAIR, "rejected": "自己算去。"}, {**PAIR, "chosen": "42", "rejected": "嗯，让我想想，42 吧。"}]
    data = [mod.encode_pair(tokenizer, item, "alpaca") for item in items]
    policy.cfg = dict(policy.cfg, prompt_style="alpaca")
    state = mod.DPOState(policy, reference, torch.optim.AdamW(policy.parameters(), lr=1e-3), tokenizer,
                         {"train": data, "val": data}, torch.device("cpu"))
    s = Namespace(epochs=2, batch_size=2, lr=1e-3, warmup_steps=1, eval_every=1, beta=0.1, seed=0, nll_weight=0,
                  out_dir=str(tmp_path))
    path = mod.train_dpo(state, s)
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert any(not torch.equal(start[k], v) for k, v in policy.state_dict().items())
    # 存下来的参考模型就是 DPO 之前的策略
    loaded_policy, loaded_ref, _ = mod.load_policy(path)
    assert all(torch.equal(start[k], v) for k, v in loaded_ref.state_dict().items())
    assert all(torch.equal(policy.state_dict()[k], v) for k, v in loaded_policy.state_dict().items())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo")
    result = run_standalone(SCRIPT, ["--quick", "--out-dir", "out"], folder, env=ONE_THREAD, timeout=240)
    assert result.returncode == 0, result.stderr
    return folder, result


def test_quick_run_margin_rises_and_everything_is_reported(quick_run):
    _, result = quick_run
    out = result.stdout
    margins = [float(m) for m in re.findall(r"^步.*?差 (-?[\d.]+)", out, re.M)]
    assert re.search(r"验证奖励差 0\.00，损失 0\.693", out)  # 开始时策略 = 参考
    assert len(margins) >= 2 and margins[-1] > margins[0] > 0
    for words in ("-100", "参考模型自己", "随机猜", "完全匹配", "直接回答", "合计"):
        assert words in out


def test_preference_accuracy_matches_rewards_computed_one_pair_at_a_time(mod, quick_run):
    folder, _ = quick_run
    policy, reference, tokenizer = mod.load_policy(folder / "out" / "model.pt")
    items = json.loads((ROOT / "data" / "preferences" / "val.json").read_text(encoding="utf-8"))[:40]
    wins = 0
    for item in items:
        rewards = []
        for answer in (item["chosen"], item["rejected"]):
            entry = {**item, "output": answer}
            ids, n_prompt = mod.encode_entry(tokenizer, entry, "alpaca")
            ids = (ids + [tokenizer.eot_token])[:mod.CONTEXT + 1]  # 和训练时一样截断到上下文长度
            x = torch.tensor([ids[:-1]])
            with torch.no_grad():
                lp = [F.log_softmax(m(x)[0].double(), -1) for m in (policy, reference)]
            # 回答的 token 和结束符：位置 n_prompt-1 起预测 ids[n_prompt:]
            sums = [sum(l[t, ids[t + 1]].item() for t in range(n_prompt - 1, len(ids) - 1)) for l in lp]
            rewards.append(0.1 * (sums[0] - sums[1]))
        wins += rewards[0] > rewards[1]
    assert mod.preference_accuracy(policy, reference, tokenizer, items) == pytest.approx(wins / len(items))


def test_evaluate_reads_another_preference_file(quick_run, tmp_path):
    folder, _ = quick_run
    sample = tmp_path / "fresh.json"
    subprocess.run([sys.executable, str(GENERATOR), "--seed", "31", "--count", "40", "--out", str(sample)],
                   check=True, capture_output=True)
    result = run_standalone(SCRIPT, ["--out-dir", "out", "--evaluate", str(sample), "--max-new-tokens", "8"],
                            folder, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert "40" in result.stdout and "合计" in result.stdout and "完全匹配" in result.stdout


def test_load_policy_refuses_an_sft_checkpoint(mod, quick_run):
    folder, _ = quick_run
    with pytest.raises(mod.UserError, match="不是本章写出的 DPO 检查点"):
        mod.load_policy(folder / "out" / "sft.pt")


def load_generator():
    spec = __import__("importlib.util").util.spec_from_file_location("mk_pref", GENERATOR)
    mk = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    return mk


def test_preference_generator_is_deterministic_and_wrong_answers_are_wrong(tmp_path):
    outs = []
    for name in ("a.json", "b.json"):
        subprocess.run([sys.executable, str(GENERATOR), "--seed", "5", "--count", "600", "--out",
                        str(tmp_path / name)], check=True, capture_output=True)
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    items = json.loads(outs[0])
    assert len(items) == 600 and {i["kind"] for i in items} == {"wrong", "rude", "evasive", "rambling"}
    for item in items:
        assert item["chosen"] != item["rejected"], item
        text = item["instruction"] + " " + item["input"]
        nums = [int(t) for t in re.findall(r"\d+", text)]
        if item["kind"] != "wrong":
            continue
        # 从题面重新算出正确答案：chosen 就是它，rejected 不是它
        task, rejected = item["task"], item["rejected"]
        if task == "add":
            assert item["chosen"] == str(sum(nums)) and rejected != item["chosen"] and rejected.isdigit()
        elif task == "sub":
            assert item["chosen"] == str(nums[0] - nums[1]) and rejected.isdigit()
        elif task == "compare":
            assert item["chosen"] == str(max(nums)) and rejected == str(min(nums))
        elif task == "sort":
            assert item["chosen"] == ", ".join(map(str, sorted(nums)))
            assert sorted(map(int, rejected.split(", "))) == sorted(nums)  # 同样的数，只是没排好
        elif task == "reverse":
            assert sorted(rejected.split(", ")) == sorted(item["chosen"].split(", "))
        elif task == "case":
            assert rejected.lower() == item["chosen"].lower()
            assert sum(a != b for a, b in zip(rejected, item["chosen"])) == 1  # 恰好漏改一个字母


def test_preference_splits_are_reproducible_and_test_templates_are_held_out(tmp_path):
    mk = load_generator()
    folder = ROOT / "data" / "preferences"
    committed = {n: (folder / f"{n}.json").read_bytes() for n in ("train", "val", "test")}
    monkey_dir = tmp_path / "preferences"
    monkey_dir.mkdir()
    (monkey_dir / "handwritten").symlink_to(folder / "handwritten")
    mk.PREF_DIR = monkey_dir
    mk.build_splits()
    assert {n: (monkey_dir / f"{n}.json").read_bytes() for n in committed} == committed
    splits = {n: json.loads(b) for n, b in committed.items()}
    assert len(splits["train"]) + len(splits["val"]) + len(splits["test"]) >= 2000
    keys = {n: {(e["instruction"], e["input"]) for e in v} for n, v in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"]
    hand = [e for v in splits.values() for e in v if e["task"] == "open"]
    assert len(hand) >= 200 and all(e["kind"] in {"wrong", "rude", "evasive", "rambling"} for e in hand)
    assert sum(e["task"] == "open" for e in splits["test"]) >= 50
    # 风格差的回答：测试集只用 TEST_STYLES 的说法，训练、验证集只用 TRAIN_STYLES 的
    def style_of(entry, styles):
        return any(t.format(a=entry["chosen"]) == entry["rejected"] for t in styles[entry["kind"]])
    generated = {n: [e for e in v if e["task"] != "open"] for n, v in splits.items()}
    styled = {n: [e for e in v if e["kind"] != "wrong"] for n, v in generated.items()}
    assert all(style_of(e, mk.TEST_STYLES) and not style_of(e, mk.TRAIN_STYLES) for e in styled["test"])
    assert all(style_of(e, mk.TRAIN_STYLES) and not style_of(e, mk.TEST_STYLES)
               for e in styled["train"] + styled["val"])
    # 问法：测试集的每条都是留出的第 5 种问法（和 06 的测试集同一种），训练、验证集一条也没有
    mi, rng = mk.MI, random.Random(0)
    held, seen = ({task: set() for task in mi.TASKS} for _ in range(2))  # 任务 → 问法的正则
    for task, make in mi.TASKS.items():
        for _ in range(200):
            for index, (instruction, inp) in enumerate(make(rng)[0]):
                pattern = tuple("".join("(.+?)" if piece.startswith("{") else re.escape(piece)
                                        for piece in re.split(r"(\{\w+\})", part)) for part in (instruction, inp))
                (held if index == mi.HELD_OUT else seen)[task].add(pattern)
    matches = lambda entry, patterns: any(
        re.fullmatch(a, entry["instruction"]) and re.fullmatch(b, entry["input"]) for a, b in patterns[entry["task"]])
    assert all(matches(e, held) and not matches(e, seen) for e in generated["test"])
    assert not any(matches(e, held) for e in generated["train"] + generated["val"])


@pytest.mark.parametrize("args", [
    ["--beta", "0"], ["--beta", "-1"], ["--beta", "nan"], ["--beta", "inf"], ["--beta", "1e9"],
    ["--epochs", "0"], ["--lr", "nan"], ["--lr", "-1"], ["--batch-size", "0"], ["--warmup-steps", "0"],
    ["--eval-every", "-3"], ["--sft-steps", "0"], ["--sft-lr", "inf"], ["--eval-prompts", "0"],
    ["--max-new-tokens", "100000"], ["--limit", "-5"], ["--seed", "-1"],
    ["--data", "no/such.json"], ["--sft", "no/such.pt"], ["--evaluate", "no/such.json"],
])
def test_bad_flags_exit_2_with_one_chinese_line(mod, args, monkeypatch, tmp_path, capsys):
    code, _, err = run_in_process(mod, ["--quick", *args, "--out-dir", str(tmp_path / "out")],
                                  monkeypatch, tmp_path, capsys)
    assert code == 2, err
    assert err.startswith("错误：") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # 开工前就拒绝：不留下空目录


@pytest.mark.parametrize("content, words", [
    ("not json", "JSON"), ("[]", "非空"), ('[{"instruction": "x", "chosen": "a"}]', "空的"),
    ('[{"instruction": "x", "chosen": "a", "rejected": "a"}]', "一模一样"),
    ('[{"instruction": 3, "chosen": "a", "rejected": "b"}]', "字符串"),
])
def test_bad_preference_files_exit_2(mod, content, words, monkeypatch, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(content, encoding="utf-8")
    code, _, err = run_in_process(mod, ["--quick", "--data", str(bad), "--out-dir", str(tmp_path / "out")],
                                  monkeypatch, tmp_path, capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_evaluate_without_a_trained_model_exits_2(mod, monkeypatch, tmp_path, capsys):
    sample = tmp_path / "x.json"
    sample.write_text(json.dumps([PAIR], ensure_ascii=False), encoding="utf-8")
    code, _, err = run_in_process(mod, ["--evaluate", str(sample), "--out-dir", str(tmp_path / "none")],
                                  monkeypatch, tmp_path, capsys)
    assert code == 2 and "找不到检查点" in err


def test_help_is_chinese(mod, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["08_dpo.py"])
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    out = capsys.readouterr().out
    assert "DPO 的 β" in out and "--evaluate" in out and "选项：" in out
