"""04_pretrain.py：端到端快跑、损失下降、检查点、逐位续训、token 缓存、学习率曲线、坏输入。"""
import csv
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, copy_standalone, load_script, run_standalone, skip_or_fail

SCRIPT = "04_pretrain.py"
FAST = ["--quick", "--dtype", "fp32"]  # 固定 fp32：不让"自动选精度"的计时影响可复现性


@pytest.fixture(scope="module")
def mod():
    return load_script(SCRIPT)


def read_history(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_corpus(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


def test_quick_run_standalone_trains_and_writes_outputs(tmp_path):
    result = run_standalone(SCRIPT, FAST + ["--out-dir", "out"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "token/s" in result.stdout and "MFU" in result.stdout
    rows = read_history(tmp_path / "out" / "history.csv")
    assert [int(r["step"]) for r in rows] == list(range(0, 41))
    # 损失下降：第 0 步（训练前）的验证损失 ≈ ln(词表大小)，训练 40 步后应明显更低
    first, last = float(rows[0]["eval_val_loss"]), float(rows[-1]["eval_val_loss"])
    assert first == pytest.approx(math.log(6144), abs=0.3)
    assert last < first - 0.5
    assert (tmp_path / "out" / "ckpt.pt").is_file()


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


def make_run(mod, tmp_path, steps=3):
    """在进程内搭一个极小的训练：返回 (model, optimizer, state, args, splits)。"""
    args = mod.build_parser().parse_args(FAST + ["--out-dir", str(tmp_path)])
    mod.apply_quick(args)
    args.context_length = 16
    torch.manual_seed(0)
    model = mod.GPTModel(mod.model_config(args, 300))
    optimizer = mod.make_optimizer(model, args.lr, args.weight_decay, "fused")
    tokens = np.random.default_rng(0).integers(0, 300, 2000).astype(np.uint16)
    splits = {"train": tokens[:1800], "val": tokens[1800:]}
    state = {"step": 0, "tokens_seen": 0, "history": [],
             "data_gen": torch.Generator().manual_seed(0)}
    autocast = mod.make_autocast(torch.device("cpu"), "fp32")
    for _ in range(steps):
        mod.train_step(model, optimizer, splits, state, args, torch.device("cpu"), autocast)
    return model, optimizer, state, args, splits


def test_checkpoint_loads_into_fresh_model_with_identical_logits(mod, tmp_path):
    model, optimizer, state, args, _ = make_run(mod, tmp_path)
    path = tmp_path / "ckpt.pt"
    mod.save_checkpoint(path, mod.checkpoint_state(model, optimizer, state, args, {"kind": "x"}))
    fresh = mod.build_model_from_checkpoint(mod.load_checkpoint(path))
    x = torch.randint(0, 300, (2, 16))
    model.eval()
    fresh.eval()
    assert torch.equal(model(x), fresh(x))


def test_interrupted_checkpoint_write_keeps_previous_checkpoint(mod, tmp_path, monkeypatch):
    model, optimizer, state, args, _ = make_run(mod, tmp_path)
    path = tmp_path / "ckpt.pt"
    mod.save_checkpoint(path, mod.checkpoint_state(model, optimizer, state, args, {"kind": "x"}))
    before = path.read_bytes()

    def dying_save(obj, fh):  # 写到一半进程"死掉"
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        mod.save_checkpoint(path, {"step": 99})
    assert path.read_bytes() == before
    assert mod.load_checkpoint(path)["step"] == 3


def test_token_cache_matches_tiktoken_and_is_built_once(mod, tmp_path, monkeypatch):
    monkeypatch.setattr(mod, "CACHE_DIR", tmp_path / "cache")
    docs = [f"第 {i} 篇：今天天气很好，我们去公园散步。Hello {i}!\n" * 3 for i in range(12)]
    corpus = write_corpus(tmp_path / "corpus", docs)
    enc = mod.load_project_tokenizer()
    calls = []
    real_build = mod.build_token_cache
    monkeypatch.setattr(mod, "build_token_cache", lambda *a: calls.append(1) or real_build(*a))
    train, val = mod.load_corpus(corpus, enc, enc.name, 8)
    train2, val2 = mod.load_corpus(corpus, enc, enc.name, 8)
    assert len(calls) == 1, "第二次应当直接复用缓存"
    # 参照：每个文档前一个 <|endoftext|>，第 10 个文档（下标 9）进验证集
    ref = [[enc.eot_token] + enc.encode_ordinary(d) for d in docs]
    assert train.tolist() == sum(ref[:9] + ref[10:], [])
    assert val.tolist() == ref[9]
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    assert train.dtype == np.uint16


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


def test_optimizer_decays_only_matrices(mod):
    model = mod.GPTModel(dict(vocab_size=64, context_length=8, emb_dim=16, n_heads=2,
                              n_layers=1, drop_rate=0.0, qkv_bias=True))
    decay, no_decay = mod.make_optimizer(model, 1e-3, 0.1, "foreach").param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


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


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path):
    copy_standalone(SCRIPT, tmp_path)
    cmd = [sys.executable, SCRIPT, *FAST, "--max-steps", "100000", "--log-every", "1",
           "--out-dir", "out"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:  # 等它真正开始训练，再按"Ctrl-C"
        if line.startswith("步"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in out
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] >= 1 and len(ckpt["history"]) == ckpt["step"] + 1  # 含第 0 步的评估


def test_sweep_and_interactive_modes(tmp_path):
    sweep = run_standalone(SCRIPT, FAST + ["--sweep", "--sweep-steps", "3"], tmp_path)
    assert sweep.returncode == 0, sweep.stderr
    assert sweep.stdout.count("试验") == 2 and "排名" in sweep.stdout
    train = subprocess.run([sys.executable, SCRIPT, *FAST, "--max-steps", "2", "--out-dir", "o"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert train.returncode == 0, train.stderr
    chat = subprocess.run([sys.executable, SCRIPT, "--interactive", "--out-dir", "o"],
                          cwd=tmp_path, input=":temp 0\n:tokens 5\n今天\n:quit\n",
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert "今天" in chat.stdout and "temp=0.0" in chat.stdout


def run_in_process(mod, args, monkeypatch, tmp_path, capsys):
    """在进程内调用 main()（省去每次启动 Python、导入 torch 的几秒）；返回 (退出码, stdout, stderr)。"""
    monkeypatch.setattr(mod, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    try:
        mod.main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", ["missing", "empty", "no_txt", "not_utf8", "too_short",
                                  "bad_ckpt", "ckpt_mismatch", "bad_init", "huge_context"])
def test_bad_input_exits_2_with_chinese_message(mod, tmp_path, monkeypatch, capsys, case):
    args = FAST + ["--out-dir", "out"]
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
    elif case == "bad_ckpt":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "ckpt.pt").write_bytes(b"not a checkpoint")
        args += ["--resume"]
    elif case == "ckpt_mismatch":
        code, _, err = run_in_process(mod, FAST + ["--max-steps", "1", "--out-dir", "out"],
                                      monkeypatch, tmp_path, capsys)
        assert code == 0, err
        args += ["--resume", "--n-layers", "5"]
    elif case == "bad_init":
        args += ["--init", "gpt5"]
    elif case == "huge_context":  # 否则会先分配 99999² 的掩码把内存耗尽
        args += ["--context-length", "99999"]
    saved = {p: p.read_bytes() for p in (tmp_path / "out").glob("*")} \
        if (tmp_path / "out").is_dir() else {}
    code, _, err = run_in_process(mod, args, monkeypatch, tmp_path, capsys)
    assert code == 2, err
    assert err.startswith("错误：") and err.count("\n") == 1  # 只有一行中文说明
    assert {p: p.read_bytes() for p in saved} == saved  # 已保存的东西一个字节都没变


def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path):
    result = run_standalone(SCRIPT, FAST + ["--data", "nope"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("错误：") and "Traceback" not in result.stderr


def test_continue_pretraining_from_gpt2_layout_directory(tmp_path):
    """--init 一个 transformers 写出的 GPT-2 目录：换用 GPT-2 分词器，词表补到 50304，能训练、能续训。"""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        skip_or_fail("未安装 transformers")
    try:
        load_script(SCRIPT).get_gpt2_tokenizer()
    except Exception as err:
        skip_or_fail(f"没有 GPT-2 词表：{err}")
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64))
    hf.save_pretrained(tmp_path / "tiny-gpt2")
    args = FAST + ["--init", "tiny-gpt2", "--context-length", "32", "--max-steps", "4",
                   "--eval-every", "2", "--out-dir", "out"]
    result = run_standalone(SCRIPT, args, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "词表 50304" in result.stdout and "gpt2" in result.stdout
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["tokenizer"]["kind"] == "gpt2" and ckpt["config"]["vocab_size"] == 50304
    # 载入的起点就是 GPT-2 的权重：补齐前的那些行在训练 4 步后仍与原权重很接近
    wte = hf.transformer.wte.weight.detach()
    assert torch.allclose(ckpt["model"]["tok_emb.weight"][:50257], wte, atol=0.05)


def test_resume_alone_reuses_the_checkpoint_settings(mod, tmp_path, monkeypatch, capsys):
    first = FAST + ["--max-steps", "4", "--stop-at", "2", "--out-dir", "o"]
    code, _, err = run_in_process(mod, first, monkeypatch, tmp_path, capsys)
    assert code == 0, err
    # 只给 --resume：tiny 模型的上下文 64、批次 8、总步数 4 都从检查点里恢复
    code, out, err = run_in_process(mod, ["--resume", "--dtype", "fp32", "--out-dir", "o"],
                                    monkeypatch, tmp_path, capsys)
    assert code == 0, err
    assert "上下文 64" in out and "步     4/4" in out
    assert torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)["step"] == 4


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
    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "data" / "corpus").rglob("*.txt"))]
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
