"""09_kvcache.py：带缓存与不带缓存的贪心输出逐词相同（几种提示词长度、跨过上下文长度、两种缓存、批量与逐条）、
缓存在两次调用之间清空、模型与 03 的 GPTModel logits 一致、FLOPs 与逐步手算一致、坏输入。"""
import sys

import pytest
import torch

from conftest import load_script, run_standalone

SCRIPT = "09_kvcache.py"


@pytest.fixture(scope="module")
def mod():
    return load_script(SCRIPT)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
                                  ["--seed", "-1"], ["--init", "no-such.pt"]])
def test_bad_input_exits_2(mod, args, capsys):
    with pytest.raises(SystemExit) as exit_:
        mod.main(["--quick", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("错误：") and len(err.strip().splitlines()) == 1
