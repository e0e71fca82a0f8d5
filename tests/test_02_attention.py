"""02_attention.py 的测试：每种注意力写法都与 F.scaled_dot_product_attention 的参考结果一致
（前向与梯度），因果性、dropout、掩码 buffer 的行为，基准计时可信，坏参数一行中文退出，
以及 --quick 独立运行。"""
import math
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import load_script, run_standalone

mod = load_script("02_attention.py")
CPU = torch.device("cpu")
VARIANTS = mod.variants_for(CPU, verbose=False)  # CPU 上不支持的（如 FlexAttention）不在其中
D, HEADS, TOKENS, BATCH = 32, 4, 10, 2


def reference_mha(x, mha):
    """参考实现：直接用 mha 的权重张量 + F.scaled_dot_product_attention(is_causal=True)。"""
    b, t, _ = x.shape

    def heads(linear):
        return F.linear(x, linear.weight, linear.bias).view(b, t, HEADS, -1).transpose(1, 2)

    q, k, v = heads(mha.W_query), heads(mha.W_key), heads(mha.W_value)
    context = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.linear(context.transpose(1, 2).reshape(b, t, D), mha.out_proj.weight,
                    mha.out_proj.bias)


def make_base(qkv_bias, seed=0):
    """随机权重的教学版 MultiHeadAttention；偏置也随机化，免得全 0 掩盖错位。"""
    torch.manual_seed(seed)
    base = mod.MultiHeadAttention(D, D, TOKENS, 0.0, HEADS, qkv_bias=qkv_bias)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.1)
    return base


def reference_grads_in_variant_layout(name, base, qkv_bias):
    """把参考梯度当作"权重"，用同一个 copy_weights 摆成该变体的参数布局。
    copy_weights 只是对权重做切片/拼接/转置，梯度也按同样方式重排，所以可以直接逐个比较。"""
    grads_as_weights = mod.MultiHeadAttention(D, D, TOKENS, 0.0, HEADS, qkv_bias=qkv_bias)
    with torch.no_grad():
        for p, ref_p in zip(grads_as_weights.parameters(), base.parameters()):
            p.copy_(ref_p.grad)
    arranged = VARIANTS[name](D, D, TOKENS, 0.0, HEADS, qkv_bias=qkv_bias)
    mod.copy_weights(grads_as_weights, arranged)
    return dict(arranged.named_parameters())


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_sdpa_reference_forward_and_gradients(name, qkv_bias):
    base = make_base(qkv_bias)
    model = VARIANTS[name](D, D, TOKENS, 0.0, HEADS, qkv_bias=qkv_bias)
    mod.copy_weights(base, model)
    x = torch.randn(BATCH, TOKENS, D, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    upstream = torch.randn(BATCH, TOKENS, D)  # 随机上游梯度，比 .sum() 更能暴露错位

    out = model(x)
    (out * upstream).sum().backward()
    expected = reference_mha(x_ref, base)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)

    expected_grads = reference_grads_in_variant_layout(name, base, qkv_bias)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) >= 3  # 至少 QKV 投影（合并布局只有一个）与输出投影的权重、偏置
    for pname, p in trainable:
        torch.testing.assert_close(p.grad, expected_grads[pname], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_changing_future_tokens_never_changes_earlier_outputs(name):
    torch.manual_seed(1)
    model = VARIANTS[name](D, D, TOKENS, 0.0, HEADS, qkv_bias=True).eval()
    x = torch.randn(BATCH, TOKENS, D)
    with torch.no_grad():
        out = model(x)
        for cut in (1, TOKENS // 2, TOKENS - 1):
            changed = x.clone()
            changed[:, cut:] = torch.randn(BATCH, TOKENS - cut, D) * 5
            new = model(changed)
            torch.testing.assert_close(new[:, :cut], out[:, :cut], atol=1e-6, rtol=0)
            assert not torch.allclose(new[:, cut:], out[:, cut:])  # 未来位置确实被改动了


@pytest.mark.parametrize("name", list(VARIANTS))
def test_dropout_is_inactive_in_eval_mode_and_active_in_train_mode(name):
    if not getattr(VARIANTS[name], "supports_dropout", True):
        pytest.skip(f"{name} 没有注意力 dropout")
    torch.manual_seed(2)
    model = VARIANTS[name](D, D, TOKENS, 0.5, HEADS)
    x = torch.randn(BATCH, TOKENS, D)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        eval_out = model(x)
        model.train()
        assert not torch.allclose(model(x), eval_out)


@pytest.mark.parametrize("cls", ["CausalAttention", "MultiHeadAttention"])
def test_mask_buffer_moves_with_module_and_is_not_in_state_dict(cls):
    args = (D, D, TOKENS, 0.0, HEADS) if cls == "MultiHeadAttention" else (D, D, TOKENS, 0.0)
    module = getattr(mod, cls)(*args)
    assert "mask" in dict(module.named_buffers())
    assert "mask" not in module.state_dict()
    expected = torch.triu(torch.ones(TOKENS, TOKENS, dtype=torch.bool), diagonal=1)
    assert torch.equal(module.mask, expected)
    module.to(torch.float64)  # .to(dtype) 只转换浮点张量：权重变、布尔掩码不变
    assert module.W_query.weight.dtype == torch.float64 and module.mask.dtype == torch.bool
    module.to("meta")  # 没有 GPU 也能验证"随模块移动"：meta 设备
    assert module.mask.device.type == "meta"


def test_self_attention_v1_equals_v2_after_copying_weights():
    torch.manual_seed(3)
    v1, v2 = mod.SelfAttentionV1(3, 2), mod.SelfAttentionV2(3, 2)
    inputs = torch.tensor(mod.EMBEDDINGS)
    assert not torch.allclose(v1(inputs), v2(inputs))
    mod.copy_v2_into_v1(v2, v1)
    torch.testing.assert_close(v1(inputs), v2(inputs), atol=1e-6, rtol=0)
    # 再与手算比较：softmax(q·kᵀ/√d_k)·v
    q, k, v = (inputs @ w.weight.T for w in (v2.W_query, v2.W_key, v2.W_value))
    by_hand = torch.softmax(q @ k.T / math.sqrt(2), dim=-1) @ v
    torch.testing.assert_close(v2(inputs), by_hand, atol=1e-6, rtol=0)


def test_wrapper_equals_efficient_mha_when_weights_arranged_the_same():
    base = make_base(qkv_bias=True, seed=4)
    wrapper = mod.MultiHeadAttentionWrapper(D, D, TOKENS, 0.0, HEADS, qkv_bias=True)
    x = torch.randn(BATCH, TOKENS, D)
    with torch.no_grad():
        assert not torch.allclose(wrapper(x), base(x), atol=1e-3)
        mod.copy_weights(base, wrapper)
        torch.testing.assert_close(wrapper(x), base(x), atol=1e-5, rtol=1e-5)


def test_simple_attention_matches_hand_computation():
    inputs = mod.EMBEDDINGS
    _, weights, context = mod.simple_attention(torch.tensor(inputs))
    for i, query in enumerate(inputs):
        scores = [sum(a * b for a, b in zip(query, key)) for key in inputs]
        exps = [math.exp(s) for s in scores]
        hand_weights = [e / sum(exps) for e in exps]
        hand_context = [sum(w * key[j] for w, key in zip(hand_weights, inputs)) for j in range(3)]
        assert weights[i].tolist() == pytest.approx(hand_weights, abs=1e-6)
        assert context[i].tolist() == pytest.approx(hand_context, abs=1e-6)


def test_mask_after_softmax_breaks_on_extreme_scores_but_minus_inf_does_not(capsys):
    mod.demo_mask_after_softmax()
    line = capsys.readouterr().out
    assert "nan" in line and "0.7311" in line


def test_unavailable_device_gives_chinese_error_and_exit_code_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("本机有 CUDA，无法测试“设备不可用”的报错")
    with pytest.raises(SystemExit) as exit_info:
        mod.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("错误：")


def sleeper(slow_calls, fast_s, slow_s=0.1):
    """假的待计时函数：第 slow_calls 次调用（从 1 数）睡 slow_s 秒，模拟被别的进程打断；其余睡 fast_s。"""
    calls = []

    def fn():
        calls.append(len(calls) + 1)
        time.sleep(slow_s if len(calls) in slow_calls else fast_s)

    fn.calls = calls
    return fn


def test_benchmark_timer_keeps_the_fastest_call_and_remeasures_impossible_rows():
    # "a" 的前向：预热 1 次 + 计时的前 3 轮 + 补测的第 1 轮都被"打断"（100 ms），之后才快（1 ms）。
    # 取中位数或平均值就会报出前向 100 ms、前向+反向 20 ms——旧代码打印过的那种不合理的表
    fwd_a, both_a = sleeper({1, 2, 3, 4, 5}, 0.001), sleeper({1}, 0.02)
    fwd_b, both_b = sleeper({1}, 0.001), sleeper({1}, 0.02)  # b 只有第一次（预热）慢
    result = mod.best_times({"a": (fwd_a, both_a), "b": (fwd_b, both_b)}, CPU,
                            warmup=1, repeats=3)
    for fwd, both in result.values():
        assert fwd < 15 < both < 90 and fwd <= both
    assert len(fwd_b.calls) == len(both_b.calls) == 1 + 3  # 预热 1 次 + 计时 3 轮，合理就不补测
    assert len(fwd_a.calls) == 1 + 3 + 2  # a 补测了两轮：第 5 次仍慢，第 6 次才快


@pytest.mark.parametrize("argv", [
    ["--seed", "-1"], ["--seed", "99999999999"], ["--seed", "nan"], ["--seed", "inf"],
    ["--seed", "1e9"], ["--device", "tpu"], ["--quick", "--bench-size"], ["--no-such-flag"],
])
def test_bad_arguments_exit_2_with_one_chinese_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mod.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("错误：") and err.count("\n") == 1 and "Traceback" not in err


def test_benchmark_that_would_not_fit_in_memory_is_refused_before_any_work(monkeypatch, capsys):
    size = mod.BENCH_SIZES["bench"]
    # 估计值至少是一份 (b, h, T, T) 的 fp32 分数矩阵：那是朴素写法一定要分配的
    assert mod.bench_memory_bytes(size) >= 4 * size["batch"] * size["num_heads"] * 1024 ** 2
    monkeypatch.setattr(mod, "free_memory_bytes", lambda device: 2**30)  # 假装只剩 1 GB
    with pytest.raises(SystemExit) as exit_info:
        mod.main(["--bench-size", "--device", "cpu"])
    assert exit_info.value.code == 2
    out = capsys.readouterr()
    assert "内存" in out.err and out.out == ""  # 什么演示都还没开始


def test_quick_run_standalone_exits_zero_and_prints_a_sane_table(tmp_path):
    result = run_standalone("02_attention.py", ["--quick", "--device", "cpu"], tmp_path)
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("6. 基准测试")[1]
    for name in mod.MHA_VARIANTS:
        assert f"\n  {name} " in table
        row = table.split(f"\n  {name} ")[1].split("\n")[0].split()
        fwd, both = float(row[0]), float(row[2])
        assert 0 < fwd <= both, f"{name}：前向 {fwd} ms 不应慢于前向+反向 {both} ms"
    assert "本次最快" in table and "注意" not in table
