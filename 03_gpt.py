"""03_gpt.py — 从零实现 GPT 模型
本章你会学到：
  1. GPT 的积木：层归一化、GELU、前馈网络、捷径连接、Transformer 块，拼成完整的 GPTModel
  2. 模型有多大、多贵：参数量（含/不含权重共享）、内存、每个词元的 FLOPs、训练一轮要多久
  3. 文本生成：贪心、温度、top-k、top-p、重复惩罚，遇到结束符就停
  4. 加载真正的 GPT-2 权重：自己下载、自己解析 safetensors、把 HF 的参数名对应到我们的模型
运行：python 03_gpt.py            # 默认：2 核 CPU 约 22 秒（gpt2-small 尺寸，随机权重）
      python 03_gpt.py --quick    # 冒烟：约 8 秒
      python 03_gpt.py --init gpt2 --prompt "Every effort moves you"   # 需联网或镜像（HF_ENDPOINT）
"""
import argparse
import base64
import http.client
import importlib.util
import json
import math
import mmap
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

# 本章用到的 UserError、ArgParser、check_range、分词器等来自 01/02，见文末附录；
# 测速、下载与文件校验的细节在文末的进阶节。


# ===== 1. 模型配置 =====
# 所有脚本用同一组键名。GPT-2 四种尺寸的数字是公开事实：词表 50257、上下文 1024、
# Q/K/V 投影带偏置；四者只差在宽度 emb_dim、头数 n_heads 和层数 n_layers。
# 四种 GPT-2 的 head_dim = emb_dim / n_heads 都是 64：变宽时加头数，而不是加宽每个头
# drop_rate 是训练时的值；推理时 model.eval() 会让所有 Dropout 失效
GPT_CONFIGS = {
    # tiny 的参数大多在词嵌入上：50257×128 ≈ 643 万，4 个块加起来才约 79 万
    "tiny": {"vocab_size": 50257, "context_length": 128, "emb_dim": 128, "n_heads": 4,
             "n_layers": 4, "drop_rate": 0.0, "qkv_bias": True},  # CPU 上几秒就能跑的玩具尺寸
    "gpt2-small": {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12,
                   "n_layers": 12, "drop_rate": 0.1, "qkv_bias": True},  # 124M
    "gpt2-medium": {"vocab_size": 50257, "context_length": 1024, "emb_dim": 1024, "n_heads": 16,
                    "n_layers": 24, "drop_rate": 0.1, "qkv_bias": True},  # 355M
    "gpt2-large": {"vocab_size": 50257, "context_length": 1024, "emb_dim": 1280, "n_heads": 20,
                   "n_layers": 36, "drop_rate": 0.1, "qkv_bias": True},  # 774M
    "gpt2-xl": {"vocab_size": 50257, "context_length": 1024, "emb_dim": 1600, "n_heads": 25,
                "n_layers": 48, "drop_rate": 0.1, "qkv_bias": True},  # 1558M
}
# --init 接受的名字 → Hugging Face 上的仓库；下载的文件缓存在脚本旁的 models/（已被 git 忽略）
# 注意 124M 的那个在 HF 上就叫 gpt2，没有 -small 后缀
HF_REPOS = {name: f"openai-community/{name}"
            for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
MODELS_DIR = Path(__file__).resolve().parent / "models"


# ===== 2. 积木：层归一化、GELU、前馈网络（04 及以后的脚本逐字复制这些类） =====
class LayerNorm(nn.Module):
    """层归一化：把每个词向量的各维减均值、除标准差，再学一个缩放 scale 和平移 shift。"""

    def __init__(self, emb_dim, eps=1e-5):
        super().__init__()
        self.eps = eps  # 防止方差为 0 时除以 0
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        # unbiased=False：除以 n 而不是 n-1，与 GPT-2 原版（及 torch.nn.LayerNorm）一致
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class GELU(nn.Module):
    """GELU 的 tanh 近似（GPT-2 训练时用的就是它）：x·Φ(x) 的一个便宜的光滑近似。"""

    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


class FeedForward(nn.Module):
    """逐位置的两层 MLP：先升到 4 倍宽度给模型"思考空间"，再投影回 emb_dim。"""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x):
        return self.layers(x)


def mean_var(t):
    # 每一行（一个词向量）的 均值/方差；LayerNorm 正是按行、在最后一维上做归一化
    return "  ".join(f"{m:+.2f}/{v:.2f}" for m, v in
                     zip(t.mean(-1).tolist(), t.var(-1, unbiased=False).tolist()))


def demo_blocks():
    # 深层网络里各层输出的尺度会越漂越远，训练就不稳；LayerNorm 把每个词向量拉回均值 0、方差 1，
    # 再由可学习的 scale/shift 决定真正需要的尺度
    torch.manual_seed(0)
    x = torch.randn(2, 6) * 3 + 5  # 故意让输入偏离 0、尺度很大
    out = LayerNorm(6)(x)
    # 与 PyTorch 自带实现对照：差在 1e-7 量级，说明公式写对了
    diff = (out - nn.LayerNorm(6)(x)).abs().max().item()
    print(f"LayerNorm 前每行 均值/方差：{mean_var(x)}")
    print(f"LayerNorm 后每行 均值/方差：{mean_var(out)}（与 torch.nn.LayerNorm 最大差 {diff:.1e}）")
    # 在几个典型输入上并排比较三种激活，重点看负半轴
    xs = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    rows = {"x": xs, "gelu_tanh": GELU()(xs), "gelu_exact": F.gelu(xs), "relu": torch.relu(xs)}
    for name, ys in rows.items():
        print(f"  {name:<11}" + "".join(f"{v:8.4f}" for v in ys.tolist()))
    # GELU 在负半轴留了一点斜率（ReLU 一刀切成 0），所以负输入的神经元也能收到梯度
    # 近似版与精确版差得极小；但 GPT-2 的权重是按 tanh 版训练的，加载它时最好用同一个
    grid = torch.linspace(-6, 6, 2001)
    gap = (GELU()(grid) - F.gelu(grid)).abs().max().item()
    print(f"GELU 的 tanh 近似与精确（erf）版在 [-6, 6] 上最大只差 {gap:.1e}")


# ===== 3. 捷径连接：让梯度直达底层 =====
class DeepMLP(nn.Module):
    """很深但很窄的 MLP：depth 层 Linear+GELU，可选在每层外面加捷径 x + f(x)。只用来观察梯度。"""

    def __init__(self, width, depth, use_shortcut):
        super().__init__()
        self.use_shortcut = use_shortcut
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, width), GELU())
                                    for _ in range(depth))
        # 压成一个标量输出，方便随手造个损失来反向传播
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        for layer in self.layers:
            # 有捷径时，梯度能沿"+ x"这条恒等路径原样流回底层，不必一层层穿过权重被缩小
            # x: (batch, width)；每层输入输出同宽，x + layer(x) 才能逐元素相加
            x = x + layer(x) if self.use_shortcut else layer(x)
        return self.head(x)


def demo_shortcut(depth=10):
    # 反向传播时，梯度每穿过一层就要乘上这一层的雅可比矩阵；这些矩阵"缩小"一点点，
    # 十层连乘下来底层的梯度就几乎为 0（梯度消失）。捷径让 ∂(x + f(x))/∂x = I + ∂f/∂x，
    # 恒等项 I 保证梯度至少能原样传下去
    print(f"{depth} 层 MLP 每层权重梯度的平均绝对值（第 1 层 → 第 {depth} 层）：")
    for use_shortcut, label in ((False, "无捷径"), (True, "有捷径")):
        torch.manual_seed(0)  # 两个网络的初始权重和输入相同，差别只来自捷径
        model = DeepMLP(width=16, depth=depth, use_shortcut=use_shortcut)
        # 损失随便取（输出平方的均值）：这里不训练，只为拿到每层的梯度
        model(torch.randn(8, 16)).pow(2).mean().backward()
        # layer[0] 是每层的 Linear；底层/顶层的比值越接近 1，梯度在途中衰减得越少
        grads = [layer[0].weight.grad.abs().mean().item() for layer in model.layers]
        print(f"  {label}：{' '.join(f'{g:.0e}' for g in grads)}"
              f"   底层/顶层 = {grads[0] / grads[-1]:.1e}")


# ===== 4. 因果多头注意力（02_attention.py 的高效版 + SDPA）、Transformer 块与 GPT 模型 =====
class MultiHeadAttention(nn.Module):
    """因果多头注意力（02_attention.py 的高效版，另加 SDPA 快速路径）。
    use_sdpa=True 时调用 F.scaled_dot_product_attention：数学相同，但融合成一个内核，更快更省内存。"""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False,
                 use_sdpa=True):
        super().__init__()
        assert d_out % num_heads == 0, "d_out 必须能被 num_heads 整除"
        self.d_out, self.num_heads = d_out, num_heads
        self.head_dim = d_out // num_heads
        self.use_sdpa = use_sdpa
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)  # 把各头的结果再混合一次
        self.dropout = nn.Dropout(dropout)
        # 掩码是 buffer：随 .to(device) 移动；persistent=False 让它不进 state_dict
        mask = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        b, num_tokens, _ = x.shape
        # (b, num_tokens, d_out) -> (b, num_heads, num_tokens, head_dim)
        q, k, v = (w(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        if self.use_sdpa:
            p = self.dropout.p if self.training else 0.0
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)
            scores = scores.masked_fill(self.mask[:num_tokens, :num_tokens], float("-inf"))
            context = self.dropout(torch.softmax(scores, dim=-1)) @ v
        # (b, num_heads, num_tokens, head_dim) -> (b, num_tokens, d_out)
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)


class TransformerBlock(nn.Module):
    """Pre-LN Transformer 块：x + 注意力(LN(x))，再 x + 前馈(LN(x))。捷径连接让梯度直达底层。"""

    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], context_length=cfg["context_length"],
            dropout=cfg["drop_rate"], num_heads=cfg["n_heads"], qkv_bias=cfg["qkv_bias"],
            use_sdpa=cfg.get("use_sdpa", True))
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT：词嵌入 + 位置嵌入 → n_layers 个 Transformer 块 → 最终 LayerNorm → 输出头（每个词表项一个分数）。"""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        self.apply(self._init_weights)
        # 每个块有两条残差支路往 x 上累加；按 1/√(2·n_layers) 缩小它们的输出投影，
        # 否则层数越多，残差流的方差越大（GPT-2 论文的做法）
        for name, param in self.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("layers.2.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg["n_layers"]))

    @staticmethod
    def _init_weights(module):
        # GPT-2 的初始化：权重 N(0, 0.02)，偏置 0；比 PyTorch 默认初始化训练得更稳
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, in_idx):
        _, seq_len = in_idx.shape
        positions = torch.arange(seq_len, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))  # (b, seq_len, emb_dim)
        x = self.final_norm(self.trf_blocks(x))
        return self.out_head(x)


# ===== 5. 模型有多大、算一次要多少 =====
# 参数量决定要多少内存，FLOPs 决定要算多久：先在 meta 设备上数出来，再实测本机算力
def build_on_meta(cfg):
    """在 meta 设备上建模型：张量只有形状、没有数据，数 15 亿个参数也不占内存、不花时间。"""
    with torch.device("meta"):
        return GPTModel(cfg)


def count_params(model):
    """返回 (输出头单独一份时的参数量, 输出头与词嵌入共享时的参数量)。"""
    total = sum(p.numel() for p in model.parameters())  # 共享的参数对象只数一次
    # 共享与否只差输出头这一个 vocab×emb 矩阵：已共享就加回它，没共享就减去它
    head = model.out_head.weight.numel()
    if model.out_head.weight is model.tok_emb.weight:
        return total + head, total
    return total, total - head


def forward_flops_per_token(model):
    """前向传播每个词元的 FLOPs（上下文取满 T 个词元）。"""
    cfg = model.cfg
    # 矩阵乘：每个权重对每个词元做一次乘加 = 2 FLOPs（嵌入只是查表，不算）
    # 输出头 out_head 也是 Linear：gpt2-small 里它约占全部矩阵乘参数的 3 成
    linear = 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    # 注意力本身：q·Kᵀ 与 权重·V 每层各 2·T·d；因果掩码下平均只看一半位置 → 2·层数·T·d
    return linear + 2 * cfg["n_layers"] * cfg["context_length"] * cfg["emb_dim"]


def print_size_table():
    print("前向 FLOPs/词元 = 2 × 矩阵乘参数量（每个权重一次乘加）+ 2 × 层数 × 上下文 × 宽度（注意力）")
    # 汉字在终端里占两格，所以表头的宽度比数据列少算几个字符
    print(f"{'配置':<11}{'参数(不共享)':>11}{'参数(共享)':>12}{'fp32 MB':>9}{'bf16 MB':>9}"
          f"{'前向 GFLOPs/词元':>14}")
    for name, cfg in GPT_CONFIGS.items():
        # 在 meta 上建模型只为数参数、算 FLOPs：xl 的 15 亿个参数也是瞬间建好
        model = build_on_meta(cfg)
        untied, tied = count_params(model)
        # 真实的 GPT-2 共享输出头，所以内存按共享后的参数量算：fp32 每个 4 字节，bf16 每个 2 字节
        megabytes = tied * 4 / 2**20
        print(f"{name:<13}{untied:>15,}{tied:>15,}{megabytes:>9,.0f}{megabytes / 2:>9,.0f}"
              f"{forward_flops_per_token(model) / 1e9:>18.3f}")
    cfg = GPT_CONFIGS["gpt2-small"]
    untied, tied = count_params(build_on_meta(cfg))
    # 再数一个不带 Q/K/V 偏置的版本：网上流传的 GPT-2 参数量多半是这样数的
    bare_untied, bare_tied = count_params(build_on_meta(dict(cfg, qkv_bias=False)))
    print(f"gpt2-small 两种数法相差 {untied - tied:,} = 词表 {cfg['vocab_size']} × 宽度 "
          f"{cfg['emb_dim']}：正是输出头那个矩阵。")
    print(f"常见的 {bare_untied:,} / {bare_tied:,} 是去掉 Q/K/V 偏置（qkv_bias=False）时的数；"
          f"真实 GPT-2 带这些偏置，多出 {tied - bare_tied:,} 个。")


def print_epoch_estimate(device, quick):
    # 训练一个词元 ≈ 前向 1 份 + 反向 2 份（对激活、对权重各求一次梯度）= 3 × 前向
    train_flops = 3 * forward_flops_per_token(build_on_meta(GPT_CONFIGS["gpt2-small"]))
    # 40% 是经验值：真实训练还有注意力、归一化、数据搬运等达不到峰值的开销
    epoch_tokens, utilisation = 10**9, 0.4  # 假设：一轮 10 亿个词元，只用到峰值的 40%
    where = f"cpu，{torch.get_num_threads()} 线程" if device.type == "cpu" else device.type
    # 这是"这台机器、此刻"的数：别的程序在抢 CPU 时会偏低，换台机器、换个时刻都会不同
    print(f"本机此刻（{where}）的矩阵乘峰值：各测 10 次短矩阵乘、取最快（机器繁忙时偏低）：")
    peaks = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        try:
            # 有的设备或 torch 版本不支持 bf16 矩阵乘：只跳过这一行，不让整个脚本退出
            peak, n = measure_matmul_peak(device, dtype, 0.02 if quick else 0.1)
        except RuntimeError as err:
            print(f"  {label}：此设备不支持（{err}）")
            continue
        peaks[label] = peak
        # 时间 = 总算力需求（词元数 × 每词元训练 FLOPs）÷ 实际吞吐（峰值 × 利用率）
        hours = epoch_tokens * train_flops / (peak * utilisation) / 3600
        print(f"  {label}（{n}×{n}）：{peak / 1e9:,.1f} GFLOP/s → 以峰值的 {utilisation:.0%} "
              f"训练 gpt2-small 一轮 {epoch_tokens:.0e} 个词元约 {hours:,.1f} 小时"
              f"（{hours / 24:,.1f} 天）")
    if device.type == "cpu" and peaks.get("bf16", math.inf) < peaks.get("fp32", 0) / 2:
        print("  bf16 反而慢得多：多半是这颗 CPU 没有原生 bf16 指令（avx512_bf16 / AMX），只能软件模拟")


# ===== 6. 文本生成：贪心、温度、top-k、top-p =====
# 模型每步只给出下一个词的分数（logits）；怎样从分数里挑词是解码策略，与模型本身无关
def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, top_p=None,
             eos_id=None, repetition_penalty=1.0):
    """自回归生成：每步只看最后 context_size 个词，取最后一个位置的 logits 选出下一个词。
    temperature=0 为贪心；top_k 只在前 k 个候选里抽；top_p 只在累计概率达到 p 的最小集合里抽；
    repetition_penalty > 1 压低已出现过的词的分数。"""
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1, :].float()  # (b, vocab_size)
        if repetition_penalty != 1.0:
            logits = penalize_repeats(logits, idx, repetition_penalty)
        if temperature <= 0.0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if top_p is not None:
                sorted_logits, order = torch.sort(logits, descending=True)
                cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
                # 去掉"前面的累计概率已经 ≥ top_p"的词，但至少保留概率最大的那个
                drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
                sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
                logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
        if eos_id is not None and bool((next_id == eos_id).all()):
            break  # 所有序列都生成了结束符：停止
        idx = torch.cat([idx, next_id], dim=1)
    return idx


def penalize_repeats(logits, idx, penalty):
    """重复惩罚（CTRL 论文的做法）：小模型贪心解码容易陷进"““““"这样的循环——一个词一旦最可能，
    生成它之后往往还是最可能。对已出现过的词，正分数除以 penalty、负分数乘以 penalty，都让它变小。"""
    seen = torch.gather(logits, 1, idx)  # (b, 已有长度)：每个已出现词的当前分数
    logits = logits.clone()
    logits.scatter_(1, idx, torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


class FixedLogitsModel(nn.Module):
    """"假模型"：不管输入什么，每个位置都输出同一组 logits。用它单独观察各种采样策略。"""

    def __init__(self, logits):
        super().__init__()
        # 注册成 buffer：随 .to(device) 一起移动，但不是要学习的参数
        self.register_buffer("logits", logits)

    def forward(self, idx):
        # expand 不复制数据：把 (vocab_size,) 的 logits 广播成每个位置一份
        return self.logits.expand(idx.shape[0], idx.shape[1], -1)  # (b, seq_len, vocab_size)


def demo_sampling(seed, samples=4000):
    # 贪心每次都选最可能的词，文字容易原地打转；采样则按概率抽，温度、top-k、top-p 控制抽得多"大胆"
    probs = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
    # 取对数当 logits：softmax(log p) = p，所以温度 1 时的采样分布正好是 probs
    model = FixedLogitsModel(probs.log())
    start = torch.zeros(samples, 1, dtype=torch.long)  # 一批 samples 行：一次并行抽这么多个词
    # 温度 < 1 让分布更尖、> 1 更平；top-k / top-p 直接排除长尾里的低概率词
    settings = {"贪心": {}, "温度 0.5": {"temperature": 0.5}, "温度 1.0": {"temperature": 1.0},
                "温度 2.0": {"temperature": 2.0}, "top-k 3": {"temperature": 1.0, "top_k": 3},
                "top-p 0.7": {"temperature": 1.0, "top_p": 0.7}}
    print(" ".join(f"{p:6.2f}" for p in probs.tolist()) + "   ← 6 个候选词的真实概率")
    print(f"各种策略各抽 {samples} 次，每个词被抽中的频率：")
    # 固定种子：每次运行打印的频率都相同，便于对照讲解
    torch.manual_seed(seed)
    for label, kwargs in settings.items():
        # 每行只生成 1 个词，[:, -1] 取出这个新词：(samples,)
        picked = generate(model, start, 1, context_size=1, **kwargs)[:, -1]
        # bincount 数每个 id 出现几次；minlength 让一次也没抽中的词也占一列
        freq = torch.bincount(picked, minlength=len(probs)) / samples
        print(" ".join(f"{v:6.2f}" for v in freq.tolist()) + f"   ← {label}")


def demo_repetition_penalty(penalty=1.5, steps=6):
    # logits 固定的假模型上，贪心每一步选的都是同一个词：这就是真实小模型"““““"循环的极端版。
    # 惩罚把出现过的词的分数压低，下一个词就轮到没出现过的候选
    model = FixedLogitsModel(torch.linspace(3.0, 2.3, 8))  # 8 个候选，分数依次略低
    start = torch.tensor([[7]])
    runs = [generate(model, start, steps, steps + 1, repetition_penalty=p)[0, 1:].tolist()
            for p in (1.0, penalty)]
    print(f"同一个假模型上贪心生成 {steps} 个词：不惩罚 {runs[0]}；重复惩罚 {penalty} {runs[1]}")


def encode_prompt(tok, prompt, context_length):
    """提示词 → 词元 id 列表，以及结束符的 id（分词器没有结束符时为 None）。"""
    # <|endoftext|> 在训练数据里分隔文档：生成到它说明模型认为"这篇写完了"，该停了
    eos_id = (tok.encode_single_token("<|endoftext|>")
              if "<|endoftext|>" in tok.special_tokens_set else None)
    # allowed_special="all"：提示词里写的 <|endoftext|> 编成特殊词元；
    # tiktoken 默认会把它当成误输入而报错
    ids = tok.encode(prompt, allowed_special="all") if prompt else []
    if not ids:  # 空提示：像 GPT-2 的无条件生成那样，从文档分隔符开始
        if eos_id is None:
            raise UserError("提示词为空，而分词器没有 <|endoftext|> 可以作为开头")
        ids = [eos_id]
    # 模型一次最多看 context_length 个词：更长的提示词只能丢掉开头，与其悄悄丢掉不如直说
    if len(ids) > context_length:
        raise UserError(f"提示词有 {len(ids)} 个词元，超过模型的上下文长度 {context_length}："
                        "请缩短 --prompt")
    return ids, eos_id


def generate_text(model, tok, ids, eos_id, args, device):
    """用贪心和用户给的采样参数各生成一段，打印文本与速度。"""
    # (1, 提示词长度)：模型要求有 batch 维，这里 batch 为 1
    idx = torch.tensor([ids], device=device)
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    penalty = args.repetition_penalty
    note = f"，重复惩罚 {penalty}" if penalty != 1.0 else ""
    for label, kwargs in (("贪心", {}), (f"采样 {sampling}", sampling)):
        torch.manual_seed(args.seed)  # 同一个 --seed 总是抽出同一段文字
        start = time.perf_counter()
        out = generate(model, idx, args.max_new_tokens, model.cfg["context_length"],
                       eos_id=eos_id, repetition_penalty=penalty, **kwargs)
        # 停表前先同步：GPU 异步执行，不等它算完测到的只是排队时间
        sync(device)
        # 遇到结束符会提前停，所以新词元数可能少于 max_new_tokens
        new = out.shape[1] - idx.shape[1]
        speed = new / (time.perf_counter() - start)
        # 把换行显示成 ⏎，一段生成结果只占一行，方便对比
        text = tok.decode(out[0].tolist()).replace("\n", "⏎")
        print(f"[{label}{note}] {text}\n    （{new} 个新词元，{speed:.1f} 词元/秒）")


# ===== 7. 自己读 safetensors：8 字节头长度 + JSON 头 + 原始数据 =====
# safetensors 只存数据、不存代码，比 pickle 格式的 .bin 安全；格式简单到几十行就能读懂。
# JSON 头形如 {"wte.weight": {"dtype": "F32", "shape": [50257, 768], "data_offsets": [0, N]}, …}，
# data_offsets 是相对数据区开头（即 8 + 头长度 处）的字节范围 [起, 止)。
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20  # 正常的头只有几十 KB；大得离谱说明文件坏了


def read_safetensors(path):
    """读取 .safetensors，返回 {名字: torch.Tensor}。数据不复制：张量是内存映射文件上的视图，
    操作系统只在真正用到时才把那几页读进内存，所以加载几 GB 的模型也只占约一份权重的内存。"""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"找不到权重文件 {path}")
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little")  # 8 字节小端无符号整数
        if len(prefix) < 8 or not 0 < header_len <= min(MAX_HEADER_BYTES, file_size - 8):
            raise _bad(path, f"头长度 {header_len} 不合理（文件共 {file_size} 字节）")
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
        except ValueError:  # 包括 UTF-8 解码失败；不附 json 模块的英文说明
            raise _bad(path, "头部不是合法的 UTF-8 JSON") from None
        # 数据区紧跟在 8 字节长度和 JSON 头之后；头里的 data_offsets 都相对这里
        data_start = 8 + header_len
        entries = _check_entries(header, file_size - data_start, path)
        # ACCESS_COPY 是写时复制的私有映射：张量可写（微调时会改），但永远不会改动磁盘上的文件。
        # 不必手动关闭映射：每个张量都引用着它，最后一个张量被回收时自动解除。
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if file_size > data_start else None
    tensors = {}
    for begin, end, name, dtype, shape in entries:
        if begin == end:  # 元素个数为 0 的张量，没有字节可以映射
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            # 映射的是整个文件，offset 要从文件开头算，所以加上 data_start；reshape 也只是视图
            tensors[name] = torch.frombuffer(data, dtype=dtype, count=math.prod(shape),
                                             offset=data_start + begin).reshape(shape)
    return tensors


# ===== 8. 把 GPT-2 的参数名对应到我们的模型 =====
# HF 的 GPT-2 与我们的 GPTModel 是同一个网络，只是名字和存法不同：
#   wte/wpe → tok_emb/pos_emb；h.N → trf_blocks.N；ln_1/ln_2/ln_f 的 weight/bias → scale/shift；
#   HF 用的 Conv1D 把权重存成 (输入, 输出)，nn.Linear 是 (输出, 输入)，所以要转置；
#   c_attn 把 Q、K、V 三个投影拼成一个，要切成三份；输出头与 wte 共享同一个矩阵。
def map_block(take, src, dst):
    """一个 Transformer 块：HF 的 h.N.* → 我们的 trf_blocks.N.*。切片和 .t() 都只是视图，不复制。"""
    state = {}
    # c_attn 权重 (emb, 3·emb)：输出维上依次是 Q、K、V；切三份再各自转置成 (emb, emb)
    weights = take(f"{src}attn.c_attn.weight").chunk(3, dim=1)
    biases = take(f"{src}attn.c_attn.bias").chunk(3)
    for name, w, b in zip(("W_query", "W_key", "W_value"), weights, biases):
        state[f"{dst}att.{name}.weight"], state[f"{dst}att.{name}.bias"] = w.t(), b
    # 其余三个 Conv1D 同样要转置：注意力的输出投影，前馈网络的升维 c_fc 与降维 c_proj
    # （我们的 ff.layers.0 / layers.2；layers.1 是没有参数的 GELU）
    for hf_name, ours in (("attn.c_proj", "att.out_proj"), ("mlp.c_fc", "ff.layers.0"),
                          ("mlp.c_proj", "ff.layers.2")):
        state[f"{dst}{ours}.weight"] = take(f"{src}{hf_name}.weight").t()
        state[f"{dst}{ours}.bias"] = take(f"{src}{hf_name}.bias")
    # ln_1 在注意力之前、ln_2 在前馈之前，对应 Pre-LN 块里的 norm1 / norm2
    for hf_name, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
        state[f"{dst}{ours}.scale"] = take(f"{src}{hf_name}.weight")
        state[f"{dst}{ours}.shift"] = take(f"{src}{hf_name}.bias")
    return state


def map_hf_to_ours(hf, n_layers, folder):
    # save_pretrained 写出的键带 "transformer." 前缀，官方文件不带：统一去掉。
    # 官方文件里的 h.N.attn.bias / masked_bias 是因果掩码，我们自己会建，所以根本不取。
    hf = {key.removeprefix("transformer."): value for key, value in hf.items()}

    def take(key):
        if key not in hf:
            raise UserError(f"{folder} 的权重里缺少 {key}")
        # 半精度（fp16/bf16）的文件在这里转成 fp32；本来就是 fp32 的直接用原张量，不复制
        return hf[key] if hf[key].dtype == torch.float32 else hf[key].float()

    state = {"tok_emb.weight": take("wte.weight"), "pos_emb.weight": take("wpe.weight"),
             "final_norm.scale": take("ln_f.weight"), "final_norm.shift": take("ln_f.bias")}
    for i in range(n_layers):
        state.update(map_block(take, f"h.{i}.", f"trf_blocks.{i}."))
    # 官方 GPT-2 的输出头就是 wte（权重共享），文件里没有 lm_head.weight；有的话就用它
    has_head = "lm_head.weight" in hf
    state["out_head.weight"] = take("lm_head.weight") if has_head else state["tok_emb.weight"]
    return state


def load_gpt2_hf(name_or_dir):
    """加载 GPT-2：名字（gpt2、gpt2-medium、gpt2-large、gpt2-xl，自动下载并缓存到 models/）
    或本地目录（config.json + *.safetensors）。返回 (eval 模式的 GPTModel, cfg)。"""
    folder = resolve_gpt2_dir(name_or_dir)
    cfg, eps = gpt2_config_from_hf(read_json(folder / "config.json"), folder)
    # 这一步只建立内存映射和视图，一个字节的权重都还没有真正读进内存
    state = map_hf_to_ours(read_weight_folder(folder), cfg["n_layers"], folder)
    model = build_on_meta(cfg)  # 只有形状：不分配内存，也省掉随机初始化的时间
    expected = model.state_dict()  # meta 上的参数也有形状：先逐个核对，错了一句中文说清是哪个
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise UserError(f"{folder} 的权重与 config.json 对不上：{key} 的形状是 "
                            f"{tuple(value.shape)}，应为 {tuple(expected[key].shape)}")
    # assign=True：直接拿映射好的（内存映射上的）张量当参数，而不是复制进预先分配的参数里，
    # 所以整个加载过程只有一份权重
    model.load_state_dict(state, assign=True)
    if state["out_head.weight"] is state["tok_emb.weight"]:
        model.out_head.weight = model.tok_emb.weight  # 真正共享同一个参数，而不是两个参数对象
    # 因果掩码是 persistent=False 的 buffer，不在 state_dict 里，所以还留在 meta 上：
    # 在 CPU 上重建一份，各层共用（它只读不写）
    length = cfg["context_length"]
    mask = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.mask = mask
        # eps 也不在 state_dict 里：按 config 逐层设置
        elif isinstance(module, LayerNorm):
            module.eps = eps
    return model.eval(), cfg


# ===== 9. 主程序 =====
# 流程：解析参数 → 检查参数 → 按 --init 分派：随机模型的逐节演示，或加载真正的 GPT-2
def build_parser():
    parser = ArgParser(description="03：从零实现 GPT 模型，并加载真正的 GPT-2 权重")
    parser.add_argument("--init", default="random",
                        help="random=随机初始化（默认）；gpt2 / gpt2-medium / gpt2-large / gpt2-xl"
                             "=下载 GPT-2 权重；或一个含 config.json 和 *.safetensors 的本地目录")
    # 默认 None 表示"由 --quick 决定"，在 run() 里再填具体值
    parser.add_argument("--model", default=None,
                        help=f"随机初始化时的模型配置：{' / '.join(GPT_CONFIGS)}"
                             "（默认 gpt2-small，--quick 时 tiny）")
    parser.add_argument("--prompt", default=None, help="生成的开头文字（空字符串 = 从结束符开始）")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="最多生成多少个新词元，1–10000（默认 30，--quick 时 10）")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="采样温度 0.01–100：越小越保守、越大越随机，0 表示贪心（默认 0.8）")
    parser.add_argument("--top-k", type=int, default=50, help="只在概率最高的 k 个词里抽（默认 50）")
    parser.add_argument("--top-p", type=float, default=0.95,
                        help="只在累计概率达到 p 的最小词集里抽，0.001–1（默认 0.95）")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="重复惩罚，1–10：大于 1 时压低已出现过的词，贪心和采样都用"
                             "（默认 1.0 = 不惩罚；贪心输出原地打转时试试 1.3）")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="运行设备：auto 依次选 cuda > mps > cpu")
    parser.add_argument("--seed", type=int, default=123, help="随机种子（默认 123）")
    parser.add_argument("--quick", action="store_true", help="冒烟模式：tiny 模型、少量生成，半分钟内跑完")
    return parser


def check_args(args):
    # 在建模型、下载权重之前就检查参数：错了立刻给出中文提示，不白等
    # --model 只在随机初始化时有用；加载 GPT-2 时结构由 config.json 决定
    if args.init == "random" and args.model not in GPT_CONFIGS:
        raise UserError(f"未知模型配置 {args.model!r}：可选 {'、'.join(GPT_CONFIGS)}")
    if args.init not in ("random", *HF_REPOS):
        resolve_gpt2_dir(args.init)  # 本地目录：不存在、是文件、名字拼错，现在就说
    # 上限只挡"大得离谱"的值：CPU 上 gpt2-small 每秒几十个词元，一万个就要几分钟
    check_range("--max-new-tokens", args.max_new_tokens, 1, 10_000)
    # 0 = 贪心；比 0.01 还小的温度与贪心无异，logits / 温度 还可能溢出成 inf
    if args.temperature != 0:
        check_range("--temperature", args.temperature, 0.01, 100)
    check_range("--top-k", args.top_k, 1, 1_000_000)  # 比词表还大也行：等于不限制
    # p 太小（float32 里会变成 0）就把所有词都排除了，连最可能的那个也不剩
    check_range("--top-p", args.top_p, 0.001, 1)
    check_range("--repetition-penalty", args.repetition_penalty, 1, 10)
    check_range("--seed", args.seed, 0, 2**32 - 1)


def run_random(args, device):
    # 先备好分词器、检查提示词和内存：缺什么在演示开始之前就说清楚
    tok, tok_name, default_prompt = pick_tokenizer()
    # 输出头和词嵌入的行数都等于 vocab_size：换小词表后参数量会明显变少
    cfg = dict(GPT_CONFIGS[args.model], vocab_size=tok.n_vocab)  # 词表大小跟着分词器走
    prompt = default_prompt if args.prompt is None else args.prompt
    ids, eos_id = encode_prompt(tok, prompt, cfg["context_length"])
    check_memory(args.model, cfg, device)
    print("== 1. 积木：层归一化与 GELU ==")
    demo_blocks()
    print("\n== 2. 捷径连接 ==")
    demo_shortcut()
    print("\n== 3. 模型规模与计算量 ==")
    print_size_table()
    print_epoch_estimate(device, args.quick)
    print("\n== 4. 采样策略 ==")
    demo_sampling(args.seed)
    demo_repetition_penalty()
    print("\n== 5. 用随机权重生成 ==")
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    # 计时包括随机初始化：要为上亿个参数逐个抽随机数，CPU 上也要花点时间
    model = GPTModel(cfg).to(device).eval()
    # [0]：我们随机初始化的模型里，输出头是独立的一份，不与词嵌入共享
    print(f"{args.model}（词表换成{tok_name}的 {tok.n_vocab}）：{count_params(model)[0]:,} 个参数，"
          f"随机初始化用时 {time.perf_counter() - start:.1f} 秒")
    generate_text(model, tok, ids, eos_id, args, device)
    print("权重是随机的：每个词的 logits 都差不多，模型对语言一无所知，输出只是一串互不相干的词元；"
          "字节级词元还可能只是半个汉字，乱拼在一起就显示成 �。04_pretrain.py 会通过训练解决这个问题。")


def run_pretrained(args, device):
    tok = get_gpt2_tokenizer()  # 先取词表：缺它的话，不必白白下载几百 MB 的权重
    start = time.perf_counter()
    model, cfg = load_gpt2_hf(args.init)
    # 而 GPT-2 的输出头与词嵌入是同一个矩阵，所以用 [1]：共享的参数只数一次
    print(f"已加载 {args.init}：{cfg['n_layers']} 层、宽 {cfg['emb_dim']}、"
          f"{count_params(model)[1]:,} 个参数（输出头与词嵌入共享），"
          f"用时 {time.perf_counter() - start:.1f} 秒")
    prompt = "Every effort moves you" if args.prompt is None else args.prompt
    ids, eos_id = encode_prompt(tok, prompt, cfg["context_length"])
    # 权重先在 CPU 上经内存映射加载，生成前再整体搬到目标设备
    generate_text(model.to(device), tok, ids, eos_id, args, device)


def run(args):
    # --quick 只改默认值：用户显式给出的 --model / --max-new-tokens 仍然优先
    if args.model is None:
        args.model = "tiny" if args.quick else "gpt2-small"
    if args.max_new_tokens is None:
        args.max_new_tokens = 10 if args.quick else 30
    check_args(args)
    device = resolve_device(args.device)
    if args.init == "random":
        run_random(args, device)
    else:
        run_pretrained(args, device)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    # 只接住预料中的用户错误；其他异常保留完整回溯，方便发现真正的 bug
    except UserError as err:
        print(f"错误：{err}", file=sys.stderr)
        sys.exit(2)


# ===== 进阶：测速、下载与文件校验的细节（第一次读可以跳过）=====
# 上面的章节会调用这里的函数；Python 在调用时才查找名字，所以定义写在 main() 后面也没关系。


# ---- 开工之前的检查：分词器在不在、内存够不够 ----
def pick_tokenizer():
    """随机模型的演示优先用项目自己的分词器（词表小、对中文友好）；没有就退回 GPT-2 的。"""
    # 默认提示词跟着分词器换：项目分词器对中文友好，GPT-2 的词表主要为英文而建
    path = DATA_DIR / "tokenizer.json"
    if path.is_file():
        return load_project_tokenizer(path), "项目分词器", "从前有一台计算机"
    try:
        tok = get_gpt2_tokenizer()
    except UserError:  # 两个都没有：一句话说清缺什么、怎么补，而不是只提 GPT-2
        raise UserError(
            f"找不到分词器：没有项目分词器 {path}（把项目的 data/ 文件夹放到本脚本旁边；"
            "它由 01_tokenizer.py --train 生成），也取不到 GPT-2 词表（联网运行一次；"
            "或 pip install --no-deps openai-whisper；或用环境变量 NFL_GPT2_VOCAB 指向 "
            "gpt2.tiktoken）") from None
    print(f"（没有找到项目分词器 {path}，改用 GPT-2 分词器）")
    return tok, "GPT-2 分词器", "Every effort moves you"


def check_memory(name, cfg, device):
    """随机初始化先在 CPU 上建好整个模型（fp32，每个参数 4 字节）再搬到 device：放不下就在
    分配之前拒绝，而不是让系统因内存耗尽杀掉进程（笔记本上甚至会卡死）。"""
    need = count_params(build_on_meta(cfg))[0] * 4 + 2**28  # 另留 256 MB 给激活与 logits
    for where in {torch.device("cpu"), device}:
        free = free_memory_bytes(where)
        if free is not None and need > free:
            raise UserError(f"{name} 约需 {need / 2**30:.1f} GB 内存，{where.type} 上此刻只剩 "
                            f"{free / 2**30:.1f} GB：请换小一点的 --model（例如 tiny）")


# ---- 测速：本机此刻的矩阵乘峰值 ----
def time_matmul(device, dtype, n, reps):
    """n×n 矩阵乘测 reps 次，按最快的一次算出 FLOP/s（头几次含线程池、内核的预热）。"""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    # 取最快而不是平均：慢的那几次多半被预热、别的进程或频率爬升拖慢了
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        # 结果不用保存；在 GPU 上这一行只是把内核排进队列，真正的等待发生在 sync 里
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    # n×n 乘 n×n：n² 个输出元素，每个要 n 次乘加 = 2n³ FLOPs
    return 2 * n ** 3 / best


def measure_matmul_peak(device, dtype, seconds=0.05):
    """本机此刻矩阵乘实际能达到的算力（不抄厂商的纸面数字，现场测）。先用小矩阵粗测速度，
    再挑单次约 seconds/2 秒的尺寸测 10 次、取最快：太小的矩阵测不出峰值，太大的又太费时
    （没有 bf16 硬件的 CPU 上，bf16 矩阵乘会慢几十倍）。"""
    n = 256
    for _ in range(2):  # 粗测两轮：GPU 上第一轮的小矩阵主要在测启动开销
        rate = time_matmul(device, dtype, n, reps=5)
        # 单次耗时 = 2n³ / rate，令它等于 seconds/2 反解出 n；
        # 取 128 的倍数（对硬件的分块友好），并夹在 [256, 8192] 之间
        n = min(max(int((rate * seconds / 4) ** (1 / 3)) // 128 * 128, 256), 8192)
    # 多次短测量取最快，而不是一两次长测量：别的进程只会让某次变慢，机器繁忙时
    # 总有几次恰好没被打断；总耗时仍约 5 × seconds
    return time_matmul(device, dtype, n, reps=10), n


# ---- 从 Hugging Face 下载文件（只用标准库 urllib）----
# 权重文件动辄几百 MB 到几 GB：要能断点续传，也绝不能让半截文件冒充完整文件
def _total_size(headers, have):
    """文件总字节数：206 响应看 Content-Range（"bytes 100-999/1000" 斜杠后面），
    200 响应看 Content-Length；都没有就是未知（None）。"""
    tail = (headers.get("Content-Range") or "").rsplit("/", 1)[-1]
    if tail.isdigit():
        return int(tail)
    length = headers.get("Content-Length")
    return have + int(length) if length and length.isdigit() else None


def _copy_with_progress(response, out, done, total, name):
    shown = None
    # 每次读 1 MB 就写盘：文件可能有几 GB，不能整个读进内存
    while chunk := response.read(1 << 20):
        out.write(chunk)
        done += len(chunk)
        text = f"{100 * done // total}% / {total / 2**20:.0f} MB" if total else f"{done >> 20} MB"
        if text != shown:  # 变了才刷新，免得刷屏
            # \r 回到行首覆盖上一次的进度，不换行；flush 让进度立刻显示出来
            print(f"\r  下载 {name}：{text}", end="", flush=True)
            shown = text
    print()


def _fetch_into(url, part, headers=None):
    """把 url 的内容写进 part，已有的部分用 HTTP Range 跳过（断点续传）。返回总字节数。
    headers：额外的请求头，例如只发给 HF 的访问令牌（别的网站不该收到它）。"""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers=headers or {})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        # timeout 只限制单次等待（连接、每次读），防止网络卡住时永远挂着
        response = urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not have:
            raise
        part.unlink()  # 416：.part 不比服务器上的文件短，说明它不可信，删掉从头下载
        return _fetch_into(url, part, headers)
    # 206 = 服务器接受了 Range，接着写；200 = 服务器从头发送，那就从头写
    resumed = response.status == 206
    part.parent.mkdir(parents=True, exist_ok=True)  # 连上了才建目录：断网时什么都不留下
    with response, open(part, "ab" if resumed else "wb") as out:
        total = _total_size(response.headers, have if resumed else 0)
        _copy_with_progress(response, out, have if resumed else 0, total, part.stem)
    return total


def download_hf_file(repo_id, filename, dest_dir):
    """下载 HF 仓库里的一个文件到 dest_dir，返回本地路径；已经下载过就直接用。
    数据先写进 filename.part，大小核对无误才改成正式文件名——所以正式文件永远是完整的。"""
    dest = Path(dest_dir) / filename
    # 正式文件只会由末尾的原子改名产生，所以存在即完整，不必再校验
    if dest.is_file():
        return dest
    part = dest.with_name(dest.name + ".part")
    # HF_ENDPOINT 可换成镜像，例如国内常用的 https://hf-mirror.com；路径格式与官方相同
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    # resolve/main/ 表示取 main 分支上的版本，这是 HF 下载单个文件的固定路径格式
    url = f"{endpoint}/{repo_id}/resolve/main/{filename}"
    token = os.environ.get("HF_TOKEN")  # 受限（gated）模型需要访问令牌
    try:
        total = _fetch_into(url, part, {"Authorization": f"Bearer {token}"} if token else None)
    except urllib.error.HTTPError as err:
        hint = "需要访问令牌：请设置环境变量 HF_TOKEN" if err.code in (401, 403) else "请检查模型名"
        raise UserError(f"下载 {url} 失败：HTTP {err.code}，{hint}") from None
    except (OSError, http.client.HTTPException) as err:  # 断网、超时、连接被拒、中途断开……
        raise UserError(
            f"无法下载 {url}（{err}）。网络不通时可以：设置镜像，如 "
            "export HF_ENDPOINT=https://hf-mirror.com 后重试（已下载的部分会续传）；或在别处下载好 "
            "config.json 和 model.safetensors 放进一个目录，再用 --init 该目录。") from None
    # 这一步必不可少：连接被对方提前关闭时，read() 只会返回空字节而不报错
    if total is not None and part.stat().st_size != total:
        raise UserError(f"{filename} 只下载了 {part.stat().st_size}/{total} 字节，"
                        "连接中途断开；重新运行会从断点续传")
    os.replace(part, dest)  # 原子改名：要么没有正式文件，要么它是完整的
    return dest


def resolve_gpt2_dir(name_or_dir):
    # 先认模型名、再认本地目录：当前目录下恰好有个叫 gpt2 的文件夹时，仍按模型名下载
    if name_or_dir in HF_REPOS:
        folder = MODELS_DIR / name_or_dir
        for filename in ("config.json", "model.safetensors"):
            download_hf_file(HF_REPOS[name_or_dir], filename, folder)
        return folder
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    hint = "--init 要一个含 config.json 和 *.safetensors 的目录"
    if path.exists():
        raise UserError(f"{name_or_dir} 是文件，不是目录：{hint}")
    # 带路径分隔符、以 . 或 ~ 开头的显然是想给一个目录：说它不存在，比"未知模型"有用
    if "/" in name_or_dir or os.sep in name_or_dir or name_or_dir.startswith((".", "~")):
        raise UserError(f"目录 {name_or_dir} 不存在：{hint}，或模型名 {'、'.join(HF_REPOS)}")
    raise UserError(f"未知模型 {name_or_dir!r}：可选 random、{'、'.join(HF_REPOS)}，"
                    "或一个含 config.json 和 *.safetensors 的本地目录")


# ---- safetensors 头部的逐项校验：头来自文件，不可信 ----
def _bad(path, reason):
    return UserError(f"{path} 不是有效的 safetensors 文件：{reason}")


def _is_uint_list(value, length=None):
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def _check_entries(header, data_size, path):
    """逐个校验头里描述的张量，返回按起点排序的 [(起, 止, 名字, dtype, 形状)]。"""
    if not isinstance(header, dict):
        raise _bad(path, "头部不是 JSON 对象")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":  # 自由填写的附加信息，不是张量
            continue
        # 头来自文件、不可信：每个字段先查类型再用，坏文件得到一句中文说明，而不是奇怪的异常
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        if dtype is None:
            raise _bad(path, f"张量 {name} 的数据类型不认识（应是 {'、'.join(SAFETENSORS_DTYPES)} 之一）")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not _is_uint_list(shape) or not _is_uint_list(offsets, 2) or offsets[0] > offsets[1]:
            raise _bad(path, f"张量 {name} 的 shape 或 data_offsets 格式不对")
        if offsets[1] > data_size:
            raise _bad(path, f"张量 {name} 的数据超出了文件末尾（{offsets[1]} > {data_size}）")
        # 字节数必须恰好等于 元素个数 × 每个元素的字节数，否则张量会读错位
        if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
            raise _bad(path, f"张量 {name} 的字节数与形状 {shape} × {info['dtype']} 对不上")
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    # 按起点排好序后，只需比较相邻两项就能查出任何重叠
    entries.sort(key=lambda e: e[:2])
    for prev, cur in zip(entries, entries[1:]):
        if cur[0] < prev[1]:
            raise _bad(path, f"张量 {prev[2]} 和 {cur[2]} 的数据区重叠")
    return entries


# ---- 读 config.json 与权重目录 ----
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # 都是 tanh 近似的 GELU


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"找不到 {path}") from None
    except json.JSONDecodeError as err:  # 只报位置，不附 json 模块的英文说明
        raise UserError(f"{path} 不是合法的 JSON（第 {err.lineno} 行第 {err.colno} 列有误）") from None
    except (OSError, ValueError):  # 没有读权限、其实是个目录、不是 UTF-8 文本……
        raise UserError(f"{path} 读不出来，或不是 UTF-8 编码的 JSON 文本") from None


def gpt2_config_from_hf(conf, folder):
    """HF 的 config.json → (我们的 cfg, LayerNorm 的 eps)。不支持的变体直接报错，而不是悄悄算错。"""
    try:
        cfg = {"vocab_size": conf["vocab_size"], "context_length": conf["n_positions"],
               "emb_dim": conf["n_embd"], "n_heads": conf["n_head"], "n_layers": conf["n_layer"],
               "drop_rate": 0.0, "qkv_bias": True}  # 推理用不到 dropout
    except (KeyError, TypeError) as err:
        raise UserError(f"{folder}/config.json 缺少字段 {err}") from None
    sizes = [cfg[key] for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")]
    if not _is_uint_list(sizes) or 0 in sizes or cfg["emb_dim"] % cfg["n_heads"]:
        raise UserError(f"{folder}/config.json 里的尺寸 {sizes} 不合理："
                        "应都是正整数，且 n_embd 能被 n_head 整除")
    # 逐条排除 GPTModel 表达不了的变体：别的激活函数、FFN 宽度不是 4 倍、
    # 注意力分数按层号额外缩放、或者不除以 √head_dim
    if (conf.get("model_type", "gpt2") != "gpt2"
            or conf.get("activation_function", "gelu_new") not in TANH_GELU_NAMES
            or conf.get("n_inner") not in (None, 4 * cfg["emb_dim"])
            or conf.get("scale_attn_by_inverse_layer_idx")
            or not conf.get("scale_attn_weights", True)):
        raise UserError(f"{folder}/config.json 描述的不是本章实现的标准 GPT-2 结构")
    # eps 不是参数，不在权重文件里，只能从 config 读；GPT-2 用的是 1e-5
    eps = conf.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise UserError(f"{folder}/config.json 的 layer_norm_epsilon 应是 0 到 1 之间的小数")
    return cfg, eps


def read_weight_folder(folder):
    """读目录里的全部权重：大模型常被切成多个分片，由 model.safetensors.index.json 列出。"""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        # weight_map 是 {参数名: 分片文件名}：许多参数在同一个分片里，所以去重
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not (isinstance(weight_map, dict)
                and all(isinstance(name, str) for name in weight_map.values())):
            raise UserError(f"{index} 格式不对：应有 weight_map（参数名 → 分片文件名）")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} 里没有 *.safetensors 权重文件")
    weights = {}
    for name in files:
        # 每个分片都只是内存映射，合并进一个字典也不复制数据
        weights.update(read_safetensors(folder / name))
    return weights


# ===== 附录：前几章的部件（逐字复制）=====
# 来自 01_tokenizer.py：错误类型、命令行解析与范围检查、分词器、设备选择
DATA_DIR = Path(__file__).resolve().parent / "data"


class UserError(Exception):
    """用户输入有误（文件缺失、格式不对……）：main() 捕获后打印一行中文说明，以状态码 2 退出。"""


class ArgParser(argparse.ArgumentParser):
    """argparse 的中文版：--help 的标题是中文；报错不再先打印一大段英文用法，只给一行中文，状态码 2。"""

    def __init__(self, **kwargs):
        super().__init__(add_help=False, **kwargs)
        self.add_argument("-h", "--help", action="help", help="显示这份帮助并退出")

    def format_help(self):
        # "usage:"、"options:" 这两个标题写死在 argparse 里（英文），在这里换成中文
        return super().format_help().replace("usage:", "用法：", 1).replace("options:", "选项：", 1)

    def error(self, message):
        print(f"错误：命令行参数有误（{message}）；用 --help 查看用法", file=sys.stderr)
        sys.exit(2)


def check_range(flag, value, low, high):
    """数值参数的范围检查：负数、零、NaN、无穷、大得离谱，都在开工之前用一行中文拒绝。"""
    # math.isfinite 挡住 nan/inf：nan 与任何数比较都是 False，只写 low <= value 会让它溜过去
    if not (math.isfinite(value) and low <= value <= high):
        raise UserError(f"{flag} 应在 {low} 到 {high} 之间，收到 {value}")


# GPT-2 的预分词正则（公开事实，来自 GPT-2 论文的实现）：缩写、字母串、数字串、其他符号、空白
GPT2_PAT = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def get_gpt2_tokenizer():
    """GPT-2 分词器（tiktoken）。离线时依次尝试：环境变量 NFL_GPT2_VOCAB 指向的 ranks 文件、
    models/gpt2.tiktoken、已安装的 openai-whisper 包自带的 assets/gpt2.tiktoken（不 import 它）。"""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # 没有网络、也没有 tiktoken 缓存
        pass
    candidates = []
    if os.environ.get("NFL_GPT2_VOCAB"):
        candidates.append(Path(os.environ["NFL_GPT2_VOCAB"]))
    candidates.append(Path(__file__).resolve().parent / "models" / "gpt2.tiktoken")
    spec = importlib.util.find_spec("whisper")  # 只查找包的位置，不执行它的代码
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidates.append(Path(folder) / "assets" / "gpt2.tiktoken")
    for path in candidates:
        if path.is_file():
            # .tiktoken 格式：每行"base64(字节串) 排名"
            lines = path.read_text(encoding="ascii").split("\n")
            ranks = {base64.b64decode(tok): int(rank)
                     for tok, rank in (line.split() for line in lines if line)}
            return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": 50256})
    raise UserError(
        "找不到 GPT-2 词表：tiktoken 无法联网下载。请任选其一：联网运行一次；"
        "或 pip install --no-deps openai-whisper（自带 gpt2.tiktoken）；"
        "或把 gpt2.tiktoken 放到 models/ 下，或用环境变量 NFL_GPT2_VOCAB 指向它。")


def load_project_tokenizer(path=DATA_DIR / "tokenizer.json"):
    """读取 01_tokenizer.py 训练并随项目发布的分词器，构造成 tiktoken.Encoding（Rust 实现，快）。"""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"找不到项目分词器 {path}：它在随项目发布的 data/ 文件夹里，请把 data/ 放在"
                        f"本脚本旁边；或用 python 01_tokenizer.py --train 重新训练")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        ranks = {base64.b64decode(tok): rank for rank, tok in enumerate(spec["mergeable_ranks"])}
        return tiktoken.Encoding(name=spec["name"], pat_str=spec["pat_str"],
                                 mergeable_ranks=ranks, special_tokens=spec["special_tokens"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"分词器文件 {path} 已损坏或格式不对：{err}") from None


def resolve_device(name):
    """auto 按 cuda > mps > cpu 选；显式要求的设备不可用时给出中文错误。"""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("要求使用 CUDA，但本机 torch 看不到可用的 NVIDIA GPU；请改用 --device cpu")
    if name == "mps" and not has_mps:
        raise UserError("要求使用 MPS，但本机不支持 Apple GPU（MPS）；请改用 --device cpu")
    return torch.device(name)


# 来自 02_attention.py：GPU 同步、可用内存
def sync(device):
    if device.type != "cpu":  # GPU 的运算是异步排队的：计时前后都要等它真正算完
        getattr(torch, device.type).synchronize()


def free_memory_bytes(device):
    """device 上此刻还能用多少字节；查不到（比如非 Linux 的 CPU）就返回 None，不拦。"""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:  # Linux：MemAvailable = 不挤掉其他程序就能拿到的内存（含可回收的文件缓存）
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # 单位是 kB
    except OSError:
        pass
    return None


if __name__ == "__main__":
    main()
