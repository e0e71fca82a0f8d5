"""07_lora.py：B=0 时与底座逐位相同、α/r 缩放（手算）、只有 LoRA 参数有梯度、参数个数（公式 = 实数）、
合并前后一致、奇异值能量（手算）、LoRA 文件的保存与载入（和 05 载入合并后的完整分类器对照）、快跑、坏输入。"""
import math
import sys

import pytest
import torch
import torch.nn as nn

from conftest import load_script, run_standalone

SCRIPT = "07_lora.py"


@pytest.fixture(scope="module")
def mod():
    return load_script(SCRIPT)


# 这个文件的每个测试都只用 1 个线程（见 conftest.py 的 one_thread）
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt(mod, seed=0, **dims):
    torch.manual_seed(seed)
    cfg = dict(mod.model_config("tiny"), vocab_size=97, **dims)
    return mod.GPTModel(cfg).eval()


def randomize_lora(model, seed=1):
    """B 初始是 0：测合并和缩放时先给 A、B 都填上随机数，否则旁路什么都不做。"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def run_in_process(mod, args, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(mod, "PRETRAINED", tmp_path / "no-pretrain" / "ckpt.pt")
    monkeypatch.chdir(tmp_path)
    try:
        mod.main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("targets", ["attention", "attention+mlp", "all"])
def test_with_b_zero_the_wrapped_model_equals_the_base_exactly(mod, targets):
    base = tiny_gpt(mod)
    x = torch.randint(0, 97, (3, 11))
    expected = base(x)
    wrapped = mod.replace_linear_with_lora(base, rank=4, alpha=8, targets=targets)
    assert any(isinstance(m, mod.LinearWithLoRA) for m in wrapped.modules())
    assert torch.equal(wrapped(x), expected)


def test_lora_layer_follows_the_formula_by_hand(mod):
    linear = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.5, -1.0]]))
    layer = mod.LinearWithLoRA(linear, rank=1, alpha=4)
    with torch.no_grad():
        layer.lora.A.copy_(torch.tensor([[1.0, 2.0]]))
        layer.lora.B.copy_(torch.tensor([[3.0]]))
    # x = (1, 1)：W·x = 0.5 − 1 = −0.5；B·A·x = 3·(1 + 2) = 9；乘 α/r = 4/1 → 36；合计 35.5
    assert layer(torch.tensor([[1.0, 1.0]])).item() == pytest.approx(35.5)
    # α 加倍、r 不变：旁路加倍；r 加倍（A、B 补零列/行，B·A 不变）：旁路减半
    doubled = mod.LoRALayer(2, 1, rank=1, alpha=8)
    with torch.no_grad():
        doubled.A.copy_(layer.lora.A)
        doubled.B.copy_(layer.lora.B)
    x = torch.tensor([[1.0, 1.0]])
    assert doubled(x).item() == pytest.approx(2 * layer.lora(x).item())
    wide = mod.LoRALayer(2, 1, rank=2, alpha=4)
    with torch.no_grad():
        wide.A.copy_(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
        wide.B.copy_(torch.tensor([[3.0, 0.0]]))
    assert wide(x).item() == pytest.approx(layer.lora(x).item() / 2)


def test_lora_init_is_kaiming_uniform_for_a_and_zero_for_b(mod):
    torch.manual_seed(0)
    layer = mod.LoRALayer(256, 64, rank=16, alpha=32)
    assert torch.count_nonzero(layer.B) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform_(a=√5) = nn.Linear 的默认：U(−1/√d_in, 1/√d_in)
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.9 * bound
    assert layer.A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert layer.scale == 2.0


def test_only_lora_parameters_receive_gradients(mod):
    model = mod.replace_linear_with_lora(tiny_gpt(mod), rank=2, alpha=4, targets="attention+mlp")
    randomize_lora(model)
    model(torch.randint(0, 97, (2, 9))).sum().backward()
    for name, param in model.named_parameters():
        if ".lora." in name:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


@pytest.mark.parametrize("targets", ["attention", "attention+mlp", "all"])
def test_parameter_count_formula_matches_the_modules(mod, targets):
    model = tiny_gpt(mod)
    total, lora = mod.lora_param_count(model.cfg, 8, targets)
    assert total == sum(p.numel() for p in model.parameters())
    mod.replace_linear_with_lora(model, rank=8, alpha=16, targets=targets)
    assert lora == sum(p.numel() for n, p in model.named_parameters() if ".lora." in n)


def test_parameter_count_by_hand(mod):
    # 宽 64、2 层、r=8：注意力 4 个 64×64 → 4·8·(64+64) = 4096；MLP 64→256→64 → 2·8·(64+256) = 5120
    cfg = dict(mod.model_config("tiny"), vocab_size=97)
    assert mod.lora_param_count(cfg, 8, "attention")[1] == 2 * 4096
    assert mod.lora_param_count(cfg, 8, "attention+mlp")[1] == 2 * (4096 + 5120)
    # all 再加词嵌入（97 → 64）和输出头（64 → 97），各 8·(97+64)
    assert mod.lora_param_count(cfg, 8, "all")[1] == 2 * (4096 + 5120) + 2 * 8 * (64 + 97)


def test_merge_gives_plain_linears_and_the_same_logits(mod):
    model = mod.replace_linear_with_lora(tiny_gpt(mod), rank=4, alpha=8, targets="all")
    randomize_lora(model)
    x = torch.randint(0, 97, (4, 13))  # 训练和其他测试都没见过的输入
    with torch.no_grad():
        before = model(x)
        merged = mod.merge_lora(model)
        after = merged(x)
    assert not any(isinstance(m, (mod.LinearWithLoRA, mod.LoRALayer)) for m in merged.modules())
    assert (after - before).abs().max().item() <= 1e-5
    assert (before - tiny_gpt(mod)(x)).abs().max().item() > 1e-2  # 旁路确实改了输出


def test_energy_in_top_by_hand(mod):
    # 奇异值 4、3：前 1 个占 16/25
    assert mod.energy_in_top(torch.diag(torch.tensor([3.0, 4.0])), [1, 2]) == pytest.approx([0.64, 1.0])
    rank_one = torch.outer(torch.arange(1.0, 6.0), torch.tensor([1.0, -2.0, 0.5]))
    assert mod.energy_in_top(rank_one, [1])[0] == pytest.approx(1.0)


def test_replace_refuses_a_bad_rank(mod):
    for rank in (0, -3, 2.5):
        with pytest.raises(mod.UserError):
            mod.replace_linear_with_lora(tiny_gpt(mod), rank=rank, alpha=1)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """一次 --quick 的完整运行（在只含脚本和 data/ 的目录里），后面几个测试共用它的输出和文件。"""
    work = tmp_path_factory.mktemp("lora")
    result = run_standalone(SCRIPT, ["--quick", "--out-dir", "out"], work, timeout=240)
    return work, result


def test_quick_run_learns_and_saves_a_small_adapter(quick_run):
    work, result = quick_run
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    acc = lambda key: float(next(line for line in lines if key in line).split("%")[0]) / 100
    assert acc("LoRA 微调后") > acc("总猜多数类") + 0.1
    # 第 1 节的表：微调出来的 ΔW，前 4 个奇异值占的能量远多于同形状的随机矩阵
    row = lambda key: [float(v) for v in next(line for line in lines if key in line).split("%")[:5]]
    assert row("线性层的 ΔW 平均")[2] > row("同形状的随机矩阵")[2] + 20  # 百分点
    assert "合并" in result.stdout
    adapter, merged = work / "out" / "adapter.pt", work / "out" / "merged.pt"
    assert adapter.stat().st_size * 4 < merged.stat().st_size


def test_adapter_round_trip_matches_the_merged_classifier_of_05(mod, quick_run):
    work, _ = quick_run
    model, tokenizer, labels = mod.load_classifier(work / "out" / "adapter.pt")
    assert any(isinstance(m, mod.LinearWithLoRA) for m in model.modules())
    full, tokenizer05, labels05 = load_script("05_finetune_cls.py").load_classifier(work / "out" / "merged.pt")
    texts = ["明早九点在三楼开会，记得带电脑", "恭喜您获得iPhone大奖，点击领取", "妈，我晚上回家吃饭"]
    x = [tokenizer.encode_ordinary(t) for t in texts]
    assert x == [tokenizer05.encode_ordinary(t) for t in texts] and labels == labels05
    with torch.no_grad():
        for ids in x:
            a = model(torch.tensor([ids]), torch.tensor([len(ids)]))
            b = full(torch.tensor([ids]), torch.tensor([len(ids)]))
            assert (a - b).abs().max().item() <= 1e-5
    assert [c[0] for c in mod.classify(model, tokenizer, texts)] == \
        [c[0] for c in mod.classify(full, tokenizer05, texts)]


def test_predict_uses_the_saved_adapter(quick_run):
    work, _ = quick_run
    result = run_standalone(SCRIPT, ["--out-dir", "out", "--predict", "恭喜中奖，点击链接领取"], work)
    assert result.returncode == 0, result.stderr
    assert "垃圾短信" in result.stdout or "正常短信" in result.stdout


def test_adapter_for_a_different_base_is_refused(mod, quick_run, tmp_path):
    work, _ = quick_run
    ckpt = torch.load(work / "out" / "adapter.pt", weights_only=True)
    ckpt["base"]["seed"] += 1  # 随机底座换了种子：权重就不是训练时那一组了
    torch.save(ckpt, tmp_path / "adapter.pt")
    with pytest.raises(mod.UserError, match="另一个底座"):
        mod.load_classifier(tmp_path / "adapter.pt")


@pytest.mark.parametrize("args", [
    ["--rank", "0"], ["--rank", "-4"], ["--rank", "100000"], ["--alpha", "nan"], ["--alpha", "-1"],
    ["--alpha", "inf"], ["--epochs", "0"], ["--lr", "nan"], ["--full-lr", "-1"], ["--batch-size", "0"],
    ["--demo-steps", "0"], ["--limit", "-5"], ["--max-length", "100000"], ["--drop-rate", "2"],
    ["--data", "no/such/dir"], ["--predict", "你好"], ["--init", "no-such.pt"],
    ["--rank", *map(str, range(1, 70))],
])
def test_bad_input_exits_2_with_one_chinese_line(mod, args, monkeypatch, tmp_path, capsys):
    code, _, err = run_in_process(mod, ["--quick", *args, "--out-dir", str(tmp_path / "out")],
                                  monkeypatch, tmp_path, capsys)
    assert code == 2, err
    assert err.startswith("错误：") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_help_is_chinese(mod, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["07_lora.py"])
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    out = capsys.readouterr().out
    assert "LoRA 的秩" in out and "--compare" in out
