"""03_gpt.py 的测试：参数量、生成（含重复惩罚）、safetensors 读取、下载、GPT-2 权重加载
（以 transformers 为参照），以及坏参数、坏文件都以一行中文、状态码 2 结束。"""
import http.server
import json
import random
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load_script, run_standalone, skip_or_fail

gpt = load_script("03_gpt.py")

SMALL_CFG = {"vocab_size": 97, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
             "drop_rate": 0.0, "qkv_bias": True}
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
               torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
               torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def import_transformers():
    try:
        import transformers
    except ImportError:
        skip_or_fail("需要 transformers 作为参照实现：pip install -r requirements-dev.txt")
    return transformers


def import_safetensors_torch():
    try:
        import safetensors.torch
    except ImportError:
        skip_or_fail("需要 safetensors 作为参照实现：pip install -r requirements-dev.txt")
    return safetensors.torch


# ---------- 自己写 safetensors / HF 目录的小工具（只在测试里用） ----------

def write_safetensors(path, tensors, edit_header=None):
    """按格式规范写文件：8 字节小端头长度 + JSON 头（补空格到 8 的倍数）+ 紧挨着的数据。"""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if edit_header:
        edit_header(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def ours_to_hf(model):
    """把我们的 GPTModel 换成官方 GPT-2 的键名与存法（Conv1D 转置、QKV 拼接），与被测代码方向相反。"""
    sd = model.state_dict()
    hf = {"wte.weight": sd["tok_emb.weight"], "wpe.weight": sd["pos_emb.weight"],
          "ln_f.weight": sd["final_norm.scale"], "ln_f.bias": sd["final_norm.shift"]}
    for i in range(model.cfg["n_layers"]):
        p, q = f"h.{i}.", f"trf_blocks.{i}."
        qkv = [f"{q}att.{n}" for n in ("W_query", "W_key", "W_value")]
        hf[p + "attn.c_attn.weight"] = torch.cat([sd[n + ".weight"].T for n in qkv], dim=1)
        hf[p + "attn.c_attn.bias"] = torch.cat([sd[n + ".bias"] for n in qkv])
        for hf_name, ours in (("attn.c_proj", "att.out_proj"), ("mlp.c_fc", "ff.layers.0"),
                              ("mlp.c_proj", "ff.layers.2")):
            hf[f"{p}{hf_name}.weight"] = sd[f"{q}{ours}.weight"].T
            hf[f"{p}{hf_name}.bias"] = sd[f"{q}{ours}.bias"]
        for hf_name, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
            hf[f"{p}{hf_name}.weight"] = sd[f"{q}{ours}.scale"]
            hf[f"{p}{hf_name}.bias"] = sd[f"{q}{ours}.shift"]
    return {k: v.contiguous() for k, v in hf.items()}


def write_config(folder, cfg):
    conf = {"model_type": "gpt2", "vocab_size": cfg["vocab_size"],
            "n_positions": cfg["context_length"], "n_embd": cfg["emb_dim"],
            "n_head": cfg["n_heads"], "n_layer": cfg["n_layers"], "activation_function": "gelu_new"}
    (Path(folder) / "config.json").write_text(json.dumps(conf))


def random_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = gpt.GPTModel(cfg).eval()
    with torch.no_grad():  # 扰动 LayerNorm 的 1/0 和偏置的 0：否则名字对错了也看不出来
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


# ---------- 参数量与形状 ----------

def test_gpt2_small_param_counts_without_qkv_bias():
    model = gpt.build_on_meta(dict(gpt.GPT_CONFIGS["gpt2-small"], qkv_bias=False))
    assert gpt.count_params(model) == (163_009_536, 124_412_160)


@pytest.mark.parametrize("name", ["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_gpt2_param_counts_match_transformers(name):
    transformers = import_transformers()
    cfg = gpt.GPT_CONFIGS[name]
    with torch.device("meta"):
        ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=cfg["emb_dim"], n_layer=cfg["n_layers"], n_head=cfg["n_heads"]))
    untied, tied = gpt.count_params(gpt.build_on_meta(cfg))
    assert tied == ref.num_parameters()  # HF 的 GPT-2 共享输出头
    assert untied - tied == cfg["vocab_size"] * cfg["emb_dim"]


def test_output_shapes():
    model = gpt.GPTModel(SMALL_CFG).eval()
    ids = torch.randint(0, SMALL_CFG["vocab_size"], (3, 7))
    assert logits(model, ids).shape == (3, 7, SMALL_CFG["vocab_size"])


# ---------- 生成 ----------

def test_greedy_generation_is_deterministic_and_picks_argmax():
    model = random_model(SMALL_CFG)
    start = torch.tensor([[1, 2, 3]])
    out = gpt.generate(model, start, 8, SMALL_CFG["context_length"])
    assert torch.equal(out, gpt.generate(model, start, 8, SMALL_CFG["context_length"]))
    expected = start
    for _ in range(8):  # 参照：手写的逐步 argmax
        next_id = logits(model, expected)[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, next_id], dim=1)
    assert torch.equal(out, expected)


def sample_frequencies(**kwargs):
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    model = gpt.FixedLogitsModel(probs.log())
    torch.manual_seed(0)
    out = gpt.generate(model, torch.zeros(20000, 1, dtype=torch.long), 1, 1, **kwargs)[:, -1]
    return torch.bincount(out, minlength=5) / 20000


@pytest.mark.parametrize("kwargs, allowed", [
    ({"top_k": 2}, [0.5, 0.2]),                  # 只留前 2 个
    ({"top_p": 0.45}, [0.5]),                    # 第一个词就已超过 0.45
    ({"top_p": 0.6}, [0.5, 0.2]),                # 0.5 < 0.6，还要第二个
    ({"top_p": 0.75}, [0.5, 0.2, 0.15]),         # 0.5+0.2=0.7 < 0.75，还要第三个
    ({"top_k": 4, "top_p": 0.6}, [0.5, 0.2]),    # 两个都用：取更严的那个
])
def test_top_k_and_top_p_restrict_the_sampled_set(kwargs, allowed):
    freq = sample_frequencies(temperature=1.0, **kwargs)
    expected = torch.zeros(5)
    expected[:len(allowed)] = torch.tensor(allowed) / sum(allowed)  # 剩下的词按原概率重新归一
    assert torch.all(freq[len(allowed):] == 0)
    assert torch.allclose(freq, expected, atol=0.015)


def test_temperature_one_samples_the_model_distribution():
    freq = sample_frequencies(temperature=1.0)
    assert torch.allclose(freq, torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]), atol=0.015)


class NextIdModel(torch.nn.Module):
    """下一个词永远是"最后一个词 + 1"；同时检查输入没有超过上下文长度。"""

    def __init__(self, vocab, max_len):
        super().__init__()
        self.vocab, self.max_len = vocab, max_len

    def forward(self, idx):
        assert idx.shape[1] <= self.max_len
        return torch.nn.functional.one_hot((idx + 1) % self.vocab, self.vocab).float() * 10


def test_generate_stops_at_eos():
    out = gpt.generate(NextIdModel(10, 4), torch.tensor([[0]]), 10, 4, eos_id=3)
    assert out.tolist() == [[0, 1, 2]]


def test_generate_crops_the_context():
    out = gpt.generate(NextIdModel(20, 4), torch.tensor([[0, 1, 2, 3, 4, 5]]), 5, 4)
    assert out.tolist() == [list(range(11))]


def test_penalize_repeats_matches_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 2.0, -2.0, 0.0]])
    before = logits.clone()
    idx = torch.tensor([[0, 1, 1], [2, 2, 3]])
    out = gpt.penalize_repeats(logits, idx, 2.0)
    # 第 1 行：0 号 2.0 → 1.0（正分数除以 2）；1 号 -1.0 → -2.0（负分数乘以 2；出现两次也只罚一次）
    # 第 2 行：2 号 -2.0 → -4.0；3 号 0.0 仍是 0.0；没出现过的词不变
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0], [1.0, 2.0, -4.0, 0.0]]
    assert torch.equal(logits, before)  # 不改调用方的张量


def test_repetition_penalty_breaks_a_greedy_loop():
    # logits 固定：不惩罚时贪心每步都选 0 号，原地打转
    model = gpt.FixedLogitsModel(torch.linspace(3.0, 2.3, 8))
    start = torch.tensor([[7]])
    assert gpt.generate(model, start, 6, 7)[0, 1:].tolist() == [0] * 6
    out = gpt.generate(model, start, 6, 7, repetition_penalty=1.5)[0, 1:].tolist()
    assert len(set(out)) == 6 and 7 not in out  # 6 个新词各不相同，也不重复开头的词
    # 参照：手写的逐步贪心，每步把出现过的词的分数除以 1.5（这些分数都是正的）
    expected, logits = [7], torch.linspace(3.0, 2.3, 8)
    for _ in range(6):
        scores = [v / 1.5 if i in expected else v for i, v in enumerate(logits.tolist())]
        expected.append(max(range(8), key=scores.__getitem__))
    assert out == expected[1:]


# ---------- safetensors 读取 ----------

def example_tensors():
    torch.manual_seed(0)
    return {"f32": torch.randn(3, 4), "bf16": torch.randn(5).to(torch.bfloat16),
            "f16": torch.randn(2, 2).half(), "i64": torch.arange(6).reshape(2, 3),
            "u8": torch.tensor([0, 7, 255], dtype=torch.uint8),
            "flag": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 3)}


def assert_same_tensors(got, expected):
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_reader_returns_the_tensors_written(tmp_path):
    tensors = example_tensors()
    path = tmp_path / "ok.safetensors"
    write_safetensors(path, tensors)
    assert_same_tensors(gpt.read_safetensors(path), tensors)


def test_reader_agrees_with_safetensors_package(tmp_path):
    st = import_safetensors_torch()
    load_file, save_file = st.load_file, st.save_file
    tensors = {k: v for k, v in example_tensors().items() if k != "empty"}
    ours_path, theirs_path = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(ours_path, tensors)
    save_file(tensors, theirs_path, metadata={"format": "pt"})  # 带 __metadata__
    assert_same_tensors(gpt.read_safetensors(theirs_path), load_file(theirs_path))
    assert_same_tensors(gpt.read_safetensors(ours_path), load_file(ours_path))


def test_reader_is_a_copy_on_write_memory_map(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"w": torch.ones(1000)})
    before = path.read_bytes()
    tensor = gpt.read_safetensors(path)["w"]
    tensor.mul_(3)  # 可写，但只改内存里的私有副本
    assert torch.all(tensor == 3) and path.read_bytes() == before


def set_key(name, key, value):
    def edit(header):
        header[name][key] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (set_key("a", "dtype", "F99"), "数据类型"),
    (set_key("a", "data_offsets", [0, 10**6]), "超出"),
    (set_key("b", "data_offsets", [8, 24]), "重叠"),
    (set_key("a", "shape", [5]), "对不上"),
    (set_key("a", "shape", "4"), "格式不对"),
])
def test_reader_rejects_malformed_headers(tmp_path, edit, message):
    path = tmp_path / "bad.safetensors"
    write_safetensors(path, {"a": torch.ones(4), "b": torch.ones(4)}, edit)
    with pytest.raises(gpt.UserError, match=message) as err:
        gpt.read_safetensors(path)
    assert "bad.safetensors" in str(err.value)


@pytest.mark.parametrize("raw", [
    b"\x01\x02",                                    # 不足 8 字节
    struct.pack("<Q", 0),                           # 头长度 0
    struct.pack("<Q", 10**12) + b"{}",              # 头长度远超文件大小
    struct.pack("<Q", 5) + b"{oops",                # 头不是 JSON
    struct.pack("<Q", 2) + b"[]",                   # 头不是对象
])
def test_reader_rejects_bad_header_length_or_json(tmp_path, raw):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(raw)
    with pytest.raises(gpt.UserError, match="broken.safetensors"):
        gpt.read_safetensors(path)


# ---------- 加载 GPT-2 权重 ----------

def test_round_trip_through_hf_layout_gives_identical_logits(tmp_path):
    model = random_model(SMALL_CFG)  # 输出头未共享：文件里带 lm_head.weight
    hf = {f"transformer.{k}": v for k, v in ours_to_hf(model).items()}
    hf["lm_head.weight"] = model.out_head.weight.detach().clone()
    names = sorted(hf)
    shards = {"model-1.safetensors": names[::2], "model-2.safetensors": names[1::2]}
    for filename, keys in shards.items():  # 分片存放，附 index.json
        write_safetensors(tmp_path / filename, {k: hf[k] for k in keys})
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    write_config(tmp_path, SMALL_CFG)
    loaded, cfg = gpt.load_gpt2_hf(str(tmp_path))
    assert not loaded.training and cfg["emb_dim"] == SMALL_CFG["emb_dim"]
    ids = torch.randint(0, SMALL_CFG["vocab_size"], (2, SMALL_CFG["context_length"]))
    assert torch.allclose(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-6)


def random_hf_model(transformers, seed):
    """随机选一个小 GPT-2 配置（种子决定），参数也全部扰动，避免"恰好对称"的巧合。"""
    rng = random.Random(seed)
    n_head = rng.choice([1, 2, 3, 4])
    config = transformers.GPT2Config(
        vocab_size=rng.randint(40, 300), n_positions=rng.choice([8, 24, 40]),
        n_embd=n_head * rng.choice([4, 8, 16]), n_layer=rng.randint(1, 3), n_head=n_head,
        layer_norm_epsilon=rng.choice([1e-5, 1e-6]), tie_word_embeddings=seed % 2 == 0,
        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    ref = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in ref.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return ref


def assert_matches_reference(ref, folder):
    ours, cfg = gpt.load_gpt2_hf(str(folder))
    ids = torch.randint(0, cfg["vocab_size"], (2, cfg["context_length"]))
    with torch.no_grad():
        expected = ref(ids).logits
    assert (logits(ours, ids) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logits_match_transformers_save_pretrained(tmp_path, seed):
    transformers = import_transformers()
    ref = random_hf_model(transformers, seed)
    ref.save_pretrained(tmp_path)
    assert_matches_reference(ref, tmp_path)


def test_logits_match_transformers_official_file_layout(tmp_path):
    transformers = import_transformers()
    save_file = import_safetensors_torch().save_file
    ref = random_hf_model(transformers, 4)  # 共享输出头
    # 官方文件：键不带 transformer. 前缀，带 h.N.attn.bias 掩码，没有 lm_head.weight
    state = {k.removeprefix("transformer."): v.clone() for k, v in ref.state_dict().items()
             if k != "lm_head.weight"}
    length = ref.config.n_positions
    for i in range(ref.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(length, length)).view(1, 1, length, -1)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, tmp_path / "model.safetensors")
    ref.config.to_json_file(tmp_path / "config.json")
    assert_matches_reference(ref, tmp_path)


def test_loaded_model_ties_head_and_has_no_meta_tensors(tmp_path):
    model = random_model(SMALL_CFG)
    write_safetensors(tmp_path / "model.safetensors", ours_to_hf(model))
    write_config(tmp_path, SMALL_CFG)
    loaded, _ = gpt.load_gpt2_hf(tmp_path)
    assert loaded.out_head.weight is loaded.tok_emb.weight
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert torch.equal(loaded.trf_blocks[0].att.mask, model.trf_blocks[0].att.mask)


def test_loading_errors_are_user_errors(tmp_path):
    with pytest.raises(gpt.UserError, match="未知模型"):
        gpt.load_gpt2_hf("gpt-9000")
    write_config(tmp_path, SMALL_CFG)
    with pytest.raises(gpt.UserError, match="没有"):
        gpt.load_gpt2_hf(tmp_path)
    model = random_model(dict(SMALL_CFG, emb_dim=16))  # 宽度与 config.json 不符
    write_safetensors(tmp_path / "model.safetensors", ours_to_hf(model))
    with pytest.raises(gpt.UserError, match="对不上") as err:
        gpt.load_gpt2_hf(tmp_path)
    # 一句中文指出哪个张量、什么形状，而不是 load_state_dict 那几行英文
    assert "tok_emb.weight" in str(err.value) and "(97, 16)" in str(err.value)
    assert "\n" not in str(err.value) and "Error" not in str(err.value)


@pytest.mark.parametrize("arg", ["/no/such/nfl-dir", "./no-such-nfl-dir", "no-such-nfl-dir/",
                                 "~/no-such-nfl-dir"])
def test_init_with_a_missing_folder_says_the_folder_does_not_exist(arg):
    with pytest.raises(gpt.UserError, match="不存在") as err:
        gpt.resolve_gpt2_dir(arg)
    assert "未知模型" not in str(err.value)


def test_init_with_a_file_says_it_is_not_a_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(gpt.UserError, match="不是目录"):
        gpt.resolve_gpt2_dir(str(tmp_path / "model.safetensors"))


def write_index(folder, index):
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("case, message", [
    ("garbage_weights", "safetensors"),
    ("broken_config", "第 1 行"),
    ("config_not_utf8", "UTF-8"),
    ("zero_heads", "尺寸"),
    ("heads_do_not_divide", "尺寸"),
    ("bad_eps", "layer_norm_epsilon"),
    ("index_is_a_list", "weight_map"),
    ("index_points_to_numbers", "weight_map"),
    ("header_not_utf8", "UTF-8"),
])
def test_bad_folder_contents_give_one_short_chinese_line(tmp_path, case, message):
    model = random_model(SMALL_CFG)
    write_safetensors(tmp_path / "model.safetensors", ours_to_hf(model))
    write_config(tmp_path, SMALL_CFG)
    conf = json.loads((tmp_path / "config.json").read_text())
    if case == "garbage_weights":
        (tmp_path / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    elif case == "broken_config":
        (tmp_path / "config.json").write_text('{"n_embd": 32,,}')
    elif case == "config_not_utf8":
        (tmp_path / "config.json").write_bytes(b'{"n_embd": "\xff"}')
    elif case in ("zero_heads", "heads_do_not_divide", "bad_eps"):
        key, value = {"zero_heads": ("n_head", 0), "heads_do_not_divide": ("n_head", 5),
                      "bad_eps": ("layer_norm_epsilon", "tiny")}[case]
        (tmp_path / "config.json").write_text(json.dumps(dict(conf, **{key: value})))
    elif case == "index_is_a_list":
        write_index(tmp_path, [])
    elif case == "index_points_to_numbers":
        write_index(tmp_path, {"weight_map": {"wte.weight": 3}})
    elif case == "header_not_utf8":
        (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    with pytest.raises(gpt.UserError, match=message) as err:
        gpt.load_gpt2_hf(tmp_path)
    text = str(err.value)
    # 一行、不夹带库的英文报错（json 的 "Expecting ..."、解码器的 "codec can't decode ..."）
    assert "\n" not in text and "Expecting" not in text and "codec" not in text


MEMORY_PROBE = """
import importlib.util, sys, torch
def peak_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
spec = importlib.util.spec_from_file_location("gpt03", sys.argv[1])
gpt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpt)
tiny = dict(gpt.GPT_CONFIGS["tiny"], vocab_size=64, n_layers=1)
gpt.build_on_meta(tiny)  # 第一次用 meta 设备时 torch 会导入一批 Python 模块（与模型大小无关）
with torch.no_grad():
    gpt.GPTModel(tiny).eval()(torch.zeros(1, 16, dtype=torch.long))  # 内核、线程池的一次性开销
before = peak_bytes()
model, cfg = gpt.load_gpt2_hf(sys.argv[2])
with torch.no_grad():
    model(torch.zeros(1, 16, dtype=torch.long))  # 前向一次：每个权重都真的被读进内存
print(peak_bytes() - before)
"""


def test_loading_raises_peak_memory_by_at_most_1_3x_the_file(tmp_path):
    # 用 /proc 里的 VmHWM（本进程的峰值常驻内存）：ru_maxrss 在 fork+exec 之后
    # 会带着父进程（pytest）的峰值，量不出子进程自己的增长
    if not Path("/proc/self/status").is_file():
        pytest.skip("需要 Linux 的 /proc 来读峰值内存")
    cfg = {"vocab_size": 8192, "context_length": 256, "emb_dim": 512, "n_heads": 8,
           "n_layers": 8, "drop_rate": 0.0, "qkv_bias": True}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ours_to_hf(gpt.GPTModel(cfg)).items()}
    torch.manual_seed(0)
    write_safetensors(tmp_path / "model.safetensors",
                      {k: torch.randn(s) * 0.02 for k, s in shapes.items()})
    write_config(tmp_path, cfg)
    size = (tmp_path / "model.safetensors").stat().st_size
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(ROOT / "03_gpt.py"),
                            str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    growth = int(probe.stdout.split()[-1])
    print(f"文件 {size / 2**20:.0f} MB，峰值内存增加 {growth / 2**20:.0f} MB = {growth / size:.2f}×")
    assert growth <= 1.3 * size


# ---------- 下载 ----------

@pytest.fixture
def file_server():
    """127.0.0.1 上的小 HTTP 服务器：支持 Range，记录收到的请求，可模拟中途断线。"""
    state = {"payload": bytes(range(256)) * 4000, "requests": [], "cut_after": None,
             "ignore_range": False}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["requests"].append({"path": self.path, **dict(self.headers)})
            payload, start = state["payload"], 0
            if self.headers.get("Range") and not state["ignore_range"]:
                start = int(self.headers["Range"].split("=")[1].rstrip("-"))
            size = len(payload)
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.send_header("Content-Length", str(size - start))
            self.end_headers()
            self.wfile.write(payload[start:state["cut_after"]])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def test_download_uses_endpoint_and_token_and_shows_progress(file_server, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setenv("HF_ENDPOINT", file_server["url"] + "/")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    path = gpt.download_hf_file("openai-community/gpt2", "model.safetensors", tmp_path / "m")
    assert path.read_bytes() == file_server["payload"]
    request = file_server["requests"][-1]
    assert request["path"] == "/openai-community/gpt2/resolve/main/model.safetensors"
    assert request["Authorization"] == "Bearer hf_secret"
    assert "100%" in capsys.readouterr().out
    assert list((tmp_path / "m").iterdir()) == [path]  # 没有留下 .part


def test_download_resumes_from_a_partial_file(file_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", file_server["url"])
    monkeypatch.delenv("HF_TOKEN", raising=False)
    (tmp_path / "config.json.part").write_bytes(file_server["payload"][:1000])
    path = gpt.download_hf_file("org/repo", "config.json", tmp_path)
    assert file_server["requests"][-1]["Range"] == "bytes=1000-"
    assert "Authorization" not in file_server["requests"][-1]
    assert path.read_bytes() == file_server["payload"]


def test_download_restarts_when_server_ignores_range(file_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", file_server["url"])
    file_server["ignore_range"] = True  # 回 200 和整个文件：旧的 .part 必须被覆盖而不是追加
    (tmp_path / "config.json.part").write_bytes(b"x" * 1000)
    path = gpt.download_hf_file("org/repo", "config.json", tmp_path)
    assert path.read_bytes() == file_server["payload"]


def test_interrupted_download_leaves_no_final_file_and_can_resume(file_server, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", file_server["url"])
    file_server["cut_after"] = 5000  # 服务器声明完整长度，但只发 5000 字节就断开
    with pytest.raises(gpt.UserError, match="续传"):
        gpt.download_hf_file("org/repo", "model.safetensors", tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "model.safetensors.part").stat().st_size == 5000
    file_server["cut_after"] = None
    path = gpt.download_hf_file("org/repo", "model.safetensors", tmp_path)
    assert path.read_bytes() == file_server["payload"]


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_download_without_network_explains_hf_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(gpt.UserError, match="HF_ENDPOINT") as err:
        gpt.download_hf_file("org/repo", "model.safetensors", tmp_path)
    assert "--init" in str(err.value)
    assert not any(tmp_path.iterdir())


# ---------- 命令行 ----------

def test_quick_run_standalone(tmp_path):
    result = run_standalone("03_gpt.py", ["--quick", "--repetition-penalty", "1.3"], tmp_path)
    assert result.returncode == 0, result.stderr
    for text in ("163,009,536", "124,412,160", "124,439,808", "GFLOP/s", "词元/秒",
                 "本机此刻", "重复惩罚 1.5 [0, 1, 2, 3, 4, 5]", "[贪心，重复惩罚 1.3]"):
        assert text in result.stdout


def test_init_gpt2_offline_exits_2_with_chinese_message(tmp_path):
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    result = run_standalone("03_gpt.py", ["--init", "gpt2", "--prompt", "Every effort moves you"],
                            tmp_path, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("错误：") and "HF_ENDPOINT" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models").exists()  # 断网时不留下任何半成品


@pytest.mark.parametrize("argv", [
    ["--max-new-tokens", "-1"], ["--max-new-tokens", "0"], ["--max-new-tokens", "99999999999"],
    ["--max-new-tokens", "nan"], ["--temperature", "-1"], ["--temperature", "nan"],
    ["--temperature", "inf"], ["--temperature", "1e9"], ["--top-k", "0"], ["--top-k", "-1"],
    ["--top-k", "99999999999"], ["--top-p", "0"], ["--top-p", "-1"], ["--top-p", "1.5"],
    ["--top-p", "nan"], ["--temperature", "1e-40"], ["--top-p", "1e-300"],  # 会在 float32 里溢出/变 0
    ["--repetition-penalty", "0"], ["--repetition-penalty", "-1"],
    ["--repetition-penalty", "nan"], ["--repetition-penalty", "inf"],
    ["--repetition-penalty", "1e9"], ["--seed", "-1"], ["--seed", "99999999999"],
    ["--seed", "1e9"], ["--model", "gpt9"], ["--init", "gpt-9000"], ["--init", "/no/such/dir"],
    ["--device", "tpu"], ["--no-such-flag"],
])
def test_bad_arguments_exit_2_with_one_chinese_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpt.main(argv)
    assert exit_info.value.code == 2
    out = capsys.readouterr()
    assert out.err.startswith("错误：") and out.err.count("\n") == 1
    assert out.out == ""  # 参数错了什么都不该开始


def test_model_that_would_not_fit_in_memory_is_refused_before_allocating(monkeypatch, capsys):
    assert gpt.free_memory_bytes(torch.device("cpu")) is None or \
        gpt.free_memory_bytes(torch.device("cpu")) > 2**20
    monkeypatch.setattr(gpt, "free_memory_bytes", lambda device: 2**30)  # 假装只剩 1 GB
    with pytest.raises(SystemExit) as exit_info:
        gpt.main(["--model", "gpt2-xl"])  # 约 6 GB 的 fp32 参数
    assert exit_info.value.code == 2
    out = capsys.readouterr()
    assert "内存" in out.err and "==" not in out.out  # 没有开始任何演示


def test_prompt_longer_than_the_context_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpt.main(["--quick", "--prompt", "从前有一台计算机。" * 100])  # tiny 的上下文只有 128
    assert exit_info.value.code == 2
    assert "上下文长度 128" in capsys.readouterr().err


def test_missing_tokenizers_say_what_is_missing_and_how_to_fix_it(tmp_path, monkeypatch):
    # 03 被单独复制到一个没有 data/、也拿不到 GPT-2 词表的地方
    def no_gpt2_vocab():
        raise gpt.UserError("找不到 GPT-2 词表")

    monkeypatch.setattr(gpt, "DATA_DIR", tmp_path / "data")
    monkeypatch.setattr(gpt, "get_gpt2_tokenizer", no_gpt2_vocab)
    with pytest.raises(gpt.UserError) as err:
        gpt.pick_tokenizer()
    text = str(err.value)
    for needed in ("tokenizer.json", "data/", "openai-whisper", "NFL_GPT2_VOCAB"):
        assert needed in text


def test_corrupted_weights_on_the_command_line_exit_2_with_one_line(tmp_path, capsys):
    write_config(tmp_path, SMALL_CFG)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    # 不是 UserError 的异常会直接冲出 main()，让这个测试失败：所以这里也证明了没有回溯
    with pytest.raises(SystemExit) as exit_info:
        gpt.main(["--init", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("错误：") and err.count("\n") == 1
