"""05_finetune_cls.py：批次与填充、最后一个真实 token、分类器与 GPTModel 一致、冻结的参数数、
双向注意力、词袋基线、快跑赢过随机猜、载入与预测、数据生成器与固定划分、下载（本机假服务器）、坏输入。"""
import http.server
import io
import subprocess
import sys
import tarfile
import threading
import zipfile

import pytest
import torch

from conftest import ROOT, load_script, run_standalone

SCRIPT = "05_finetune_cls.py"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def mod():
    return load_script(SCRIPT)


# 这个文件的每个测试都只用 1 个线程（见 conftest.py 的 one_thread）
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_classifier(mod, causal=True, position="last", seed=0):
    torch.manual_seed(seed)
    cfg = dict(mod.model_config("tiny"), vocab_size=300)
    return mod.GPTClassifier(cfg, ["ham", "spam"], position, causal).eval()


def run_in_process(mod, args, monkeypatch, tmp_path, capsys, stdin=None):
    """进程内调用 main()：返回 (退出码, stdout, stderr)。"""
    monkeypatch.setattr(mod, "CACHE_DIR", tmp_path / "cache")
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


def test_collate_pads_on_the_right_with_the_pad_id(mod):
    batch = [([5, 6, 7], 1), ([8], 0), ([9, 10], 1)]
    x, lengths, y = mod.collate(batch, pad_id=99)
    assert x.tolist() == [[5, 6, 7], [8, 99, 99], [9, 10, 99]]
    assert lengths.tolist() == [3, 1, 2] and y.tolist() == [1, 0, 1]
    x, _, _ = mod.collate(batch, pad_id=99, pad_to=6)
    assert x.shape == (3, 6) and x[0].tolist() == [5, 6, 7, 99, 99, 99]


def test_encode_rows_truncates_and_keeps_labels(mod):
    tok = mod.load_project_tokenizer()
    rows = [("今天下午三点开会，别迟到。" * 20, 0), ("验证码 123456", 1)]
    encoded = mod.encode_rows(tok, rows, max_length=10)
    assert [len(ids) for ids, _ in encoded] == [10, min(10, len(tok.encode("验证码 123456")))]
    assert encoded[1][0] == tok.encode("验证码 123456")[:10] and [l for _, l in encoded] == [0, 1]


@pytest.mark.parametrize("position", ["last", "mean"])
def test_prediction_does_not_depend_on_padding(mod, position):
    """右侧填充 + 最后一个真实 token（或真实 token 的平均）：同一条短信单独算、和长短信拼一批算，
    logits 相同。若错用位置 -1（填充处），这个测试就会失败。"""
    model = tiny_classifier(mod, position=position)
    short, long = [3, 4, 5, 6], list(range(10, 40))
    alone = model(*mod.collate([(short, 0)], 0)[:2])
    padded = model(*mod.collate([(short, 0), (long, 1)], 0)[:2])
    torch.testing.assert_close(padded[0], alone[0])


def test_last_position_is_the_last_real_token_hidden_state(mod):
    model = tiny_classifier(mod)
    x, lengths, _ = mod.collate([([3, 4, 5], 0), (list(range(10, 20)), 1)], 0)
    h = model.hidden_states(x, lengths)
    expected = model.out_head(torch.stack([h[0, 2], h[1, 9]]))
    torch.testing.assert_close(model(x, lengths), expected)


def test_classifier_body_matches_gpt_model(mod):
    """build_classifier 从 GPTModel 复制参数：它的隐藏状态过 GPTModel 的输出头，等于 GPTModel 的 logits。"""
    torch.manual_seed(1)
    gpt = mod.GPTModel(dict(mod.model_config("tiny"), vocab_size=300)).eval()
    model = mod.build_classifier(gpt, ["ham", "spam"]).eval()
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        h = model.hidden_states(x, torch.tensor([12, 12]))
        torch.testing.assert_close(gpt.out_head(h), gpt(x))
    assert model.out_head.out_features == 2


def test_show_positions_finds_what_the_causal_mask_lets_through(mod):
    model = tiny_classifier(mod)
    first, last = mod.show_positions(model, [7, 8, 9, 10, 11])
    assert first == [0, 1, 2, 3, 4] and last == [4]
    bi = tiny_classifier(mod, causal=False)
    first, last = mod.show_positions(bi, [7, 8, 9, 10, 11])
    assert first == last == [0, 1, 2, 3, 4]  # 没有因果掩码：改哪个都影响所有位置


def test_bidirectional_attention_matches_unmasked_sdpa_and_ignores_padding(mod):
    model = tiny_classifier(mod, causal=False)
    att = model.trf_blocks[0].att
    x = torch.randn(2, 7, model.cfg["emb_dim"])
    att.key_mask = torch.ones(2, 7, dtype=torch.bool)
    b, t, d, heads = 2, 7, model.cfg["emb_dim"], model.cfg["n_heads"]
    q, k, v = (w(x).view(b, t, heads, d // heads).transpose(1, 2)
               for w in (att.W_query, att.W_key, att.W_value))
    scores = torch.softmax(q @ k.transpose(2, 3) / (d // heads) ** 0.5, dim=-1)  # 手算，无掩码
    expected = att.out_proj((scores @ v).transpose(1, 2).reshape(b, t, d))
    torch.testing.assert_close(att(x), expected)
    short, long = [3, 4, 5, 6], list(range(10, 40))
    alone = model(*mod.collate([(short, 0)], 0)[:2])
    padded = model(*mod.collate([(short, 0), (long, 1)], 0)[:2])
    torch.testing.assert_close(padded[0], alone[0])  # key_mask 遮住了填充


def test_trainable_parameter_counts_per_mode(mod):
    model = tiny_classifier(mod)
    cfg = model.cfg
    d, v, ctx = cfg["emb_dim"], cfg["vocab_size"], cfg["context_length"]
    # 手算一个块：Q/K/V（无偏置）3d² + 输出投影 d²+d + 前馈 d·4d+4d + 4d·d+d + 两个 LayerNorm 4d
    block = 3 * d * d + d * d + d + 4 * d * d + 4 * d + 4 * d * d + d + 4 * d
    head, final_norm = d * 2 + 2, 2 * d
    total = v * d + ctx * d + cfg["n_layers"] * block + final_norm + head
    assert mod.set_trainable(model, "head") == head
    assert mod.set_trainable(model, "last-n", 1) == head + final_norm + block
    assert mod.set_trainable(model, "last-n", 2) == head + final_norm + 2 * block
    assert mod.set_trainable(model, "all") == total == sum(p.numel() for p in model.parameters())
    mod.set_trainable(model, "last-n", 1)
    assert not model.tok_emb.weight.requires_grad
    assert model.trf_blocks[-1].ff.layers[0].weight.requires_grad


def test_parse_trainable(mod):
    assert mod.parse_trainable(["last-block"]) == ("last-n", 1)
    assert mod.parse_trainable(["last-n", "3"]) == ("last-n", 3)
    assert mod.parse_trainable(["head"]) == ("head", 0) and mod.parse_trainable(None) is None
    for bad in (["last-n"], ["last-n", "0"], ["last-n", "x"], ["everything"], ["head", "2"]):
        with pytest.raises(mod.UserError):
            mod.parse_trainable(bad)


def test_bow_baseline_learns_a_keyword_and_not_noise(mod):
    """词袋逻辑回归：标签由"有没有某个字"决定时全对；标签与文字无关时只有约一半对。"""
    import random
    rng = random.Random(0)
    chars = "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会"
    def text(has):
        return "".join(rng.choice(chars) for _ in range(12)) + ("骗" if has else "")
    train = [(text(i % 2 == 1), i % 2) for i in range(400)]
    test = [(text(i % 2 == 1), i % 2) for i in range(200)]
    assert mod.bow_baseline(train, test, 2, "char") == 1.0
    noise_train = [(text(False), rng.randrange(2)) for _ in range(400)]
    noise_test = [(text(False), rng.randrange(2)) for _ in range(400)]
    assert 0.4 < mod.bow_baseline(noise_train, noise_test, 2, "char") < 0.6
    words = [("free prize now" if i % 2 else "see you at lunch", i % 2) for i in range(50)]
    assert mod.bow_baseline(words, words, 2, "word") == 1.0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """只跑一次 --quick（独立目录、子进程），供下面几个测试共用：返回 (目录, 结果)。"""
    folder = tmp_path_factory.mktemp("quick")
    result = run_standalone(SCRIPT, ["--quick", "--out-dir", "out"], folder, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    return folder, result


def accuracy_line(stdout, name):
    line = next(l for l in stdout.splitlines() if name in l and "%" in l)
    return float(line.split("%")[0]) / 100


def test_quick_run_beats_chance_and_majority(quick_run):
    _, result = quick_run
    out = result.stdout
    after = accuracy_line(out, "GPT 微调后")
    before = accuracy_line(out, "GPT 微调前")
    majority = accuracy_line(out, "总猜多数类")
    assert after > max(majority, before) + 0.15, out
    assert "token/s" in out and "只有位置" in out


def test_saved_quick_model_predicts_and_loads(quick_run, mod):
    folder, _ = quick_run
    result = subprocess.run([sys.executable, SCRIPT, "--out-dir", "out", "--predict",
                             "【招商银行】您尾号1234的储蓄卡消费支出人民币35.00元", "--predict",
                             "恭喜您中奖，点击 t.cn/x 领取"], cwd=folder, capture_output=True,
                            text=True, timeout=120, env={**ONE_THREAD, "PATH": ""})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all("短信" in line and "%" in line for line in lines)
    model, tokenizer, labels = mod.load_classifier(folder / "out" / "best.pt")
    assert labels == ["ham", "spam"]
    got = mod.classify(model, tokenizer, ["今晚回家吃饭吗", "x" * 5000])
    assert [label in ("ham", "spam") for label, _ in got] == [True, True]
    assert all(0.5 <= p <= 1 for _, p in got)
    # 和手算的 softmax 一致
    x, lengths, _ = mod.collate(mod.encode_rows(tokenizer, [("今晚回家吃饭吗", 0)], 64), 0)
    probs = torch.softmax(model(x, lengths), -1)[0]
    assert got[0][1] == pytest.approx(probs.max().item(), abs=1e-6)
    assert got[0][0] == labels[probs.argmax().item()]


def test_interactive_classifies_lines_until_empty(quick_run, mod, monkeypatch, capsys, tmp_path):
    folder, _ = quick_run
    code, out, err = run_in_process(mod, ["--interactive", "--out-dir", str(folder / "out")],
                                    monkeypatch, tmp_path, capsys, stdin="在吗\n明天见\n\n")
    assert code == 0, err
    assert out.count("短信（") == 2


def test_sms_generator_is_deterministic_and_splits_are_reproducible(tmp_path):
    gen = load_script("data/make_sms")
    assert gen.generate(7, 50) == gen.generate(7, 50) != gen.generate(8, 50)
    rows = gen.generate(0, 400)
    assert len(set(rows)) == 400 and sum(label == "spam" for label, _ in rows) == 200
    hand = {row for f in (ROOT / "data" / "sms" / "handwritten").glob("*.tsv")
            for row in gen.read_tsv(f)}
    assert len(hand) >= 1000
    test = gen.read_tsv(ROOT / "data" / "sms" / "test.tsv")
    val = gen.read_tsv(ROOT / "data" / "sms" / "val.tsv")
    train = gen.read_tsv(ROOT / "data" / "sms" / "train.tsv")
    assert set(test) <= hand and set(val) <= hand  # 测试集、验证集全是手写的
    generated = {text for _, text in gen.generate(gen.GEN_SEED, gen.GEN_COUNT)}
    assert not generated & {text for _, text in test}
    assert not {t for _, t in test} & {t for _, t in train}  # 三个划分互不重叠
    assert len(train) + len(val) + len(test) >= 3000
    # 重新生成三个划分：与提交的文件逐字相同
    original = gen.SMS_DIR
    gen.SMS_DIR = tmp_path
    (tmp_path / "handwritten").symlink_to(original / "handwritten")
    try:
        gen.build_splits()
    finally:
        gen.SMS_DIR = original
    for split in ("train", "val", "test"):
        assert (tmp_path / f"{split}.tsv").read_bytes() == (original / f"{split}.tsv").read_bytes()


@pytest.fixture
def dataset_server(monkeypatch):
    """127.0.0.1 上假扮 UCI 与斯坦福的服务器：一个小 zip（SMS Spam Collection）和一个小 tar.gz（IMDb），
    支持 Range（断点续传）。"""
    lines = [f"spam\tWIN a FREE prize {i}, call 0900{i:04d} now!" for i in range(40)] + \
            [f"ham\tOk see you at lunch {i}, bring the book" for i in range(120)]
    sms = io.BytesIO()
    with zipfile.ZipFile(sms, "w") as zf:
        zf.writestr("SMSSpamCollection", "\n".join(lines) + "\n")
        zf.writestr("readme", "fake")
    imdb = io.BytesIO()
    with tarfile.open(fileobj=imdb, mode="w:gz") as tf:
        for split in ("train", "test"):
            for label, text in (("pos", "A wonderful, moving film.<br />Loved it"),
                                ("neg", "Dull and far too long.<br />Awful")):
                for i in range(10):
                    data = f"{text} {i}".encode()
                    info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_7.txt")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    state = {"files": {"/sms.zip": sms.getvalue(), "/imdb.tar.gz": imdb.getvalue()},
             "requests": [], "lines": lines}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["requests"].append((self.path, self.headers.get("Range")))
            payload = state["files"].get(self.path)
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
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("SMS_SPAM_URL", f"{base}/sms.zip")
    monkeypatch.setenv("IMDB_URL", f"{base}/imdb.tar.gz")
    yield state
    server.shutdown()
    server.server_close()


def test_sms_spam_download_resumes_balances_and_splits(mod, dataset_server, tmp_path,
                                                       monkeypatch, capsys):
    part = tmp_path / "cache" / "downloads" / "sms-spam.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(dataset_server["files"]["/sms.zip"][:100])  # 上次断在第 100 字节
    args = ["--quick", "--dataset", "sms-spam", "--epochs", "1", "--out-dir", "out"]
    code, out, err = run_in_process(mod, args, monkeypatch, tmp_path, capsys)
    assert code == 0, err
    assert dataset_server["requests"] == [("/sms.zip", "bytes=100-")]
    rows = {s: mod.read_tsv(tmp_path / "cache" / "sms-spam" / f"{s}.tsv", ["ham", "spam"])
            for s in ("train", "val", "test")}
    assert [len(r) for r in rows.values()] == [56, 8, 16]  # 40 垃圾 + 抽 40 正常 = 80，70/10/20
    assert sum(label for r in rows.values() for _, label in r) == 40
    texts = {t for r in rows.values() for t, _ in r}
    assert texts <= {line.split("\t")[1] for line in dataset_server["lines"]}
    code, _, err = run_in_process(mod, args, monkeypatch, tmp_path, capsys)
    assert code == 0 and len(dataset_server["requests"]) == 1  # 第二次全用缓存


def test_imdb_download_is_read_from_the_tarball(mod, dataset_server, tmp_path):
    mod.CACHE_DIR, original = tmp_path / "cache", mod.CACHE_DIR
    try:
        folder = mod.prepare_dataset("imdb")
    finally:
        mod.CACHE_DIR = original
    rows = [r for s in ("train", "val", "test") for r in mod.read_tsv(folder / f"{s}.tsv",
                                                                        ["neg", "pos"])]
    assert len(rows) == 40 and sum(label for _, label in rows) == 20
    assert all("<br />" not in text for text, _ in rows)
    assert ("A wonderful, moving film. Loved it 3", 1) in rows


def test_bad_numeric_flags_are_refused(mod, tmp_path, monkeypatch, capsys):
    for flag in ("--epochs", "--batch-size", "--lr", "--weight-decay", "--seed",
                 "--compare-epochs", "--max-length", "--limit"):
        for value in ("-1", "nan", "1e30") + (("0",) if flag != "--weight-decay" else ()):
            if flag == "--seed" and value == "0":
                continue
            code, out, err = run_in_process(mod, ["--quick", flag, value], monkeypatch, tmp_path,
                                            capsys)
            assert code == 2 and err.startswith("错误：") and err.count("\n") == 1, (flag, value, err)
            assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", ["missing_dir", "no_tab", "unknown_label", "empty_text",
                                  "not_utf8", "empty_file", "predict_empty", "predict_no_model",
                                  "pretrain_ckpt", "garbage_ckpt", "bad_trainable",
                                  "too_many_blocks", "max_length_too_long", "offline",
                                  "out_dir_is_file"])
def test_bad_input_exits_2_with_one_chinese_line(mod, tmp_path, monkeypatch, capsys, case):
    data = tmp_path / "d"
    data.mkdir()
    for split in ("train", "val", "test"):
        (data / f"{split}.tsv").write_text("ham\t今晚一起吃饭\nspam\t中奖了点链接\n", encoding="utf-8")
    args = ["--quick", "--data", str(data), "--out-dir", "out"]
    bad_line = {"no_tab": "ham 今晚一起吃饭", "unknown_label": "junk\t你好", "empty_text": "spam\t  "}
    if case == "missing_dir":
        args[2] = str(tmp_path / "nope")
    elif case in bad_line:
        (data / "val.tsv").write_text(f"ham\t好的\n{bad_line[case]}\n", encoding="utf-8")
    elif case == "not_utf8":
        (data / "test.tsv").write_bytes("ham\t你好".encode("gbk"))
    elif case == "empty_file":
        (data / "train.tsv").write_text("\n", encoding="utf-8")
    elif case == "predict_empty":
        args = ["--predict", "   ", "--out-dir", "out"]
        (tmp_path / "out").mkdir()
        mod.save_checkpoint(tmp_path / "out" / "best.pt", {})  # 不会读到：先检查文本
    elif case == "predict_no_model":
        args = ["--predict", "你好", "--out-dir", "out"]
    elif case in ("pretrain_ckpt", "garbage_ckpt"):
        (tmp_path / "out").mkdir()
        path = tmp_path / "out" / "best.pt"
        if case == "garbage_ckpt":
            path.write_bytes(b"not a checkpoint")
        else:  # 04 的预训练检查点：有 config/model/tokenizer，但不是分类器
            gpt = mod.GPTModel(dict(mod.model_config("tiny"), vocab_size=300))
            torch.save({"config": gpt.cfg, "model": gpt.state_dict(),
                        "tokenizer": {"kind": "gpt2"}}, path)
        args = ["--predict", "你好", "--out-dir", "out"]
    elif case == "bad_trainable":
        args += ["--trainable", "last-n", "zero"]
    elif case == "too_many_blocks":
        args += ["--trainable", "last-n", "9"]
    elif case == "max_length_too_long":
        args += ["--max-length", "100000"]
    elif case == "offline":
        args = ["--quick", "--dataset", "sms-spam", "--out-dir", "out"]
        monkeypatch.setenv("SMS_SPAM_URL", "http://127.0.0.1:9/sms.zip")
    elif case == "out_dir_is_file":
        (tmp_path / "out").write_text("我是一个文件", encoding="utf-8")
    saved = {p: p.read_bytes() for p in (tmp_path / "out").glob("*")} \
        if (tmp_path / "out").is_dir() else {}
    code, _, err = run_in_process(mod, args, monkeypatch, tmp_path, capsys)
    assert code == 2, err
    assert err.startswith("错误：") and err.count("\n") == 1
    assert {p: p.read_bytes() for p in saved} == saved
    if case in bad_line or case == "empty_file":
        assert "第 2 行" in err or "空的" in err
    if case == "offline":
        assert "SMS_SPAM_URL" in err and not (tmp_path / "cache" / "sms-spam").exists()


def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path):
    result = run_standalone(SCRIPT, ["--quick", "--lr", "nan"], tmp_path, env=ONE_THREAD)
    assert result.returncode == 2 and result.stderr.startswith("错误：--lr")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stdout == "" and not (tmp_path / "runs").exists()
