"""09_kvcache.py：带缓存与不带缓存的贪心输出逐词相同（几种提示词长度、跨过上下文长度、两种缓存、批量与逐条）、
缓存在两次调用之间清空、模型与 03 的 GPTModel logits 一致、FLOPs 与逐步手算一致、坏输入。"""
import json
import re
import time

import pytest
import torch

from conftest import load_script, run_standalone

SCRIPT = "09_kvcache.py"


@pytest.fixture(scope="module")
def mod():
    return load_script(SCRIPT)


# 这个文件的每个测试都只用 1 个线程（见 conftest.py 的 one_thread）
pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(mod, context=32, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = dict(mod.GPT_CONFIGS["tiny"], vocab_size=101, context_length=context, n_layers=2, **extra)
    return mod.GPTModel(cfg).eval()


def prompt(length, seed=1):
    return torch.randint(0, 101, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["concat", "prealloc"])
@pytest.mark.parametrize("length", [1, 5, 31, 32, 40])
def test_cached_greedy_equals_uncached_token_for_token(mod, kind, length):
    model = small_model(mod)
    model.set_cache_kind(kind)
    idx = prompt(length)
    # 60 个新词 > 上下文 32：中途至少跳两次窗口
    plain = mod.generate(model, idx, 60, use_cache=False)
    cached = mod.generate(model, idx, 60, use_cache=True)
    assert plain.shape == (1, length + 60)
    assert torch.equal(plain, cached)


def test_uncached_within_the_context_equals_03_generate(mod):
    gpt = load_script("03_gpt.py")
    model = small_model(mod)
    ref = gpt.GPTModel(model.cfg).eval()
    ref.load_state_dict(model.state_dict())
    idx = prompt(7)
    want = gpt.generate(ref, idx, 20, context_size=32)
    assert torch.equal(mod.generate(model, idx, 20, use_cache=True), want)
    with torch.no_grad():  # 不带缓存的前向与 03 的 GPTModel 完全一样
        assert torch.allclose(model(idx), ref(idx), atol=1e-6)


def test_cache_is_reset_between_calls_and_has_the_right_length(mod):
    model = small_model(mod)
    a = mod.generate(model, prompt(6), 10)
    assert model.cache_len == 0 and all(b.att.k_cache is None for b in model.trf_blocks)
    b = mod.generate(model, prompt(6), 10)
    assert torch.equal(a, b)
    # 手动预填充 + 一步解码：缓存里正好 7 个词，logits 与整段算一次相同
    idx = prompt(7)
    with torch.no_grad():
        model.reset_cache()
        model(idx[:, :6], use_cache=True)
        step = model(idx[:, 6:], use_cache=True)
        full = model(idx)
    assert model.cache_len == 7 and model.trf_blocks[0].att.filled == 7
    assert torch.allclose(step[:, -1], full[:, -1], atol=1e-5)


def test_batched_left_padding_equals_one_by_one(mod):
    model = small_model(mod)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    batched = mod.generate_batch(model, prompts, 20, pad_id=0)  # 9 + 20 < 32：在上下文之内
    for p, got in zip(prompts, batched):
        alone = mod.generate(model, torch.tensor([p]), 20)[0, len(p):].tolist()
        assert got == alone
    # 跨过上下文时整批一起跳窗口（按填充后的长度），和逐条生成不再逐词相同；但带缓存与不带缓存仍相同
    long = mod.generate_batch(model, prompts, 40, pad_id=0)
    assert mod.generate_batch(model, prompts, 40, pad_id=0, use_cache=False) == long


def test_eos_stops_every_row(mod):
    model = small_model(mod)
    idx = prompt(4)
    first = mod.generate(model, idx, 1)[0, -1].item()
    out = mod.generate(model, idx, 20, eos_id=first)
    assert out.shape[1] == 5 and out[0, -1].item() == first


def test_flops_match_a_step_by_step_hand_count(mod):
    cfg = {"n_layers": 2, "emb_dim": 8, "vocab_size": 10, "context_length": 64}
    per_token = 2 * (2 * 12 * 64 + 8 * 10)
    attn = 4 * 2 * 8
    # 提示词 3 个词，生成 2 个：不带缓存 第 1 步算 3 个词、第 2 步 4 个
    plain = per_token * 3 + attn * (1 + 2 + 3) + per_token * 4 + attn * (1 + 2 + 3 + 4)
    cached = per_token * 3 + attn * (1 + 2 + 3) + per_token + attn * 4
    assert mod.generation_flops(cfg, 3, 2, cached=False) == plain
    assert mod.generation_flops(cfg, 3, 2, cached=True) == cached


def test_quick_run_prints_the_table(tmp_path):
    result = run_standalone(SCRIPT, ["--quick"], tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    for words in ("TFLOPs", "不带缓存", "拼接缓存", "预分配缓存", "token/s"):
        assert words in result.stdout


@pytest.mark.parametrize("args", [["--new-tokens", "0"], ["--new-tokens", "-3"], ["--prompt-tokens", "1e9"],
                                  ["--seed", "-1"], ["--init", "no-such.pt"], ["--port", "99999"],
                                  ["--serve", "--port", "-1"]])
def test_bad_input_exits_2(mod, args, capsys):
    with pytest.raises(SystemExit) as exit_:
        mod.main(["--quick", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("错误：") and len(err.strip().splitlines()) == 1


@pytest.fixture
def chat_server(mod):
    import threading
    model = small_model(mod, context=128)
    tokenizer = mod.load_project_tokenizer()
    model = mod.GPTModel(dict(model.cfg, vocab_size=tokenizer.n_vocab)).eval()
    server = mod.make_server(model, tokenizer, "alpaca", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, model, tokenizer
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    assert not thread.is_alive()  # 干净地关掉了


def post(server, body, raw=None):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    data = raw if raw is not None else json.dumps(body, ensure_ascii=False).encode("utf-8")
    conn.request("POST", "/api/chat", body=data, headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def events(resp):
    for line in resp:
        if line.startswith(b"data: "):
            yield json.loads(line[6:])


def test_server_streams_the_same_tokens_as_generate(mod, chat_server):
    server, model, tokenizer = chat_server
    conn, resp = post(server, {"prompt": "计算 12 + 30。", "max_new_tokens": 30, "temperature": 0})
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    got = list(events(resp))
    conn.close()
    assert got[-1]["done"] and got[-1]["tokens"] == len(got) - 1
    ids = tokenizer.encode_ordinary(mod.format_prompt({"instruction": "计算 12 + 30。", "input": ""}))
    want = mod.generate(model, torch.tensor([ids]), 30, eos_id=tokenizer.eot_token)[0, len(ids):].tolist()
    want = want[:want.index(tokenizer.eot_token)] if tokenizer.eot_token in want else want
    assert [e["id"] for e in got[:-1]] == want
    assert "".join(e["text"] for e in got[:-1]) == tokenizer.decode([t for t in want if t < tokenizer.n_vocab])
    # 首页是自带 CSS/JS 的一页，不引用任何外部地址
    import http.client
    page = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    page.request("GET", "/")
    html = page.getresponse().read().decode("utf-8")
    assert "<script>" in html and "/api/chat" in html and "http" not in html.replace("http-equiv", "")


@pytest.mark.parametrize("body, raw", [
    (None, b"not json"), ({"prompt": ""}, None), ({"prompt": "hi", "temperature": -1}, None),
    ({"prompt": "hi", "max_new_tokens": 100000}, None), ({"prompt": "hi", "top_p": "x"}, None),
    ({"prompt": "hi", "top_k": float("nan")}, b'{"prompt": "hi", "top_k": NaN}'),
])
def test_server_answers_bad_requests_with_400_in_chinese(chat_server, body, raw):
    server, _, _ = chat_server
    conn, resp = post(server, body, raw)
    payload = json.loads(resp.read())
    conn.close()
    assert resp.status == 400 and re.search(r"[\u4e00-\u9fff]", payload["error"])


def test_second_request_is_answered_busy_and_closing_the_stream_stops_generation(chat_server):
    server, _, _ = chat_server
    conn, resp = post(server, {"prompt": "讲个故事", "max_new_tokens": 512, "temperature": 1.0})
    first = next(events(resp))
    assert "id" in first
    conn2, resp2 = post(server, {"prompt": "你好", "max_new_tokens": 5})
    assert resp2.status == 503 and "正在" in json.loads(resp2.read())["error"]
    conn2.close()
    resp.close()
    conn.close()  # 浏览器按了"停止"：服务器写下一个词时发现断开，停止生成、放开锁
    for _ in range(100):
        conn3, resp3 = post(server, {"prompt": "你好", "max_new_tokens": 3})
        if resp3.status == 200:
            break
        resp3.read()
        conn3.close()
        time.sleep(0.05)
    assert resp3.status == 200 and list(events(resp3))[-1]["done"]
    conn3.close()
