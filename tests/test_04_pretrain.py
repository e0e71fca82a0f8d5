"""04_pretrain.py：端到端快跑、损失下降、检查点、逐位续训、load_init 的三种起点、token 缓存、
学习率曲线、精度选择、坏输入（每个数值参数都试过离谱的值）。"""
import csv
import http.server
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, copy_standalone, load_script, run_standalone, skip_or_fail

SCRIPT = "04_pretrain.py"
FAST = ["--quick", "--dtype", "fp32"]  # 固定 fp32：不让"自动选精度"的计时影响可复现性
# 2 核机器上同时跑着别的进程时，tiny 模型用 2 个线程反而慢 3 倍（线程互相等）；正确性与线程数无关
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def mod():
    return load_script(SCRIPT)


# 这个文件的每个测试都只用 1 个线程（见 conftest.py 的 one_thread）
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """只跑一次默认的 --quick（精度由 auto 决定），供下面几个测试共用：返回 (目录, 结果)。"""
    folder = tmp_path_factory.mktemp("quick")
    result = run_standalone(SCRIPT, ["--quick", "--out-dir", "out"], folder, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    return folder, result


def read_history(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_corpus(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


def run_in_process(mod, args, monkeypatch, tmp_path, capsys, stdin=None):
    """在进程内调用 main()（省去每次启动 Python、导入 torch 的几秒）；返回 (退出码, stdout, stderr)。"""
    monkeypatch.setattr(mod, "CACHE_DIR", tmp_path / "cache")
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


def test_quick_run_standalone_trains_and_writes_outputs(quick_run):
    folder, result = quick_run
    assert "token/s" in result.stdout and "MFU" in result.stdout
    rows = read_history(folder / "out" / "history.csv")
    assert [int(r["step"]) for r in rows] == list(range(0, 41))  # --quick 是 40 步
    # 损失下降：第 0 步（训练前）的验证损失 ≈ ln(词表大小)，训练 40 步后应明显更低
    first, last = float(rows[0]["eval_val_loss"]), float(rows[-1]["eval_val_loss"])
    assert first == pytest.approx(math.log(2048), abs=0.3)
    assert last < first - 0.5
    # 检查点记下 auto 实际选定的精度，与打印出来的一致
    ckpt = torch.load(folder / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["dtype"] in ("fp32", "bf16") and f"精度 {ckpt['dtype']}" in result.stdout


def test_load_init_checkpoint_reproduces_the_runs_final_validation_loss(mod, quick_run,
                                                                        monkeypatch, tmp_path):
    """load_init(检查点)：模型与分词器就是那次训练结束时的；用同样的评估批次算出的验证损失
    必须与 history.csv 最后一行逐位相同（参照来自另一个进程写下的数）。"""
    folder, _ = quick_run
    model, tok, cfg = mod.load_init(str(folder / "out" / "ckpt.pt"), "cpu")
    assert cfg == model.cfg and cfg["n_layers"] == 2 and cfg["emb_dim"] == 64
    project = mod.load_project_tokenizer()
    text = "从前有一座山。The end<|endoftext|>"
    assert tok.encode(text, allowed_special="all") == project.encode(text, allowed_special="all")
    monkeypatch.setattr(mod, "CACHE_DIR", tmp_path / "cache")
    train, val = mod.load_corpus(ROOT / "data" / "corpus", tok, 64)
    state = mod.RunState(model, None, tok, {"val": val}, torch.device("cpu"), "fp32", 64, None)
    settings = mod.make_settings(mod.build_parser().parse_args(["--quick"]))
    # 那次训练用的是 auto 选出的精度；这台机器上它是 fp32 时才能逐位比较
    expected = float(read_history(folder / "out" / "history.csv")[-1]["eval_val_loss"])
    if torch.load(folder / "out" / "ckpt.pt", weights_only=True)["dtype"] == "fp32":
        assert mod.evaluate(state, settings)["val"] == expected
    else:
        assert mod.evaluate(state, settings)["val"] == pytest.approx(expected, abs=0.05)


def test_load_init_random_matches_a_model_built_by_hand(mod):
    torch.manual_seed(7)
    model, tok, cfg = mod.load_init("random", "cpu", config="tiny")
    torch.manual_seed(7)
    ref = mod.GPTModel(dict(mod.MODEL_SIZES["tiny"], vocab_size=2048, drop_rate=0.0,
                            qkv_bias=False, use_sdpa=True))
    x = torch.randint(0, 2048, (2, 16))
    assert torch.equal(model.eval()(x), ref.eval()(x))
    assert cfg["vocab_size"] == tok.n_vocab == 2048 and tok.name == "nfl-bpe-2048"
    # 默认的起点就是本章的 mini 模型
    torch.manual_seed(7)
    assert mod.load_init("random", "cpu")[2]["emb_dim"] == mod.MODEL_SIZES["mini"]["emb_dim"]


def test_resume_reproduces_uninterrupted_losses_exactly(mod, tmp_path, monkeypatch, capsys):
    common = FAST + ["--max-steps", "16", "--eval-every", "5"]
    for extra in (["--out-dir", "full"], ["--out-dir", "part", "--stop-at", "7"]):
        code, _, err = run_in_process(mod, common + extra, monkeypatch, tmp_path, capsys)
        assert code == 0, err
    assert len(read_history(tmp_path / "part" / "history.csv")) == 8  # 第 0…7 步
    code, out, err = run_in_process(mod, common + ["--out-dir", "part", "--resume"],
                                    monkeypatch, tmp_path, capsys)
    assert code == 0 and "从第 7 步继续" in out, err
    expected = read_history(tmp_path / "full" / "history.csv")
    got = read_history(tmp_path / "part" / "history.csv")
    # 第 8…16 步的损失与学习率与不中断的那次逐位相同（CSV 里是 repr 级别的浮点数）
    assert got == expected


def test_resume_alone_reuses_the_checkpoint_settings_and_dtype(mod, tmp_path, monkeypatch,
                                                               capsys):
    prompt = "很久很久以前，在一座开满桃花的小山脚下，住着一位会讲故事的老爷爷"
    first = ["--quick", "--dtype", "bf16", "--max-steps", "4", "--stop-at", "2", "--out-dir", "o",
             "--prompt", prompt]
    code, out, err = run_in_process(mod, first, monkeypatch, tmp_path, capsys)
    assert code == 0, err
    # 长提示词在每行评估输出里只显示结尾，不整段重复
    assert prompt not in out and f"样本：…{prompt[-24:]}" in out
    # 只给 --resume：tiny 模型的上下文 64、批次 8、总步数 4、bf16 精度都从检查点里恢复
    code, out, err = run_in_process(mod, ["--resume", "--out-dir", "o"], monkeypatch, tmp_path,
                                    capsys)
    assert code == 0, err
    assert "上下文 64" in out and "步     4/4" in out and "精度 bf16" in out
    ckpt = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["dtype"] == "bf16" and ckpt["settings"]["prompt"] == prompt


def test_auto_dtype_wants_a_clear_margin_before_choosing_bf16(mod, monkeypatch, capsys):
    """auto 只在 bf16 快 1.3 倍以上时才选它；差不多快（计时噪声的范围）时留在 fp32。
    粗测（一小段）时 bf16 就慢一倍以上的（没有原生 bf16 的 CPU），不再用整批细测。"""
    model = mod.GPTModel(dict(mod.model_config("tiny"), vocab_size=64))
    x = torch.randint(0, 64, (4, 64))
    for rough, full, expected in (((10, 10), (26, 22), "fp32"), ((10, 10), (27, 20), "bf16"),
                                  ((10, 10), (22, 26), "fp32"), ((10, 25), None, "fp32")):
        calls = []

        def fake_times(m, a, b, rounds):
            calls.append((tuple(a.shape), rounds))
            ms = rough if a.shape == (1, 32) else full
            return {"fp32": ms[0] / 1000, "bf16": ms[1] / 1000}

        monkeypatch.setattr(mod, "time_train_steps", fake_times)
        assert mod.choose_dtype("auto", model, x, x) == expected
        assert calls == [((1, 32), 3)] + ([] if full is None else [((4, 64), 3)])
    assert mod.choose_dtype("bf16", model, x, x) == "bf16"  # 显式指定的不测
    capsys.readouterr()


def test_timing_both_dtypes_leaves_no_gradients(mod):
    model = mod.GPTModel(dict(mod.model_config("tiny"), vocab_size=64))
    x = torch.randint(0, 64, (2, 16))
    best = mod.time_train_steps(model, x, x, rounds=2)
    assert set(best) == {"fp32", "bf16"} and all(0 < t < 60 for t in best.values())
    assert all(p.grad is None for p in model.parameters())


def make_run(mod, tmp_path, steps=3):
    """在进程内搭一个极小的训练：返回 (state, settings)。"""
    s = mod.make_settings(mod.build_parser().parse_args(FAST + ["--out-dir", str(tmp_path)]))
    torch.manual_seed(0)
    model = mod.GPTModel(dict(mod.model_config("tiny", context_length=16), vocab_size=300))
    tokens = np.random.default_rng(0).integers(0, 300, 2000).astype(np.uint16)
    state = mod.RunState(model, mod.make_optimizer(model, s.lr, s.weight_decay, "fused",
                                                   s.embed_lr_mult),
                         mod.load_project_tokenizer(),
                         {"train": tokens[:1800], "val": tokens[1800:]}, torch.device("cpu"),
                         "fp32", 16, torch.Generator().manual_seed(0))
    for _ in range(steps):
        mod.train_step(state, s, state.model)
    return state, s


def test_time_budget_picks_a_step_count_without_touching_the_run(mod, tmp_path, monkeypatch):
    """steps_for_budget 只在副本上计时：模型参数、优化器、取批次与全局随机数都原样不动，
    所以之后的训练与直接给 --max-steps 这个步数时逐位相同。步数 = 预算 / 每步耗时，取 50 的倍数。"""
    state, s = make_run(mod, tmp_path, steps=0)
    params = [p.detach().clone() for p in state.model.parameters()]
    rng, data = torch.get_rng_state(), state.data_gen.get_state()
    clock = iter(range(10**6))  # 假时钟：每次读数加 1 秒，于是每步"耗时"正好 1 秒
    monkeypatch.setattr(mod.time, "perf_counter", lambda: float(next(clock)))
    for budget, expected in ((777, 750), (5, 100), (10**6, mod.BUDGET_MAX_STEPS)):
        s.time_budget = budget
        assert mod.steps_for_budget(state, s) == expected
    assert all(torch.equal(a, b) for a, b in zip(params, state.model.parameters()))
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(state.data_gen.get_state(), data)
    assert state.step == 0 and not state.optimizer.state  # 真正的优化器还没走过一步


def test_checkpoint_loads_into_fresh_model_with_identical_logits(mod, tmp_path):
    state, s = make_run(mod, tmp_path)
    path = tmp_path / "ckpt.pt"
    mod.save_checkpoint(path, mod.checkpoint_state(state, s))
    fresh, _, cfg = mod.load_init(str(path), "cpu")
    assert cfg["vocab_size"] == 300 and state.step == 3
    x = torch.randint(0, 300, (2, 16))
    assert torch.equal(state.model.eval()(x), fresh.eval()(x))


def test_interrupted_checkpoint_write_keeps_previous_checkpoint(mod, tmp_path, monkeypatch):
    state, s = make_run(mod, tmp_path)
    path = tmp_path / "ckpt.pt"
    mod.save_checkpoint(path, mod.checkpoint_state(state, s))
    before = path.read_bytes()

    def dying_save(obj, fh):  # 写到一半进程"死掉"
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        mod.save_checkpoint(path, {"step": 99})
    assert path.read_bytes() == before
    assert mod.load_checkpoint(path)["step"] == 3


def test_history_rows_are_dicts_written_by_key(mod, tmp_path):
    rows = [{"step": 0, "tokens_seen": 0, "lr": 0.0, "eval_train_loss": 8.5, "eval_val_loss": 8.6},
            {"step": 1, "tokens_seen": 512, "lr": 1e-3, "train_loss": 8.4}]
    mod.write_history(tmp_path, rows)
    lines = (tmp_path / "history.csv").read_text(encoding="utf-8").splitlines()
    assert lines == ["step,tokens_seen,lr,train_loss,eval_train_loss,eval_val_loss",
                     "0,0,0.0,,8.5,8.6", "1,512,0.001,8.4,,"]


def test_token_cache_matches_tiktoken_and_is_built_once(mod, tmp_path, monkeypatch):
    monkeypatch.setattr(mod, "CACHE_DIR", tmp_path / "cache")
    docs = [f"第 {i} 篇：今天天气很好，我们去公园散步。Hello {i}!\n" * 3 for i in range(12)]
    corpus = write_corpus(tmp_path / "corpus", docs)
    enc = mod.load_project_tokenizer()
    calls = []
    real_build = mod.build_token_cache
    monkeypatch.setattr(mod, "build_token_cache", lambda *a: calls.append(1) or real_build(*a))
    train, val = mod.load_corpus(corpus, enc, 8)
    train2, val2 = mod.load_corpus(corpus, enc, 8)
    assert len(calls) == 1, "第二次应当直接复用缓存"
    # 参照：每个文档前一个 <|endoftext|>，第 10 个文档（下标 9）进验证集
    ref = [[enc.eot_token] + enc.encode_ordinary(d) for d in docs]
    assert train.tolist() == sum(ref[:9] + ref[10:], [])
    assert val.tolist() == ref[9]
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    assert train.dtype == np.uint16


def test_jsonl_corpus_is_one_document_per_line(mod, tmp_path, monkeypatch):
    monkeypatch.setattr(mod, "CACHE_DIR", tmp_path / "cache")
    docs = [f"第 {i} 条：小猫在窗台上晒太阳，{'一会儿' * i}睡着了。\n第二行。" for i in range(12)]
    lines = [json.dumps({"text": d, "id": i}, ensure_ascii=i % 2 == 0) for i, d in enumerate(docs)]
    path = tmp_path / "pretrain.jsonl"
    path.write_text("\n".join(lines[:6]) + "\n\n" + "\n".join(lines[6:]) + "\n", encoding="utf-8")
    enc = mod.load_project_tokenizer()
    train, val = mod.load_corpus(path, enc, 8)
    ref = [[enc.eot_token] + enc.encode_ordinary(d) for d in docs]  # 空行不算文档
    assert train.tolist() == sum(ref[:9] + ref[10:], []) and val.tolist() == ref[9]
    # 目录里的 .jsonl 与 .txt 一起读
    (tmp_path / "mixed").mkdir()
    path.rename(tmp_path / "mixed" / "a.jsonl")
    (tmp_path / "mixed" / "b.txt").write_text(docs[0], encoding="utf-8")
    assert [f.name for f in mod.find_text_files(tmp_path / "mixed")] == ["a.jsonl", "b.txt"]


def kneser_ney_by_hand(train, val, V):
    """参照：用字典和循环逐条按公式算插值 Kneser-Ney bigram 与加一平滑的 unigram。"""
    pairs = Counter(zip(train[:-1].tolist(), train[1:].tolist()))
    n1 = sum(c == 1 for c in pairs.values())
    n2 = sum(c == 2 for c in pairs.values())
    d = n1 / (n1 + 2 * n2)
    cont = {w: 1 + len({v for v, x in pairs if x == w}) for w in range(V)}

    def prob(v, w):
        c_v = sum(c for (a, _), c in pairs.items() if a == v)
        p_cont = cont[w] / sum(cont.values())
        if c_v == 0:
            return p_cont
        n_v = sum(1 for a, _ in pairs if a == v)
        return max(pairs[(v, w)] - d, 0) / c_v + d * n_v / c_v * p_cont

    for v in range(V):  # 每个前文下的条件分布加起来是 1
        assert sum(prob(v, w) for w in range(V)) == pytest.approx(1.0)
    counts = Counter(train.tolist())
    unigram = -np.mean([math.log((counts[w] + 1) / (len(train) + V)) for w in val[1:]])
    bigram = -np.mean([math.log(prob(v, w)) for v, w in zip(val[:-1], val[1:])])
    return unigram, bigram


def test_count_baselines_match_a_hand_computation(mod):
    rng = np.random.default_rng(0)
    V = 12
    # 训练集里没有 10、11：验证集里它们既作前文（退回 P_cont）也作后文（只靠加一平滑）
    train = rng.integers(0, 10, 500)
    val = np.concatenate([rng.integers(0, 12, 200), [11, 10, 3]])
    got = mod.count_baselines(train.astype(np.uint16), val.astype(np.uint16), V)
    assert (got["unigram"], got["bigram"]) == pytest.approx(kneser_ney_by_hand(train, val, V),
                                                            rel=1e-9)


def test_bigram_baseline_learns_a_fixed_successor_and_unigram_does_not(mod):
    seq = np.tile(np.arange(50), 200)  # 每个 token 后面总跟同一个：bigram 几乎全对，unigram 只知道均匀
    got = mod.count_baselines(seq[:8000], seq[8000:], 64)
    assert got["unigram"] == pytest.approx(math.log(50), abs=0.02) and got["bigram"] < 0.01


@pytest.fixture
def gutenberg(monkeypatch, tmp_path):
    """127.0.0.1 上假扮 Gutenberg 的服务器：/pg编号.txt 是一本带英文页眉和许可证页脚的假书，支持 Range。"""
    body = "\n\n".join((ROOT / "data" / "corpus" / "tales").glob("*.txt").__next__()
                       .read_text(encoding="utf-8").split("\n\n")[:40])
    book = ("\ufeffThe Project Gutenberg eBook of 测试\r\n\r\nThis eBook is for anyone.\r\n"
            "*** START OF THE PROJECT GUTENBERG EBOOK 测试 ***\r\n" + body.replace("\n", "\r\n")
            + "\r\n*** END OF THE PROJECT GUTENBERG EBOOK 测试 ***\r\n"
            "Section 1. General Terms of Use\r\n")
    state = {"books": {"101": book.encode(), "102": book.replace("。", "！").encode()},
             "requests": [], "body": body}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["requests"].append((self.path, self.headers.get("Range")))
            payload = state["books"].get(self.path.removeprefix("/pg").removesuffix(".txt"))
            if payload is None:
                self.send_error(404)
                return
            start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get(
                "Range") else 0
            self.send_response(206 if start else 200)
            if start:
                size = len(payload)
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.send_header("Content-Length", str(len(payload) - start))
            self.end_headers()
            self.wfile.write(payload[start:])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    monkeypatch.setenv("GUTENBERG_URL", f"http://127.0.0.1:{server.server_address[1]}/pg{{id}}.txt")
    yield state
    server.shutdown()
    server.server_close()


def test_gutenberg_books_are_downloaded_stripped_cached_and_trained_on(mod, gutenberg, tmp_path,
                                                                      monkeypatch, capsys):
    # 101 断在半路：留下的 .part 应当用 Range 续传，而不是从头下载
    folder = tmp_path / "cache" / "gutenberg"
    folder.mkdir(parents=True)
    (folder / "pg101.txt.part").write_bytes(gutenberg["books"]["101"][:1000])
    args = FAST + ["--data", "gutenberg:101, 102", "--max-steps", "2", "--eval-every", "2",
                   "--out-dir", "out"]
    code, out, err = run_in_process(mod, args, monkeypatch, tmp_path, capsys)
    assert code == 0, err
    assert gutenberg["requests"] == [("/pg101.txt", "bytes=1000-"), ("/pg102.txt", None)]
    text = (folder / "101.txt").read_text(encoding="utf-8")
    assert text == gutenberg["body"].strip() + "\n"  # 页眉、页脚、BOM、\r 都去掉了，正文一字不差
    assert (folder / "102.txt").read_text(encoding="utf-8") == text.replace("。", "！")
    assert sorted(p.name for p in folder.iterdir()) == ["101.txt", "102.txt"]  # 不留 .part
    assert "100%" in out and (tmp_path / "out" / "ckpt.pt").is_file()
    code, out, err = run_in_process(mod, args, monkeypatch, tmp_path, capsys)
    assert code == 0 and len(gutenberg["requests"]) == 2  # 第二次全用缓存，不再联网


def test_large_corpus_file_is_read_in_chunks(mod, tmp_path):
    text = "".join(f"第 {i} 行，一些文字。\n" for i in range(5000))
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    chunks = list(mod.iter_documents([path], chunk_chars=1000))
    assert len(chunks) > 50 and all(len(c) <= 1100 for _, c in chunks)
    assert "".join(c for _, c in chunks) == text
    assert [start for start, _ in chunks] == [True] + [False] * (len(chunks) - 1)


def test_lr_schedule_edges(mod):
    lr = lambda s: mod.lr_at(s, 1.0, 10, 110, 0.1)
    assert lr(1) == pytest.approx(0.1)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # 余弦段的正中间：(最大 + 最小) / 2
    assert lr(110) == pytest.approx(0.1)
    assert lr(500) == pytest.approx(0.1)  # 超出总步数后停在下限
    decay = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_optimizer_scales_the_vocabulary_side_and_decays_only_matrices(mod, tmp_path):
    model = mod.GPTModel(dict(vocab_size=64, context_length=8, emb_dim=16, n_heads=2,
                              n_layers=1, drop_rate=0.0, qkv_bias=True))
    vocab, matrices, small = mod.make_optimizer(model, 1e-3, 0.1, "foreach", 10.0).param_groups
    assert {id(p) for p in vocab["params"]} == {id(model.tok_emb.weight), id(model.pos_emb.weight),
                                               id(model.out_head.weight)}
    assert (vocab["lr_mult"], matrices["lr_mult"], small["lr_mult"]) == (10.0, 1.0, 1.0)
    assert all(p.dim() == 2 for p in matrices["params"]) and matrices["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in small["params"]) and small["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in (vocab, matrices, small)) == len(list(model.parameters()))
    # 训练一步：每组实际用的学习率 = 计划表的学习率 × 该组的倍数
    state, s = make_run(mod, tmp_path, steps=1)
    base = mod.lr_at(1, s.lr, s.warmup_steps, s.max_steps, s.lr * s.min_lr_ratio)
    assert [g["lr"] for g in state.optimizer.param_groups] == pytest.approx(
        [base * s.embed_lr_mult, base, base])


def test_fused_layernorm_and_gelu_match_the_handwritten_formulas(mod):
    x = torch.randn(4, 7, 32)
    ln = mod.LayerNorm(32)
    with torch.no_grad():
        ln.scale.uniform_(0.5, 1.5)
        ln.shift.uniform_(-0.5, 0.5)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    manual = ln.scale * (x - mean) / torch.sqrt(var + 1e-5) + ln.shift
    assert torch.allclose(ln(x), manual, atol=1e-5)
    tanh_gelu = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    assert torch.allclose(mod.GELU()(x), tanh_gelu, atol=1e-6)


def test_sdpa_and_manual_attention_give_same_logits(mod):
    cfg = dict(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
               drop_rate=0.0, qkv_bias=False)
    torch.manual_seed(0)
    fast = mod.GPTModel(dict(cfg, use_sdpa=True)).eval()
    slow = mod.GPTModel(dict(cfg, use_sdpa=False)).eval()
    slow.load_state_dict(fast.state_dict())
    x = torch.randint(0, 64, (3, 16))
    assert torch.allclose(fast(x), slow(x), atol=1e-5)


TRAINING_PEAK_PROBE = r"""
import importlib.util, re, sys, torch
spec = importlib.util.spec_from_file_location("m04", sys.argv[1])
m = importlib.util.module_from_spec(spec)
sys.modules["m04"] = m
spec.loader.exec_module(m)
status = lambda key: int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))
before = status("VmRSS") * 1024
model = m.GPTModel(dict(m.model_config("tiny"), vocab_size=6144))
optimizer = m.make_optimizer(model, 1e-3, 0.1, "fused")
x = torch.randint(0, 6144, (64, 64))
m.calc_loss_batch(model, x, x).backward()
optimizer.step()
print(status("VmHWM") * 1024 - before, m.training_bytes(model.cfg, 64, 64))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="需要 Linux 的 /proc 读峰值内存")
def test_training_memory_estimate_covers_the_measured_peak():
    """拒绝之前的内存估算要宁多勿少，但也不能离谱：tiny 模型、批次 64 训练一步，
    实测峰值内存的增量在估算之内，且不到估算的一半就说明估算太松。"""
    result = subprocess.run([sys.executable, "-c", TRAINING_PEAK_PROBE, str(ROOT / SCRIPT)],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, **ONE_THREAD))
    assert result.returncode == 0, result.stderr
    peak, estimate = map(int, result.stdout.split())
    assert 0.5 * estimate < peak <= estimate, (peak, estimate)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_param_count_from_the_config_matches_the_built_model(mod, qkv_bias):
    for size in ("tiny", "mini"):
        cfg = dict(mod.model_config(size), vocab_size=1000 + len(size), qkv_bias=qkv_bias)
        model = mod.GPTModel(cfg)
        assert mod.param_count(cfg) == sum(p.numel() for p in model.parameters())
        masks = sum(b.numel() for b in model.buffers())
        assert mod.model_bytes(cfg) == 4 * mod.param_count(cfg) + masks


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path):
    copy_standalone(SCRIPT, tmp_path)
    cmd = [sys.executable, SCRIPT, *FAST, "--max-steps", "100000", "--log-every", "1",
           "--out-dir", "out"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1", **ONE_THREAD))
    for line in proc.stdout:  # 等它真正开始训练，再按"Ctrl-C"
        if line.startswith("步"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in out
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] >= 1 and len(ckpt["history"]) == ckpt["step"] + 1  # 含第 0 步的评估


def test_sweep_and_interactive_modes(mod, tmp_path, monkeypatch, capsys):
    code, out, err = run_in_process(mod, FAST + ["--sweep", "--sweep-steps", "3"], monkeypatch,
                                    tmp_path, capsys)
    assert code == 0, err
    assert out.count("试验") == 2 and "排名" in out
    code, _, err = run_in_process(mod, FAST + ["--max-steps", "2", "--out-dir", "o"],
                                  monkeypatch, tmp_path, capsys)
    assert code == 0, err
    chat = ":temp 0\n:tokens 5\n:rep 0.5\n:topk none\n:rep 1.3\n今天\n:quit\n"
    code, out, err = run_in_process(mod, ["--interactive", "--out-dir", "o"], monkeypatch,
                                    tmp_path, capsys, stdin=chat)
    assert code == 0, err
    assert "今天" in out and "temp=0.0" in out and "rep=1.3" in out and "topk=None" in out
    assert ":rep 应在 1 到 10 之间" in out  # 离谱的设置只打印一行说明，不退出


# 每个数值参数配几个离谱的值：负数、零、NaN、无穷、大得离谱，以及整数参数收到的小数
ABSURD = ["-1", "nan", "inf", "99999999999"]
NUMERIC_FLAGS = {
    "--n-layers": ABSURD + ["0"], "--n-heads": ABSURD + ["0", "3"],  # 3 除不尽 64
    "--emb-dim": ABSURD + ["0", "65"], "--context-length": ABSURD + ["0", "1", "100000"],
    "--drop-rate": ABSURD + ["1.5", "1"], "--batch-size": ABSURD + ["0", "100000000"],
    "--grad-accum": ABSURD + ["0"], "--max-steps": ABSURD + ["0", "2.5"],
    "--lr": ABSURD + ["0", "5"], "--embed-lr-mult": ABSURD + ["0", "1000"],
    "--min-lr-ratio": ABSURD + ["1.5"],
    "--warmup-steps": ABSURD + ["-5"], "--weight-decay": ABSURD + ["2"],
    "--grad-clip": ABSURD + ["0"], "--eval-every": ABSURD + ["0"], "--eval-iters": ABSURD + ["0"],
    "--log-every": ABSURD + ["0"], "--stop-at": ABSURD + ["0"],
    "--repetition-penalty": ABSURD + ["0", "0.5"], "--sweep-steps": ABSURD + ["0"],
    "--sweep-trials": ABSURD + ["0", "9"], "--seed": ABSURD + ["2.5"],
}


@pytest.mark.parametrize("flag", NUMERIC_FLAGS)
def test_every_numeric_flag_refuses_absurd_values(mod, tmp_path, monkeypatch, capsys, flag):
    for value in NUMERIC_FLAGS[flag]:
        code, out, err = run_in_process(mod, ["--quick", flag, value, "--out-dir", "out"],
                                        monkeypatch, tmp_path, capsys)
        assert code == 2, (flag, value, out, err)
        assert err.startswith("错误：") and err.count("\n") == 1, (flag, value, err)
        assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "no_txt", "not_utf8", "too_short",
                                  "jsonl_bad_json", "jsonl_no_text", "gutenberg_bad_id",
                                  "gutenberg_unknown_id", "gutenberg_offline",
                                  "garbage_ckpt", "truncated_ckpt", "old_ckpt", "ckpt_mismatch",
                                  "bad_init", "missing_init_ckpt", "long_prompt", "huge_batch",
                                  "out_dir_is_file"])
def test_bad_input_exits_2_with_chinese_message(mod, tmp_path, monkeypatch, capsys, request,
                                               case):
    args = FAST + ["--out-dir", "out"]
    ckpt = tmp_path / "out" / "ckpt.pt"
    if case == "missing":
        args += ["--data", "nope.txt"]
    elif case == "empty":
        write_corpus(tmp_path / "c", ["", ""])
        args += ["--data", "c"]
    elif case == "no_txt":
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "a.md").write_text("你好", encoding="utf-8")
        args += ["--data", "c"]
    elif case == "not_utf8":
        (tmp_path / "c.txt").write_bytes("你好".encode("gbk") * 50)
        args += ["--data", "c.txt"]
    elif case == "too_short":
        (tmp_path / "c.txt").write_text("太短了。", encoding="utf-8")
        args += ["--data", "c.txt"]
    elif case in ("jsonl_bad_json", "jsonl_no_text"):
        good = json.dumps({"text": "今天天气很好。" * 50}, ensure_ascii=False)
        bad = "{'text': 1" if case == "jsonl_bad_json" else '{"content": "没有 text 字段"}'
        (tmp_path / "c.jsonl").write_text(f"{good}\n{bad}\n", encoding="utf-8")
        args += ["--data", "c.jsonl"]
    elif case == "gutenberg_bad_id":
        args += ["--data", "gutenberg:红楼梦"]
    elif case == "gutenberg_unknown_id":
        request.getfixturevalue("gutenberg")  # 假服务器只有 101、102 两本书，别的编号回 404
        args += ["--data", "gutenberg:101,999999999"]
    elif case == "gutenberg_offline":  # 一个没人监听的端口：连接被拒，就像断网
        args += ["--data", "gutenberg:101"]
        monkeypatch.setenv("GUTENBERG_URL", "http://127.0.0.1:9/pg{id}.txt")
    elif case in ("garbage_ckpt", "truncated_ckpt", "old_ckpt"):
        ckpt.parent.mkdir()
        torch.save({"config": {}, "model": {}, "tokenizer": {}, "x": torch.zeros(5000)}, ckpt)
        if case == "garbage_ckpt":
            ckpt.write_bytes(b"not a checkpoint")
        elif case == "truncated_ckpt":  # 写到一半断电的样子：zip 的目录还没写出来
            ckpt.write_bytes(ckpt.read_bytes()[:10_000])
        args += ["--resume"]
    elif case == "ckpt_mismatch":
        code, _, err = run_in_process(mod, FAST + ["--max-steps", "1", "--out-dir", "out"],
                                      monkeypatch, tmp_path, capsys)
        assert code == 0, err
        args += ["--resume", "--n-layers", "5"]
    elif case == "bad_init":
        args += ["--init", "gpt5"]
    elif case == "missing_init_ckpt":
        args += ["--init", "runs/nope/ckpt.pt"]
    elif case == "long_prompt":  # 2800 个字远超 tiny 的 64 个 token 上下文
        args += ["--prompt", "从前有一座山，山里有一座庙。" * 200]
    elif case == "huge_batch":  # 范围之内，但 logits 就要几百 GB：先估算、直接拒绝
        args += ["--batch-size", "100000"]
    elif case == "out_dir_is_file":
        (tmp_path / "out").write_text("我是一个文件", encoding="utf-8")
    saved = {p: p.read_bytes() for p in (tmp_path / "out").glob("*")} \
        if (tmp_path / "out").is_dir() else {}
    code, _, err = run_in_process(mod, args, monkeypatch, tmp_path, capsys)
    assert code == 2, err
    assert err.startswith("错误：") and err.count("\n") == 1  # 只有一行中文说明
    assert "zip" not in err and "archive" not in err  # 不夹带底层库的英文报错
    assert {p: p.read_bytes() for p in saved} == saved  # 已保存的东西一个字节都没变
    if case.startswith("gutenberg"):
        assert {"gutenberg_bad_id": "编号", "gutenberg_unknown_id": "HTTP 404",
                "gutenberg_offline": "GUTENBERG_URL"}[case] in err
    if case == "out_dir_is_file":
        assert (tmp_path / "out").read_text(encoding="utf-8") == "我是一个文件"
    else:
        assert set((tmp_path / "out").glob("*")) == set(saved)  # 也没有多写任何文件


def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path):
    result = run_standalone(SCRIPT, ["--quick", "--drop-rate", "1.5"], tmp_path, env=ONE_THREAD)
    assert result.returncode == 2 and result.stderr.startswith("错误：--drop-rate")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stdout == "" and not (tmp_path / "runs").exists()


def test_load_init_and_continue_pretraining_from_gpt2_layout_directory(mod, tmp_path,
                                                                       monkeypatch, capsys):
    """--init 一个 transformers 写出的 GPT-2 目录：load_init 的 logits 与 transformers 一致；
    训练时换用 GPT-2 分词器，词表补到 50304，能训练、能续训。"""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        skip_or_fail("未安装 transformers")
    try:
        mod.get_gpt2_tokenizer()
    except Exception as err:
        skip_or_fail(f"没有 GPT-2 词表：{err}")
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    hf.save_pretrained(tmp_path / "tiny-gpt2")
    model, tok, cfg = mod.load_init(str(tmp_path / "tiny-gpt2"), "cpu")
    x = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), hf(x).logits, atol=1e-4)
    # "Hello world" 在 GPT-2 词表里是 [15496, 995]（公开的事实）；载入的模型不补齐词表
    assert tok.encode("Hello world") == [15496, 995] and cfg["vocab_size"] == 50257
    args = FAST + ["--init", "tiny-gpt2", "--context-length", "32", "--max-steps", "4",
                   "--eval-every", "2", "--out-dir", "out", "--prompt", "Hello"]
    code, out, err = run_in_process(mod, args, monkeypatch, tmp_path, capsys)
    assert code == 0, err
    assert "词表 50304" in out and "gpt2" in out
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["tokenizer"]["kind"] == "gpt2" and ckpt["config"]["vocab_size"] == 50304
    # 载入的起点就是 GPT-2 的权重：补齐前的那些行在训练 4 步后仍与原权重很接近
    wte = hf.transformer.wte.weight.detach()
    assert torch.allclose(ckpt["model"]["tok_emb.weight"][:50257], wte, atol=0.05)


MEMORY_PROBE = r"""
import importlib.util, re, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("m04", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
hwm = lambda: int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
enc = m.load_project_tokenizer()
enc.encode_ordinary_batch(["预热"] * 8)
before = hwm()
meta = m.build_token_cache(m.find_text_files(sys.argv[2]), enc, Path(sys.argv[3]))
print(meta["train"] + meta["val"], hwm() - before)
"""


def cache_build_peak(tmp_path, name, copies):
    """在子进程里为 copies 份语料建 token 缓存，返回 (token 数, 峰值内存增量字节)。"""
    texts, size = [], 0
    for path in sorted((ROOT / "data" / "corpus").rglob("*.txt")):
        if size > 300_000:  # 只取约 300 KB 的文章做底子：语料再怎么变大，这个测试的规模都不变
            break
        texts.append(path.read_text(encoding="utf-8"))
        size += len(texts[-1].encode("utf-8"))
    corpus = tmp_path / name
    corpus.mkdir()
    for i in range(copies):  # 每份约 300 KB，内容各不相同的排列
        (corpus / f"{i:02d}.txt").write_text("\n\n".join(texts[i % 7::7] + texts), encoding="utf-8")
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(ROOT / SCRIPT), str(corpus),
                             str(tmp_path / f"cache-{name}")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return tuple(map(int, result.stdout.split()))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="需要 Linux 的 /proc 读峰值内存")
def test_token_cache_build_memory_does_not_grow_with_corpus_size(tmp_path):
    """语料从约 4 MB 变成约 16 MB，切词时的峰值内存几乎不变：token 是边切边写盘的，
    从来不会整个待在内存里（若全放进 int64 数组，多出的 token 就要多占 8 字节/个）。"""
    n_small, peak_small = cache_build_peak(tmp_path, "small", 14)
    n_big, peak_big = cache_build_peak(tmp_path, "big", 56)
    assert n_big > 3 * n_small > 3_000_000
    assert peak_big - peak_small < 0.5 * 8 * (n_big - n_small), (peak_small, peak_big)
