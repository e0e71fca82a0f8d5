"""06_finetune_instruct.py：提示词模板、collate 的 -100 位置（手算）、加长位置嵌入、完全匹配与基线、
MinHash 与暴力 Jaccard 一致、评审客户端（本机假服务器：两种协议、服务器出错、超时、连不上）、
数据生成器与固定划分、快跑、载入与 respond、坏输入。"""
import http.server
import io
import json
import random
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT, load_script, run_standalone

SCRIPT = "06_finetune_instruct.py"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
ENTRY = {"instruction": "计算 12 + 30。", "input": "", "output": "42", "task": "add"}


@pytest.fixture(scope="module")
def mod():
    return load_script(SCRIPT)


# 这个文件的每个测试都只用 1 个线程（见 conftest.py 的 one_thread）
pytestmark = pytest.mark.usefixtures("one_thread")


def run_in_process(mod, args, monkeypatch, tmp_path, capsys, stdin=None):
    monkeypatch.setattr(mod, "PRETRAINED", tmp_path / "no-pretrain" / "ckpt.pt")
    monkeypatch.chdir(tmp_path)
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        mod.main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_prompt_formats(mod):
    with_input = {"instruction": "把这个列表倒过来。", "input": "1, 2, 3", "output": "3, 2, 1"}
    assert mod.format_prompt(with_input) == (
        "下面是一条指令，请写出回答。\n\n### 指令：\n把这个列表倒过来。\n\n### 输入：\n1, 2, 3\n\n### 回答：\n")
    # 没有 input：不写"### 输入："这一段
    assert mod.format_prompt(ENTRY) == "下面是一条指令，请写出回答。\n\n### 指令：\n计算 12 + 30。\n\n### 回答：\n"
    assert mod.format_prompt(with_input, "phi3") == "<|user|>\n把这个列表倒过来。\n1, 2, 3\n<|assistant|>\n"
    assert mod.format_prompt(ENTRY, "phi3") == "<|user|>\n计算 12 + 30。\n<|assistant|>\n"


@pytest.mark.parametrize("mask", [False, True])
def test_collate_targets_and_ignore_positions_by_hand(mod, mask):
    pad = 99
    # 两条：长 5（提示词 3 个）与长 3（提示词 2 个）。手写出期望：
    batch = [([1, 2, 3, 4, 5], 3), ([6, 7, 8], 2)]
    x, y = mod.collate_instruct(batch, pad, mask_instruction=mask)
    assert x.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 99, 99]]
    # 目标 = 右移一位；第一个 99（结束符）保留，之后的填充是 -100
    want = [[2, 3, 4, 5, 99], [7, 8, 99, -100, -100]]
    if mask:  # 提示词 1,2,3 里，作为目标出现的是 2、3（位置 0、1）；第二条是 7（位置 0）
        want = [[-100, -100, 4, 5, 99], [-100, 8, 99, -100, -100]]
    assert y.tolist() == want
    # 截断到 allowed_max_length
    x, y = mod.collate_instruct(batch, pad, allowed_max_length=3, mask_instruction=mask)
    assert x.shape == y.shape == (2, 3) and y.tolist() == [row[:3] for row in want]


def test_loss_ignores_minus_100_like_a_hand_computed_mean(mod):
    torch.manual_seed(0)
    cfg = dict(mod.model_config("tiny"), vocab_size=128)
    model = mod.GPTModel(cfg).eval()
    x, y = mod.collate_instruct([([5, 6, 7, 8], 2), ([9, 10], 1)], 127)
    loss = mod.batch_loss(model, x, y, torch.device("cpu"))
    logits = model(x)
    keep = y != -100
    manual = -torch.log_softmax(logits[keep], -1).gather(1, y[keep][:, None]).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_extend_context_keeps_learned_positions_and_outputs(mod):
    torch.manual_seed(0)
    model = mod.GPTModel(dict(mod.model_config("tiny", use_sdpa=False), vocab_size=128)).eval()
    x = torch.randint(0, 128, (2, 40))
    before = model(x)
    old_table = model.pos_emb.weight.detach().clone()
    assert mod.extend_context(model, 128) is True
    assert model.pos_emb.weight.shape[0] == 128 and model.cfg["context_length"] == 128
    assert torch.equal(model.pos_emb.weight[:64], old_table)
    # 前 64 个位置的输出不变；更长的输入也能前向（掩码跟着加长）
    assert torch.allclose(model(x), before, atol=1e-6)
    assert model(torch.randint(0, 128, (1, 128))).shape == (1, 128, 128)
    assert mod.extend_context(model, 64) is False


def test_exact_match_and_baselines(mod):
    train = [{"task": "add", "output": "7", "input": "", "instruction": "x"}] * 3 + \
            [{"task": "add", "output": "8", "input": "", "instruction": "y"}]
    entries = [dict(ENTRY), {"instruction": "倒过来", "input": "1, 2", "output": "2, 1", "task": "reverse"},
               {"instruction": "写首诗", "input": "", "output": "……", "task": "open"}]
    table = mod.score_exact(entries, [" 42。", "1, 2", "随便"])
    assert table == {"add": (1, 1), "reverse": (0, 1), "open": (0, 1)}
    base = mod.baseline_answers(train, entries)
    assert base["照抄输入"] == ["计算 12 + 30。", "1, 2", "写首诗"]
    assert base["最常见答案"][0] == "7"


def test_read_entries_defaults_and_errors(mod, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "你好", "output": "你好！"}]), encoding="utf-8")
    assert mod.read_entries(path) == [{"instruction": "你好", "input": "", "output": "你好！", "task": "open"}]
    for bad, where in (([{"instruction": "a"}], "第 1 条"), ([{"instruction": "a", "output": 3}], "第 1 条"),
                       ({"a": 1}, "JSON 列表"), ([], "JSON 列表")):
        path.write_text(json.dumps(bad), encoding="utf-8")
        with pytest.raises(mod.UserError, match=where):
            mod.read_entries(path)


def test_minhash_finds_the_same_pairs_as_brute_force_jaccard(mod):
    rng = random.Random(0)
    base = ["请把下面这句话翻译成英文", "计算两个数的和并写出过程", "列出三种常见的水果名称", "解释一下什么是光合作用"]
    entries = []
    for text in base:
        entries.append({"instruction": text, "input": ""})
        chars = list(text)
        chars[-1 - rng.randrange(2)] = "某"  # 改结尾附近的一个字：高度相似（Jaccard 约 0.7–0.8）
        entries.append({"instruction": "".join(chars), "input": ""})
    entries += [{"instruction": "".join(rng.choice("天地人和山水风云") for _ in range(12)), "input": ""}
                for _ in range(20)]
    sets = [mod.shingles(e["instruction"]) for e in entries]
    jac = {(i, j): len(sets[i] & sets[j]) / len(sets[i] | sets[j])
           for i in range(len(sets)) for j in range(i + 1, len(sets))}
    brute = {pair for pair, value in jac.items() if value >= 0.6}
    found = {(i, j): sim for i, j, sim in mod.find_duplicates(entries, threshold=0.6)}
    # 没有误报（候选都精确核对过，相似度就是暴力算的那个）；分段哈希是近似的，但很像的（≥ 0.75）一对不漏
    assert len(brute) >= 4 and set(found) <= brute
    assert all(found[pair] == pytest.approx(jac[pair]) for pair in found)
    assert {pair for pair in brute if jac[pair] >= 0.75} <= set(found)
    # 签名相等的比例近似 Jaccard
    sig = mod.minhash_signatures([sets[0], sets[1]], num_perm=256)
    true = len(sets[0] & sets[1]) / len(sets[0] | sets[1])
    assert abs((sig[0] == sig[1]).mean() - true) < 0.12


@pytest.fixture
def judge_server():
    """本机假服务器：/api/chat（Ollama）与 /v1/chat/completions（OpenAI 兼容），记下收到的请求。
    路径里含 /fail 时返回 500，含 /slow 时故意晚回答。"""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, dict(self.headers), body))
            if "/slow" in self.path:
                time.sleep(1.5)  # 客户端早已超时走了：不再回写，免得写进断开的连接
                return
            if "/fail" in self.path:
                self.send_response(500)
                self.end_headers()
                self.wfile.write("模型没有加载".encode("utf-8"))
                return
            text = "85" if "分数" in body["messages"][0]["content"] else "好的"
            reply = ({"message": {"role": "assistant", "content": text}} if self.path.endswith("/api/chat")
                     else {"choices": [{"message": {"role": "assistant", "content": f"我打 {text} 分"}}]})
            data = json.dumps(reply, ensure_ascii=False).encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_ollama_and_openai_round_trips(mod, judge_server, monkeypatch):
    url, seen = judge_server
    assert mod.ask_ollama("分数：", "llama3", url, 5) == "85"
    path, _, body = seen[-1]
    assert path == "/api/chat" and body["model"] == "llama3" and body["stream"] is False
    assert body["messages"] == [{"role": "user", "content": "分数："}]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    assert mod.ask_openai("分数：", "deepseek-chat", url + "/v1", 5) == "我打 85 分"
    path, headers, body = seen[-1]
    assert path == "/v1/chat/completions" and body["model"] == "deepseek-chat"
    assert headers["Authorization"] == "Bearer sk-test-secret"
    assert mod.parse_score("我打 85 分") == 85 and mod.parse_score("满分 1000，给 90") == 90
    assert mod.parse_score("不知道") is None


def test_judge_records_scores_every_response(mod, judge_server, tmp_path):
    url, seen = judge_server
    records = [{**ENTRY, "model_response": "42"}, {**ENTRY, "task": "open", "model_response": "嗯"}]
    scores = mod.judge_records(records, lambda p: mod.ask_ollama(p, "m", url, 5), tmp_path / "s.json")
    assert scores == [85, 85] and len(seen) == 2
    assert "模型的回答：42" in seen[0][2]["messages"][0]["content"]
    assert [r["score"] for r in json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))] == [85, 85]


def test_judge_errors_are_one_chinese_line(mod, judge_server, monkeypatch):
    url, _ = judge_server
    with pytest.raises(mod.UserError, match="HTTP 500：模型没有加载"):
        mod.ask_ollama("x", "m", url + "/fail", 5)
    with pytest.raises(mod.UserError, match="秒内没有回答"):
        mod.ask_ollama("x", "m", url + "/slow", 0.3)
    with pytest.raises(mod.UserError, match="ollama serve"):
        mod.ask_ollama("x", "m", "http://127.0.0.1:9", 5)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-shown")
    with pytest.raises(mod.UserError) as info:
        mod.ask_openai("x", "m", url + "/fail/v1", 5)
    assert "sk-never-shown" not in str(info.value)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(mod.UserError, match="OPENAI_API_KEY"):
        mod.ask_openai("x", "m", url + "/v1", 5)


def test_generate_and_improve_data_through_a_local_server(mod, tmp_path, monkeypatch, capsys):
    """--generate-data 与 --improve-data 走同一个评审接口：用假的 ask 代替网络，检查解析与"留下分高的"。"""
    replies = iter(['好的：{"instruction": "说一种水果", "input": "", "output": "苹果"}', "不是 JSON",
                    '{"instruction": "说一种颜色", "output": "红色"}'])
    monkeypatch.setattr(mod, "make_judge", lambda s: lambda prompt: next(replies))
    code, out, err = run_in_process(mod, ["--generate-data", "2", "--judge", "ollama", "--out-dir", "o"],
                                    monkeypatch, tmp_path, capsys)
    assert code == 0, err
    got = json.loads((tmp_path / "o" / "generated.json").read_text(encoding="utf-8"))
    assert got == [{"instruction": "说一种水果", "input": "", "output": "苹果"},
                   {"instruction": "说一种颜色", "input": "", "output": "红色"}]
    # 改进：第一条新回答分高（换），第二条分低（留原样）
    replies = iter(["40", "新回答一", "90", "80", "新回答二", "10"])
    code, out, err = run_in_process(mod, ["--improve-data", "o/generated.json", "--judge", "openai",
                                          "--out-dir", "o"], monkeypatch, tmp_path, capsys)
    assert code == 0, err
    got = json.loads((tmp_path / "o" / "improved.json").read_text(encoding="utf-8"))
    assert [g["output"] for g in got] == ["新回答一", "红色"]


def test_instruction_generator_is_deterministic_and_splits_are_reproducible(tmp_path):
    gen = ROOT / "data" / "make_instructions.py"
    outs = []
    for name in ("a.json", "b.json"):
        subprocess.run([sys.executable, str(gen), "--seed", "5", "--count", "300", "--out",
                        str(tmp_path / name)], check=True, capture_output=True)
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    items = json.loads(outs[0])
    assert len(items) == 300 and len({i["task"] for i in items}) == 11
    spec = __import__("importlib.util").util.spec_from_file_location("mk_instr", gen)
    mk = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    # 生成器算出的答案和独立的计算一致（从题面里重新读出数字、日期再算一遍）
    import datetime
    checked = set()
    for item in items:
        text = item["instruction"] + " " + item["input"]
        nums = [int(t) for t in re.findall(r"\d+", text)]
        task = item["task"]
        if task == "add":
            want = str(sum(nums))
        elif task == "sub":
            want = str(nums[0] - nums[1])
        elif task == "compare":
            want = str(max(nums))
        elif task == "sort":
            want = ", ".join(map(str, sorted(nums)))
        elif task == "weekday":
            y, m, d = map(int, re.search(r"(\d+)年(\d+)月(\d+)日", text).groups())
            want = "一二三四五六日"[datetime.date(y, m, d).weekday()]
            want = "星期" + want
        elif task == "case":
            word = re.search(r"[A-Za-z]+", text).group()
            want = word.upper() if "大写" in text else word.lower()
        else:
            continue
        checked.add(task)
        assert item["output"] == want, item
    assert checked == {"add", "sub", "compare", "sort", "weekday", "case"}
    assert mk.chinese_number(305) == "三百零五" and mk.chinese_number(10) == "十"
    assert mk.chinese_number(10050) == "一万零五十" and mk.chinese_number(1010) == "一千零一十"
    assert mk.chinese_number(20000) == "二万" and mk.chinese_number(115) == "一百一十五"
    assert mk.WEEKDAYS[datetime.date(2025, 1, 1).weekday()] == "星期三"
    # 固定划分：重建一遍和仓库里的一字不差；三份之间指令不重复；测试集的问法训练集里没有
    folder = ROOT / "data" / "instruct"
    committed = {n: (folder / f"{n}.json").read_bytes() for n in ("train", "val", "test")}
    monkey_dir = tmp_path / "instruct"
    monkey_dir.mkdir()
    (monkey_dir / "handwritten").symlink_to(folder / "handwritten")
    mk.INSTRUCT_DIR = monkey_dir
    mk.build_splits()
    assert {n: (monkey_dir / f"{n}.json").read_bytes() for n in committed} == committed
    splits = {n: json.loads(b) for n, b in committed.items()}
    keys = {n: {(e["instruction"], e["input"]) for e in v} for n, v in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"]
    assert sum(len(v) for v in splits.values()) >= 5000
    assert sum(e["task"] == "open" for e in splits["train"]) >= 200
    # 每条可验证的测试题都恰好是"留出的那种问法"，训练集和验证集里一条也没有它
    rng, held, seen = random.Random(0), set(), set()
    for task, make in mk.TASKS.items():
        for _ in range(200):
            for index, (instruction, inp) in enumerate(make(rng)[0]):
                pattern = tuple("".join("(.+?)" if piece.startswith("{") else re.escape(piece)
                                        for piece in re.split(r"(\{\w+\})", part)) for part in (instruction, inp))
                (held if index == mk.HELD_OUT else seen).add((task, pattern))
    matches = lambda entry, patterns: any(
        task == entry["task"] and re.fullmatch(a, entry["instruction"]) and re.fullmatch(b, entry["input"])
        for task, (a, b) in patterns)
    verifiable = {n: [e for e in v if e["task"] != "open"] for n, v in splits.items()}
    assert all(matches(e, held) and not matches(e, seen) for e in verifiable["test"])
    assert not any(matches(e, held) for e in verifiable["train"] + verifiable["val"])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quick")
    result = run_standalone(SCRIPT, ["--quick", "--out-dir", "out"], folder, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    return folder, result


def test_quick_run_trains_saves_and_scores(quick_run):
    folder, result = quick_run
    out = result.stdout
    assert "targets" in out and "-100" in out and "token/s" in out and "合计（可验证）" in out
    rows = list(csv_rows(folder / "out" / "history.csv"))
    first, last = float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])
    assert last < first - 1.5, (first, last)  # 两轮就该从 ~7.6（均匀猜 2048 个 token）降下来
    records = json.loads((folder / "out" / "test_responses.json").read_text(encoding="utf-8"))
    assert len(records) == 300 and all("model_response" in r for r in records)


def csv_rows(path):
    import csv
    with open(path, encoding="utf-8") as fh:
        yield from csv.DictReader(fh)


def test_load_instruct_model_and_respond(quick_run, mod):
    folder, _ = quick_run
    model, tokenizer, config = mod.load_instruct_model(folder / "out" / "model.pt")
    assert config["prompt_style"] == "alpaca" and config["context_length"] == mod.CONTEXT
    answers = mod.respond(model, tokenizer, [ENTRY, {"instruction": "你好", "input": ""}], max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # respond 与手写的贪心解码一致
    prompt = tokenizer.encode_ordinary(mod.format_prompt(ENTRY))
    idx = torch.tensor([prompt])
    for _ in range(5):
        nxt = model(idx)[0, -1].argmax().item()
        if nxt == tokenizer.eot_token:
            break
        idx = torch.cat([idx, torch.tensor([[nxt]])], 1)
    assert answers[0] == tokenizer.decode(idx[0, len(prompt):].tolist()).strip()


def test_interactive_answers_until_empty_line(quick_run, mod, monkeypatch, capsys, tmp_path):
    folder, _ = quick_run
    code, out, err = run_in_process(mod, ["--interactive", "--out-dir", str(folder / "out"),
                                          "--max-new-tokens", "4"], monkeypatch, tmp_path, capsys,
                                    stdin="计算 1 + 1。\n你好\n\n")
    assert code == 0, err
    assert out.count("指令> ") == 3


def test_bad_numeric_flags_are_refused(mod, tmp_path, monkeypatch, capsys):
    for flag in ("--epochs", "--batch-size", "--lr", "--weight-decay", "--warmup-steps", "--drop-rate",
                 "--eval-every", "--max-new-tokens", "--seed", "--limit", "--judge-timeout",
                 "--threshold", "--generate-data"):
        for value in ("-1", "nan", "1e30") + (("0",) if flag not in ("--weight-decay", "--drop-rate",
                                                                     "--seed") else ()):
            code, out, err = run_in_process(mod, ["--quick", flag, value], monkeypatch, tmp_path, capsys)
            assert code == 2 and err.startswith("错误：") and err.count("\n") == 1, (flag, value, err)
            assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", ["missing_file", "not_json", "no_output", "too_few", "no_judge",
                                  "interactive_no_model", "pretrain_ckpt", "out_dir_is_file",
                                  "dup_missing"])
def test_bad_input_exits_2_with_one_chinese_line(mod, tmp_path, monkeypatch, capsys, case):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([ENTRY] * 30, ensure_ascii=False), encoding="utf-8")
    args = ["--quick", "--data", str(data), "--out-dir", "out"]
    if case == "missing_file":
        args[2] = str(tmp_path / "nope.json")
    elif case == "not_json":
        data.write_text("[{不是 JSON", encoding="utf-8")
    elif case == "no_output":
        data.write_text(json.dumps([ENTRY] * 29 + [{"instruction": "x"}]), encoding="utf-8")
    elif case == "too_few":
        data.write_text(json.dumps([ENTRY] * 5), encoding="utf-8")
    elif case == "no_judge":
        args = ["--improve-data", str(data), "--out-dir", "out"]
    elif case == "interactive_no_model":
        args = ["--interactive", "--out-dir", "out"]
    elif case == "pretrain_ckpt":
        (tmp_path / "out").mkdir()
        gpt = mod.GPTModel(dict(mod.model_config("tiny"), vocab_size=300))
        torch.save({"config": gpt.cfg, "model": gpt.state_dict(), "tokenizer": {"kind": "gpt2"}},
                   tmp_path / "out" / "model.pt")
        args = ["--interactive", "--out-dir", "out"]
    elif case == "out_dir_is_file":
        (tmp_path / "out").write_text("我是一个文件", encoding="utf-8")
    elif case == "dup_missing":
        args = ["--find-duplicates", str(tmp_path / "nope.json")]
    saved = {p: p.read_bytes() for p in (tmp_path / "out").glob("*")} if (tmp_path / "out").is_dir() else {}
    code, _, err = run_in_process(mod, args, monkeypatch, tmp_path, capsys)
    assert code == 2, err
    assert err.startswith("错误：") and err.count("\n") == 1
    assert {p: p.read_bytes() for p in saved} == saved
    if case == "no_output":
        assert "第 30 条" in err


def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path):
    result = run_standalone(SCRIPT, ["--quick", "--lr", "nan"], tmp_path, env=ONE_THREAD)
    assert result.returncode == 2 and result.stderr.startswith("错误：--lr")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stdout == "" and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("mask", [False, True])
def test_batch_loss_equals_the_full_logits_cross_entropy(mod, mask):
    # batch_loss 只把要学的位置送进输出头；参照：整批的 logits 都算出来，再让 ignore_index 跳过 -100
    torch.manual_seed(0)
    model = mod.GPTModel(dict(mod.model_config("tiny"), vocab_size=128)).eval()
    batch = [([5, 6, 7, 8, 9, 10], 3), ([11, 12, 13], 2), ([20, 21, 22, 23], 4)]
    x, y = mod.collate_instruct(batch, pad_id=127, mask_instruction=mask)
    reference = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    got = mod.batch_loss(model, x, y, torch.device("cpu"))
    assert got.item() == pytest.approx(reference.item(), rel=1e-6)
    reference.backward()
    want = model.out_head.weight.grad.clone()
    model.zero_grad()
    mod.batch_loss(model, x, y, torch.device("cpu")).backward()
    assert torch.allclose(model.out_head.weight.grad, want, atol=1e-7)
