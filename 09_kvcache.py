"""09_kvcache.py — KV 缓存：生成时不再把前面的词重算一遍

本章你会学到：
- 为什么要缓存：不带缓存时，每生成一个词都要把前面所有词重新算一遍；数一数两种做法的 FLOPs
- 两种 KV 缓存：最直白的"每步拼接"，和预先分配、原地写入的缓冲区；reset_cache()；预填充 + 逐词解码
- 到了上下文长度怎么办：窗口向前跳半个上下文，重新预填充（学到的绝对位置嵌入不能原地平移）
- 批量生成：左侧填充 + 注意力掩码，几个提示词一起解码，在上下文之内和一条一条生成完全相同
- 测速：不带缓存、拼接缓存、预分配缓存，fp32 与 bf16，一张表
运行：python 09_kvcache.py          # 默认：GPT-2 small 尺寸（随机权重）生成 200 个词，测速；2 核 CPU 约 2.5 分钟
      python 09_kvcache.py --serve  # 浏览器里的聊天页 http://127.0.0.1:8000/
      python 09_kvcache.py --quick  # 冒烟：tiny 尺寸，几秒
"""
import argparse
import base64
import copy
import http.client
import http.server
import importlib.util
import json
import math
import mmap
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

# 本章用到的 UserError、ArgParser、check_range、GPT_CONFIGS、LayerNorm、FeedForward、load_init 等来自 01–04，
# 见文末附录。MultiHeadAttention、TransformerBlock、GPTModel 是 03 的版本加上 KV 缓存，就写在正文里。


# ===== 1. 为什么要缓存：数一数 FLOPs =====
# 生成是一个词一个词来的：第 t 步把前 t 个词送进模型，只用最后一个位置的输出挑下一个词。
# 可前 t−1 个词的 K、V 上一步已经算过了——因果掩码保证它们不会因为后面来了新词而改变。
# 把每层的 K、V 存下来（KV 缓存），每步就只需要算 1 个新词：线性层的计算从 t 份降到 1 份，
# 注意力从 t×t 降到 1×t。代价是内存：每个词每层存一份 K 和一份 V。

def linear_params(cfg):
    """每处理一个词要乘的权重个数：每个块 4·d² + 8·d²（注意力 + MLP），加上输出头 d × 词表。"""
    d = cfg["emb_dim"]
    return cfg["n_layers"] * 12 * d * d + d * cfg["vocab_size"]


def generation_flops(cfg, prompt_len, new_tokens, cached):
    """生成 new_tokens 个词一共要多少 FLOPs（乘加算 2 次）。一个 query 看 k 个词：q·Kᵀ 和 权重·V 共 4·d·k。"""
    per_token, attn = 2 * linear_params(cfg), 4 * cfg["n_layers"] * cfg["emb_dim"]
    total = 0
    for step in range(new_tokens):
        t = prompt_len + step  # 这一步要送进模型的序列长度（提示词 + 已生成的词）
        if cached and step > 0:
            total += per_token + attn * t  # 只算上一步生成的那 1 个词：它看缓存里的 t − 1 个加上自己
        else:
            # 整段重算（不带缓存的每一步；带缓存时的第一步 = 预填充）：第 i 个词看前 i 个
            total += per_token * t + attn * t * (t + 1) // 2
    return total


def show_flops(cfg, prompt_len=50, new_tokens=200):
    plain = generation_flops(cfg, prompt_len, new_tokens, cached=False)
    cached = generation_flops(cfg, prompt_len, new_tokens, cached=True)
    print(f"1. {prompt_len} 个词的提示词再生成 {new_tokens} 个词（{cfg['n_layers']} 层、宽 {cfg['emb_dim']}）："
          f"不带缓存 {plain / 1e12:.2f} TFLOPs，带缓存 {cached / 1e12:.3f} TFLOPs，"
          f"少算 {plain / cached:.0f} 倍")
    per_token = 2 * cfg["n_layers"] * cfg["emb_dim"] * 4  # K 和 V，每层各 d 个 fp32
    print(f"   代价：缓存每个词占 2（K、V）× {cfg['n_layers']} 层 × {cfg['emb_dim']} × 4 字节 = "
          f"{per_token / 1024:.0f} KB（fp32），上下文 {cfg['context_length']} 个词时每条序列 "
          f"{per_token * cfg['context_length'] / 2**20:.0f} MB")


# ===== 2. 带缓存的注意力：先拼接，再预分配 =====
# 变化只在注意力里：新来的 n 个词算出自己的 q、k、v；k、v 接到缓存后面；q 去看缓存里的全部 k、v。
# 两种存法：
#   concat：每步 torch.cat 出一个新张量——最好懂，但每步都要复制一遍整个缓存，越长越慢；
#   prealloc：开头就按上下文长度分配好缓冲区，每步只把新的 k、v 写进下一格（原地），取前 filled 格来用。
# 新的 query 可以看哪些 key：预填充时（一次 n 个词）是因果的；解码时（1 个词）能看缓存里的全部。
# 批量生成时还要挡住左边的填充：这时传入一个布尔掩码（True = 可以看）。

class MultiHeadAttention(nn.Module):
    """03 的因果多头注意力（SDPA）+ KV 缓存。改动：forward 多了 use_cache、mask；多了 reset_cache()。"""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False,
                 cache_kind="prealloc"):
        super().__init__()
        assert d_out % num_heads == 0, "d_out 必须能被 num_heads 整除"
        self.d_out, self.num_heads = d_out, num_heads
        self.head_dim = d_out // num_heads
        self.context_length, self.cache_kind = context_length, cache_kind
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.reset_cache()

    def reset_cache(self):
        # 每次生成前后都要清空：上一条提示词的 K、V 若还留着，新提示词的 query 会看到别人的上下文
        self.k_cache = self.v_cache = None
        self.filled = 0  # 缓存里已有几个词

    def append_concat(self, k, v):
        # 最直白的做法：旧缓存和新的 k、v 拼成一个新张量。第 t 步要复制 t 个词的 K、V，越往后越贵
        if self.k_cache is not None:
            k, v = torch.cat([self.k_cache, k], dim=2), torch.cat([self.v_cache, v], dim=2)
        self.k_cache, self.v_cache = k, v
        self.filled = k.shape[2]
        return k, v

    def append_prealloc(self, k, v):
        b, h, n, d = k.shape
        if self.k_cache is None:  # 第一次：按上下文长度一次分配好，之后只往里写
            self.k_cache = k.new_empty(b, h, self.context_length, d)
            self.v_cache = v.new_empty(b, h, self.context_length, d)
        end = self.filled + n
        if end > self.context_length:
            raise RuntimeError("KV 缓存已满：先 reset_cache()（generate 会自动处理）")
        # 原地写进下一格：不分配新内存、不复制旧内容；返回的是缓冲区前 end 格的视图（也不复制）
        self.k_cache[:, :, self.filled:end] = k
        self.v_cache[:, :, self.filled:end] = v
        self.filled = end
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]

    def forward(self, x, use_cache=False, mask=None):
        b, n, _ = x.shape
        # 只有新来的 n 个词要算 q、k、v：旧词的 k、v 在缓存里，旧词的 q 以后再也用不到
        q, k, v = (w(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        if use_cache:
            append = self.append_concat if self.cache_kind == "concat" else self.append_prealloc
            k, v = append(k, v)
        p = self.dropout.p if self.training else 0.0
        if mask is not None:  # 批量生成：因果 + 挡住填充，由 GPTModel 算好传进来
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:  # n == 1 时 is_causal=False：唯一的新 query 本来就排在最后，能看全部
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=n > 1)
        return self.out_proj(context.transpose(1, 2).reshape(b, n, self.d_out))


class TransformerBlock(nn.Module):
    """03 的 Pre-LN 块；改动：把 use_cache、mask 传给注意力。"""

    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], context_length=cfg["context_length"],
            dropout=cfg["drop_rate"], num_heads=cfg["n_heads"], qkv_bias=cfg["qkv_bias"],
            cache_kind=cfg.get("cache_kind", "prealloc"))
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x, use_cache=False, mask=None):
        x = x + self.drop_shortcut(self.att(self.norm1(x), use_cache, mask))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """03 的 GPT；改动：forward 多了 use_cache、positions、mask，记着缓存里已有几个词（位置从那里接着数）；
    reset_cache() 清空每一层的缓存。参数名和 03 完全相同，03、04、06 的检查点直接能载入。"""

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
        for name, param in self.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("layers.2.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg["n_layers"]))
        self.cache_len = 0  # 缓存里已有几个词：新词的位置编号从这里接着数

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def reset_cache(self):
        self.cache_len = 0
        for block in self.trf_blocks:
            block.att.reset_cache()

    def set_cache_kind(self, kind):
        """concat 或 prealloc（换了就清空缓存）。"""
        for block in self.trf_blocks:
            block.att.cache_kind = kind
        self.reset_cache()

    def hidden(self, in_idx, use_cache=False, positions=None, mask=None):
        """输出头之前的隐藏状态 (b, seq_len, emb_dim)。"""
        _, seq_len = in_idx.shape
        if positions is None:  # 带缓存时，新词的位置接在缓存里已有的词后面
            start = self.cache_len if use_cache else 0
            positions = torch.arange(start, start + seq_len, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))
        for block in self.trf_blocks:
            x = block(x, use_cache, mask)
        if use_cache:
            self.cache_len += seq_len
        return self.final_norm(x)

    def forward(self, in_idx, use_cache=False, positions=None, mask=None):
        return self.out_head(self.hidden(in_idx, use_cache, positions, mask))


# ===== 3. 生成：预填充 + 逐词解码；上下文满了怎么办；批量与左侧填充 =====
# 预填充：把提示词一次送进去，填满缓存，拿到第一个新词的 logits；之后每步只送 1 个新词。
# 上下文满了：03 的做法是每步只看最后 context_length 个词，整段重算。带缓存时这行不通——
# 缓存里的 K、V 是带着各自的位置嵌入算出来的，窗口往前挪一格，每个词的位置都变了，缓存就全作废。
# 本章的做法：满了就把窗口向前跳半个上下文（只留最后一半的词，位置从 0 重新数），重新预填充一次，
# 再接着逐词解码；不带缓存时也用同一个窗口规则，所以两者的输出逐词相同（有测试）。
# 批量：提示词长短不一，在左边填充，让最后一个位置都是真实的词；掩码挡住填充，位置从每行第一个真实的词数起。

def sample_next(logits, temperature=0.0, top_k=None, top_p=None):
    """(b, vocab) 的 logits → (b, 1) 的下一个词：temperature=0 贪心；否则按 top_k / top_p 截断后抽样（同 03）。"""
    if temperature <= 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # 去掉"前面的累计概率已经 ≥ top_p"的词，但至少保留概率最大的那个
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)


# 掩码里 True = 可以看。新 query 在窗口里的位置是最后 n_new 个；它能看位置不超过自己的、不是填充的 key。
def window_mask(valid, n_new):
    """valid：(b, 窗口长度) 布尔，True = 真实的词。→ 新来的 n_new 个 query 能看哪些 key，形状 (b, 1, n_new, 窗口长度)。"""
    total = valid.shape[1]
    query_pos = torch.arange(total - n_new, total, device=valid.device).unsqueeze(1)
    causal = torch.arange(total, device=valid.device).unsqueeze(0) <= query_pos  # (n_new, total)
    # 填充行的 query 自己也是填充时，至少让它看自己，避免整行都被挡住算出 NaN
    itself = torch.eye(total, device=valid.device, dtype=torch.bool)[-n_new:]
    keep = (causal & valid[:, None, :]) | itself
    return keep.unsqueeze(1)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_id=None,
             use_cache=True, valid=None):
    """自回归生成，返回含提示词的全部 id (b, 提示词长 + 新词数)。use_cache=False 时每步整段重算（对照用）。
    valid：左侧填充的批量输入里哪些位置是真实的词（见 generate_batch）；None = 没有填充。"""
    out = idx
    steps = decode_steps(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache,
                         valid)
    for out in steps:
        pass
    return out


def decode_steps(model, idx, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_id=None,
                 use_cache=True, valid=None):
    """generate 的主循环，写成生成器：每生成一个词就交出一次当前的全部 id——网页上的流式输出就靠它。
    每步：决定窗口、只送进缓存里还没有的词、从最后一个位置挑下一个词。"""
    model.eval()
    padded = valid is not None
    valid = valid if padded else torch.ones_like(idx, dtype=torch.bool)
    model.reset_cache()
    try:  # 用的人中途不要了（网页上按"停止"）、生成器被关掉时，也清空缓存、还原权重
        yield from decode_windows(model, idx, valid, padded, max_new_tokens, temperature, top_k,
                                  top_p, eos_id, use_cache)
    finally:
        model.reset_cache()


def decode_windows(model, idx, valid, padded, max_new_tokens, temperature, top_k, top_p, eos_id,
                   use_cache):
    """decode_steps 的循环本身（参数同上）。"""
    ctx = model.cfg["context_length"]
    start, done = 0, torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    with torch.no_grad(), decode_layout(model):  # 进阶：CPU 上把权重转成 (输入, 输出) 的存法，解码快两成
        for _ in range(max_new_tokens):
            length = idx.shape[1]
            jumped = length - start > ctx
            if jumped:  # 窗口满了：向前跳半个上下文
                start = length - ctx // 2
            if not use_cache or jumped or model.cache_len == 0:
                model.reset_cache()
                new = slice(start, length)  # 整段（重新）预填充
            else:
                new = slice(start + model.cache_len, length)  # 只送缓存里还没有的那 1 个词
            window = valid[:, start:length]
            mask = window_mask(window, new.stop - new.start) if padded else None
            # 位置从窗口里每行第一个真实的词数起；没有填充时就是 0, 1, 2, …
            if padded:
                positions = (window.cumsum(dim=1) - 1).clamp(min=0)[:, new.start - start:]
            else:
                positions = torch.arange(new.start - start, length - start, device=idx.device)
            if use_cache:  # 只在最后一个位置上算输出头（预填充时也是）：输出头（宽 × 词表）是最大的一个矩阵
                logits = model.out_head(model.hidden(idx[:, new], True, positions, mask)[:, -1, :])
            else:  # 不带缓存就是 03 的做法：整段前向，每个位置都算一遍输出头，只用最后一个
                logits = model(idx[:, new], False, positions, mask)[:, -1, :]
            next_id = sample_next(logits.float(), temperature, top_k, top_p)
            if eos_id is not None:  # 已经结束的行只补结束符
                next_id = torch.where(done, torch.full_like(next_id, eos_id), next_id)
                done |= next_id == eos_id
            idx = torch.cat([idx, next_id], dim=1)
            valid = torch.cat([valid, torch.ones_like(next_id, dtype=torch.bool)], dim=1)
            yield idx
            if eos_id is not None and bool(done.all()):
                break


def generate_batch(model, prompts, max_new_tokens, pad_id, **kwargs):
    """几条长短不一的提示词（id 列表）一起生成：左侧填充到一样长，返回每条的新词（去掉填充和提示词）。"""
    # 左边填充：生成总是接在最后一个位置后面，右边填充的话短提示词后面会先跟一串填充
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    idx = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts],
                         device=device)
    out = generate(model, idx, max_new_tokens, valid=valid, **kwargs)
    return [row[width:].tolist() for row in out]


# ===== 4. 测速：不带缓存、拼接缓存、预分配缓存；fp32 与 bf16 =====
# 同一个模型、同一个提示词，贪心生成同样多的词：三种做法的输出逐词相同（先核对，再计时）。
# bf16：权重换成 bf16，内存和带宽减半；CPU 有原生 bf16 指令时更快，没有时反而慢几十倍——先试几步再决定。

def timed_generate(model, idx, new_tokens, use_cache, kind="prealloc"):
    # 计时整个 generate：预填充、逐词解码、采样都算在内——用的人等的就是这么久
    model.set_cache_kind(kind)
    t0 = time.perf_counter()
    out = generate(model, idx, new_tokens, use_cache=use_cache)
    return out, time.perf_counter() - t0


def bf16_is_faster(model, model16, idx, steps=8):
    """试生成几步（先各跑一次热身）：bf16 比 fp32 快才用它。返回 (是否更快, fp32 秒数, bf16 秒数)。"""
    for m in (model, model16):
        timed_generate(m, idx, 2, True)
    fp32, bf16 = (timed_generate(m, idx, steps, True)[1] for m in (model, model16))
    return bf16 < fp32, fp32, bf16


def speed_table(model, idx, new_tokens, device):
    """一张表：每种做法的 token/s 和相对不带缓存的倍数；返回 {名字: token/s}。"""
    rows = [("不带缓存（每步整段重算）", False, "prealloc", torch.float32),
            ("拼接缓存 concat", True, "concat", torch.float32),
            ("预分配缓存 prealloc", True, "prealloc", torch.float32)]
    # 另存一份 bf16 的：在原模型上 .to(bf16) 再 .float() 回来，fp32 的权重就被舍入过了
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    faster, t32, t16 = bf16_is_faster(model, model16, idx)
    print(f"   bf16 试 8 步：fp32 {t32:.2f} 秒，bf16 {t16:.2f} 秒 → "
          + ("bf16 更快，表里加上 bf16 的两行" if faster else "本机 bf16 不更快，只测 fp32"))
    if faster:
        rows += [("不带缓存 bf16", False, "prealloc", torch.bfloat16),
                 ("预分配缓存 bf16", True, "prealloc", torch.bfloat16)]
    reference, speeds = None, {}
    # 中文字符在终端里占两格：按显示宽度补空格，列才对得齐
    left = lambda text, width: text + " " * (width - sum(1 + (ord(ch) > 0x2E80) for ch in text))
    print("\n   " + left("做法", 28) + f"{'秒':>8}{'token/s':>10}{'倍数':>7}    缓存/词")
    for name, use_cache, kind, dtype in rows:
        out, seconds = timed_generate(model if dtype == torch.float32 else model16, idx, new_tokens,
                                      use_cache, kind)
        if dtype == torch.float32:  # 同一精度下三种做法的输出必须逐词相同
            reference = out if reference is None else reference
            assert torch.equal(out, reference), "带缓存和不带缓存的输出不一样：缓存有 bug"
        speeds[name] = new_tokens / seconds
        # 倍数：相对同一精度下不带缓存的那一行
        base = speeds["不带缓存（每步整段重算）" if dtype == torch.float32 else "不带缓存 bf16"]
        # 每个词在缓存里占：K、V 各一份 × 层数 × 宽度 × 每个数的字节数（bf16 减半）
        size = 4 if dtype == torch.float32 else 2
        per_token = 2 * model.cfg["n_layers"] * model.cfg["emb_dim"] * size
        memory = f"{per_token / 1024:.0f} KB" if use_cache else "—"
        print("   " + left(name, 28) + f"{seconds:>9.2f}{speeds[name]:>10.1f}"
              f"{speeds[name] / base:>8.1f}×  {memory:>8}", flush=True)
    return speeds


# ===== 5. 主程序 =====
DEFAULTS = {"model": "gpt2-small", "new_tokens": 200, "prompt_tokens": 50, "seed": 123}
QUICK = {"model": "tiny", "new_tokens": 40, "prompt_tokens": 20}


def make_settings(args):
    merged = dict(vars(args))
    for layer in (DEFAULTS, QUICK if args.quick else {},
                  {k: v for k, v in vars(args).items() if v is not None}):
        merged.update(layer)
    return argparse.Namespace(**merged)


def build_model(s, device):
    """--init random：GPT_CONFIGS[--model] 的随机权重（测速只看形状）；否则 load_init 载入检查点或 GPT-2。"""
    torch.manual_seed(s.seed)
    if s.init == "random":
        cfg = dict(GPT_CONFIGS[s.model], drop_rate=0.0)
        require_memory(model_bytes(cfg), device, "这个模型的参数")
        return GPTModel(cfg).to(device).eval()
    model, _, cfg = load_init(s.init, device)
    return model.eval()


def run_kvcache(s):
    t_start = time.perf_counter()
    device = resolve_device(s.device)
    model = build_model(s, device)
    cfg = model.cfg
    show_flops(cfg, s.prompt_tokens, s.new_tokens)
    if s.prompt_tokens + s.new_tokens > cfg["context_length"]:
        print(f"   提示词 + 新词超过上下文 {cfg['context_length']}：中途会跳一次窗口、重新预填充")
    generator = torch.Generator().manual_seed(s.seed)
    # 测速只看形状：随机 id 当提示词，和真实文字的计算量完全一样
    idx = torch.randint(0, cfg["vocab_size"], (1, s.prompt_tokens), generator=generator).to(device)
    print(f"\n2–4. 测速：{cfg['n_layers']} 层、宽 {cfg['emb_dim']}，{s.prompt_tokens} 个词的提示词，"
          f"贪心生成 {s.new_tokens} 个词（三种做法的输出先核对逐词相同）：")
    speeds = speed_table(model, idx, s.new_tokens, device)
    if s.compare_hf:
        compare_hf(cfg, idx, s.new_tokens, speeds)
    print(f"\n总用时 {time.perf_counter() - t_start:.0f} 秒")
    return speeds


INSTRUCT_CHECKPOINT = Path("runs/instruct/model.pt")  # 06_finetune_instruct.py 默认写出的模型
PRETRAINED = Path("runs/pretrain/ckpt.pt")  # 04_pretrain.py 默认写出的检查点


def run(args):
    s = make_settings(args)
    check_args(s)
    if s.serve:
        return serve(s)
    return run_kvcache(s)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as err:
        print(f"错误：{err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\n已中断。", file=sys.stderr)
        sys.exit(130)


# ===== 进阶：解码时的权重存法、命令行细节（第一次读可以跳过）=====
# 逐词解码时每个线性层只乘一行 x：这是矩阵-向量乘，时间几乎全花在把权重从内存读进来上。
# nn.Linear 把权重存成 (输出, 输入)、算 x·Wᵀ；实测 CPU 上同样的乘法换成 (输入, 输出) 的连续存法、算 x·W，
# GPT-2 small 的 12 个块从约 29 毫秒降到 24 毫秒，输出头（768 × 50257）从 14.8 降到 7.7 毫秒。
# 生成期间给每个 nn.Linear 备一份转置好的副本（多占一份权重的内存），结束后还原；数学上完全相同。

class decode_layout:
    """with decode_layout(model): 期间，模型里每个 nn.Linear 用 (输入, 输出) 存法的副本计算。只在 CPU 上启用。"""

    def __init__(self, model):
        self.linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self.enabled = next(model.parameters()).device.type == "cpu"

    def __enter__(self):
        if self.enabled:
            for lin in self.linears:
                # 转置一次要半秒（GPT-2 small）：存在模块上，权重没变（同一块内存、同一个版本号）就接着用
                key = (lin.weight.data_ptr(), lin.weight._version, lin.weight.dtype)
                if getattr(lin, "decode_key", None) != key:
                    lin.decode_weight, lin.decode_key = lin.weight.detach().t().contiguous(), key
                lin.forward = self.make_forward(lin.decode_weight, lin.bias)
        return self

    @staticmethod
    def make_forward(weight_t, bias):
        def forward(x):
            flat = x.reshape(-1, x.shape[-1])
            out = flat @ weight_t if bias is None else torch.addmm(bias, flat, weight_t)
            return out.view(*x.shape[:-1], weight_t.shape[1])
        return forward

    def __exit__(self, *exc):
        for lin in self.linears:
            lin.__dict__.pop("forward", None)  # 删掉实例上的 forward，回到 nn.Linear 自己的


def hf_tokens_per_second(cfg, idx, new_tokens, dtype):
    """对照：Hugging Face transformers 的 GPT2LMHeadModel.generate（同样的形状、随机权重、贪心、同样的提示词）。
    transformers 不是本项目的运行依赖：只有 --compare-hf 时才导入。"""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise UserError("--compare-hf 需要 transformers：pip install transformers") from None
    conf = GPT2Config(vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"],
                      n_embd=cfg["emb_dim"], n_layer=cfg["n_layers"], n_head=cfg["n_heads"])
    model = GPT2LMHeadModel(conf).eval().to(dtype)
    with torch.no_grad():
        model.generate(idx.cpu(), max_new_tokens=2, do_sample=False, pad_token_id=0)  # 热身
        t0 = time.perf_counter()
        # min_new_tokens：不许它提前遇到结束符就停，和本章一样生成满 new_tokens 个词
        model.generate(idx.cpu(), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)
    return new_tokens / (time.perf_counter() - t0)


def compare_hf(cfg, idx, new_tokens, speeds):
    print("\n对照 Hugging Face transformers 的 generate（同样的形状、提示词和新词数，贪心）：")
    for dtype, ours in ((torch.float32, "预分配缓存 prealloc"), (torch.bfloat16, "预分配缓存 bf16")):
        if ours not in speeds:
            continue
        hf = hf_tokens_per_second(cfg, idx, new_tokens, dtype)
        print(f"   {str(dtype).split('.')[-1]:<9} transformers {hf:6.1f} token/s，"
              f"本章 {speeds[ours]:6.1f} token/s，本章 / transformers = {speeds[ours] / hf:.2f}×",
              flush=True)


# ---- --serve：浏览器里的聊天页（只用标准库：http.server + Server-Sent Events）----
# GET / 返回一个自带 CSS/JS 的页面（不连任何 CDN，离线也能用）；POST /api/chat 收 JSON
# {"prompt", "temperature", "top_k", "top_p", "max_new_tokens"}，回一串 SSE 事件：每个新词一条
# data: {"id", "text"}，最后一条 data: {"done", "tokens", "seconds"}。同一时间只生成一个回答：
# 第二个请求直接得到 HTTP 503 和一句中文；浏览器断开（页面上的"停止"）时停止生成。

MAX_REQUEST_BYTES, MAX_SERVE_TOKENS = 64 * 1024, 512

CHAT_PAGE = """<!doctype html><html lang="zh"><head><meta charset="utf-8"><title>KV 缓存聊天</title>
<style>
body{font-family:sans-serif;max-width:760px;margin:2em auto;padding:0 1em}
#log div{margin:.6em 0;white-space:pre-wrap} .user{color:#05a} .bot{color:#333}
textarea{width:100%;height:4em} label{margin-right:1em} #speed{color:#888} input{width:4em}
</style></head><body><h2>KV 缓存聊天（09_kvcache.py）</h2><div id="log"></div>
<textarea id="q" placeholder="输入问题，回车发送"></textarea><div>
<label>temperature <input id="t" type="number" value="0.7" step="0.1" min="0" max="5"></label>
<label>top-k <input id="k" type="number" value="40" min="0"></label>
<label>top-p <input id="p" type="number" value="0.95" step="0.05" min="0" max="1"></label>
<label>最多 <input id="n" type="number" value="120" min="1" max="512"> 个词</label>
<button id="send">发送</button> <button id="stop" disabled>停止</button> <span id="speed"></span>
</div>
<script>
const $ = id => document.getElementById(id); let ctrl = null;
function line(cls, text) {
  const d = document.createElement("div"); d.className = cls; d.textContent = text;
  $("log").appendChild(d); return d;
}
function onEvent(ev, bot) {  // 一条 SSE 事件：一个新词，或最后的统计
  if (ev.text !== undefined) bot.textContent += ev.text;
  if (ev.done) $("speed").textContent =
    ev.tokens + " 个词，" + (ev.tokens / ev.seconds).toFixed(1) + " token/s";
}
async function send() {
  const prompt = $("q").value.trim(); if (!prompt || ctrl) return;
  line("user", "你：" + prompt); $("q").value = ""; const bot = line("bot", "模型：");
  ctrl = new AbortController(); $("stop").disabled = false; $("send").disabled = true;
  const body = {prompt, temperature: +$("t").value, top_k: +$("k").value, top_p: +$("p").value,
                max_new_tokens: +$("n").value};
  try {
    const r = await fetch("/api/chat", {method: "POST", body: JSON.stringify(body),
      signal: ctrl.signal, headers: {"Content-Type": "application/json"}});
    if (!r.ok) { bot.textContent += "（" + (await r.json()).error + "）"; return; }
    const reader = r.body.getReader(), dec = new TextDecoder(); let buf = "";
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;  // 每条事件是 "data: {...}" 加一个空行
      while ((i = buf.indexOf("\\n\\n")) >= 0) {
        onEvent(JSON.parse(buf.slice(6, i)), bot); buf = buf.slice(i + 2);
      }
    }
  } catch (e) { if (e.name !== "AbortError") bot.textContent += "（出错：" + e + "）"; }
  finally { ctrl = null; $("stop").disabled = true; $("send").disabled = false; }
}
$("send").onclick = send; $("stop").onclick = () => ctrl && ctrl.abort();
$("q").addEventListener("keydown", e => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
</script></body></html>"""


def parse_chat_request(raw):
    """请求体 → 生成参数；不合法就抛 ValueError（中文说明），由处理函数回 HTTP 400。"""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("请求体不是 JSON") from None
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("需要一个非空的字符串字段 prompt")
    out = {"prompt": body["prompt"]}
    fields = (("temperature", float, 0, 5, 0.0), ("top_k", int, 0, 100_000, 0),
              ("top_p", float, 0, 1, 1.0), ("max_new_tokens", int, 1, MAX_SERVE_TOKENS, 100))
    for key, kind, low, high, default in fields:
        value = body.get(key, default)
        # bool 也是 int 的子类：true/false 不算数；NaN 与任何数比较都是 False，要单独挡
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and low <= value <= high):
            raise ValueError(f"{key} 应是 {low} 到 {high} 之间的数")
        out[key] = kind(value)
    return out


class ChatServer:
    """一个模型、一把锁：同一时间只生成一个回答。prompt_style 不是 None 时按 06 的模板包装提示词。"""

    def __init__(self, model, tokenizer, prompt_style=None):
        self.model, self.tokenizer, self.prompt_style = model, tokenizer, prompt_style
        self.lock = threading.Lock()

    def prompt_ids(self, prompt):
        text = prompt  # 04 的模型：直接续写；06 的指令模型：按它训练时的模板包装
        if self.prompt_style:
            text = format_prompt({"instruction": prompt, "input": ""}, self.prompt_style)
        ids = self.tokenizer.encode_ordinary(text)
        return ids[-(self.model.cfg["context_length"] // 2):]  # 太长就只留结尾

    def stream(self, req):
        """按请求生成，每个新词交出 (id, 新增的文字)。多字节的汉字可能跨两个词：凑齐了才交出文字。"""
        device = next(self.model.parameters()).device
        idx = torch.tensor([self.prompt_ids(req["prompt"])], device=device)
        top_k = req["top_k"] or None  # 页面上的 0 表示不截断
        top_p = req["top_p"] if req["top_p"] < 1 else None
        steps = decode_steps(self.model, idx, req["max_new_tokens"], req["temperature"], top_k,
                             top_p, self.tokenizer.eot_token)
        new, shown = [], ""
        for out in steps:
            token = out[0, -1].item()
            if token == self.tokenizer.eot_token:
                break
            new.append(token)
            text = self.tokenizer.decode([t for t in new if t < self.tokenizer.n_vocab])
            delta, shown = (text[len(shown):], text) if not text.endswith("\ufffd") else ("", shown)
            yield token, delta

    def handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # 安静：每个请求一行日志会淹没终端里的进度
                pass

            def send_json(self, status, payload):
                data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/favicon.ico":  # 浏览器总会来要图标：回"没有内容"，控制台里就不报错
                    self.send_response(204)
                    return self.end_headers()
                if self.path not in ("/", "/index.html"):
                    return self.send_json(404, {"error": "没有这个页面"})
                data = CHAT_PAGE.encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                if self.path != "/api/chat":
                    return self.send_json(404, {"error": "没有这个接口"})
                try:
                    size = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    size = -1
                if not 0 < size <= MAX_REQUEST_BYTES:
                    return self.send_json(400, {"error": f"请求体应在 1 到 {MAX_REQUEST_BYTES} 字节之间"})
                try:
                    req = parse_chat_request(self.rfile.read(size))
                except ValueError as err:
                    return self.send_json(400, {"error": str(err)})
                if not server.lock.acquire(blocking=False):
                    return self.send_json(503, {"error": "正在为另一个请求生成回答，请稍后再试"})
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                    self.send_header("Cache-Control", "no-cache")
                    self.end_headers()
                    t0, count = time.perf_counter(), 0
                    for token, text in server.stream(req):
                        count += 1
                        self.event({"id": token, "text": text})
                    seconds = round(time.perf_counter() - t0, 3)
                    self.event({"done": True, "tokens": count, "seconds": seconds})
                except (BrokenPipeError, ConnectionResetError):
                    pass  # 浏览器断开了：生成器随之关闭，停止生成
                finally:
                    server.lock.release()

            def event(self, payload):
                # SSE 的格式：一行 "data: …"，一个空行结束一条事件；flush 让浏览器立刻收到
                line = f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
                self.wfile.write(line.encode("utf-8"))
                self.wfile.flush()

        return Handler


def make_server(model, tokenizer, prompt_style=None, port=8000, host="127.0.0.1"):
    handler = ChatServer(model, tokenizer, prompt_style).handler()
    return http.server.ThreadingHTTPServer((host, port), handler)


def serve(s):
    """--serve：载入模型（06 的指令模型 > 04 的检查点 > --init），在 127.0.0.1 上提供聊天页，Ctrl-C 退出。"""
    device = resolve_device(s.device)
    init = s.init
    if init == "random":
        init = next((str(p) for p in (INSTRUCT_CHECKPOINT, PRETRAINED) if p.is_file()), "random")
    torch.manual_seed(s.seed)
    model, tokenizer, cfg = load_init(init, device, "mini")
    style = cfg.get("prompt_style")
    print(f"模型：{init}（{'按 06 的 ' + style + ' 模板包装提示词' if style else '直接续写提示词'}）"
          + ("——随机权重只会胡言乱语：先运行 04 或 06，或用 --init gpt2" if init == "random" else ""))
    try:
        server = make_server(model.eval(), tokenizer, style, s.port)
    except OSError as err:
        raise UserError(f"无法在 127.0.0.1:{s.port} 上监听（{type(err).__name__}）；换一个 --port 试试") from None
    print(f"打开 http://127.0.0.1:{server.server_address[1]}/ 开始聊天；Ctrl-C 退出", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\n已停止。")
    finally:
        server.server_close()


# ---- 命令行 ----
def build_parser():
    p = ArgParser(description="KV 缓存：带缓存与不带缓存的生成，输出逐词相同，速度差很多")
    p.add_argument("--model", choices=list(GPT_CONFIGS),
                   help="随机权重的尺寸（默认 gpt2-small，--quick 时 tiny）")
    p.add_argument("--init", default="random",
                   help="random（默认：测速只看形状）；一个 *.pt 检查点（04、06 写出的）；gpt2 等 GPT-2 权重")
    for flag, kind, text in (("--new-tokens", int, "生成多少个新词"), ("--prompt-tokens", int, "提示词多少个词"),
                             ("--seed", int, "随机种子")):
        key = flag[2:].replace("-", "_")
        quick = f"，--quick 时 {QUICK[key]}" if key in QUICK else ""
        p.add_argument(flag, type=kind, help=f"{text}（默认 {DEFAULTS[key]}{quick}）")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="计算设备，auto = cuda > mps > cpu")
    p.add_argument("--compare-hf", action="store_true",
                   help="再测一遍 Hugging Face transformers 的 generate 作对照"
                        "（需要 pip install transformers）")
    p.add_argument("--serve", action="store_true",
                   help=f"浏览器里的聊天页：有 {INSTRUCT_CHECKPOINT} 就用 06 的指令模型，否则 {PRETRAINED}，否则 --init")
    p.add_argument("--port", type=int, default=8000, help="--serve 的端口（默认 8000，只监听 127.0.0.1）")
    p.add_argument("--quick", action="store_true", help="冒烟测试：tiny 尺寸，生成 40 个词")
    return p


def check_args(s):
    limits = {"new_tokens": (1, 100_000), "prompt_tokens": (1, 100_000), "seed": (0, 2**32 - 1),
              "port": (0, 65535)}
    for key, (low, high) in limits.items():
        check_range(f"--{key.replace('_', '-')}", getattr(s, key), low, high)


# ===== 附录：前几章的部件（逐字复制，读过前几章可以跳过）=====
# 放在文件末尾，是为了让本章从第 1 节就讲新东西；Python 在调用时才查找这些名字，
# 所以定义写在后面也没关系。

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


ALPACA_HEAD = "下面是一条指令，请写出回答。\n\n"


def format_prompt(entry, style="alpaca"):
    """一条数据 → 提示词（回答之前的部分）。模型学的是：看到提示词，接着写出 output 和结束符。"""
    if style == "phi3":
        # Phi-3 的对话格式：更短，用 <|user|>、<|assistant|> 标出谁在说话（这里它们只是普通文字）
        text = entry["instruction"] + (f"\n{entry['input']}" if entry["input"] else "")
        return f"<|user|>\n{text}\n<|assistant|>\n"
    text = f"{ALPACA_HEAD}### 指令：\n{entry['instruction']}"
    # 没有 input 的条目就不写"### 输入："这一段：空的小标题只会浪费 token
    if entry["input"]:
        text += f"\n\n### 输入：\n{entry['input']}"
    return text + "\n\n### 回答：\n"


MODEL_SIZES = {
    "tiny": dict(emb_dim=64, n_layers=2, n_heads=2, context_length=64),
    "mini": dict(emb_dim=128, n_layers=2, n_heads=4, context_length=64),
    # GPT-2 的四个官方尺寸：从零训练它们需要 GPU 和大语料，用 --data 指向你的语料
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12, context_length=1024),
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16, context_length=1024),
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20, context_length=1024),
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25, context_length=1024),
}


def model_config(size="mini", drop_rate=0.0, use_sdpa=True, **dims):
    """MODEL_SIZES 的一个预设，再用显式给出的维度（emb_dim、n_layers、n_heads、context_length）
    覆盖，None 表示不覆盖。不含 vocab_size：词表大小跟着分词器走。"""
    cfg = dict(MODEL_SIZES[size], drop_rate=drop_rate, qkv_bias=False, use_sdpa=use_sdpa)
    # 命令行里显式给出的维度优先：方便在同一个预设上只改层数或宽度做对比
    cfg.update({key: value for key, value in dims.items() if value is not None})
    return cfg


def load_checkpoint(path):
    if not Path(path).is_file():
        raise UserError(f"找不到检查点 {path}（先训练一次，或检查 --out-dir）")
    try:
        # weights_only=True：只反序列化张量和基本类型，不执行文件里的任意代码
        # map_location="cpu"：在 GPU 上存的检查点也能在只有 CPU 的机器上打开
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # 截断的 zip、随便什么字节……底层的英文报错帮不上读者，只报类型
        raise UserError(f"检查点 {path} 已损坏或不是本脚本写出的文件（{type(err).__name__}）"
                        ) from None
    if not isinstance(ckpt, dict) or not {"config", "model", "tokenizer"} <= ckpt.keys():
        raise UserError(f"{path} 不是本脚本写出的检查点（缺少 config、model 或 tokenizer）")
    return ckpt


def model_from_checkpoint(ckpt):
    try:
        model = GPTModel(ckpt["config"])
        # 严格匹配：少一个键、多一个键或形状不同都会报错，而不是悄悄载入一半
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"检查点与模型结构不匹配（{type(err).__name__}）") from None
    return model


def load_init(init, device, config="mini"):
    """一个函数载入三种起点，返回 (model, tokenizer, config)；后面各章逐字复制它、一行调用：
    - "random"：随机初始化（调用前先 torch.manual_seed）+ 项目分词器；
      config 是 MODEL_SIZES 里的名字或一份完整的配置（vocab_size 总是取分词器的）
    - 本章写出的检查点（*.pt）：模型 + 检查点里记录的分词器
    - GPT-2 的名字（gpt2、gpt2-medium……，自动下载）或含 config.json 与 *.safetensors 的目录
    config["vocab_size"] 可能比 tokenizer.n_vocab 大（补齐到 64 的倍数）：采样时只看前 n_vocab 个。"""
    device = torch.device(device)
    if init == "random":
        tokenizer = load_project_tokenizer()
        config = dict(model_config(config) if isinstance(config, str) else config,
                      vocab_size=tokenizer.n_vocab)
        # 先按配置算出要多少字节：放不下就不建，而不是等系统把进程杀掉
        require_memory(model_bytes(config), device, "这个模型的参数")
        model = GPTModel(config)
    elif init.endswith(".pt") or Path(init).is_file():
        ckpt = load_checkpoint(init)
        tokenizer, model = tokenizer_from_record(ckpt["tokenizer"]), model_from_checkpoint(ckpt)
    else:
        model, _ = load_gpt2_hf(init)
        tokenizer = get_gpt2_tokenizer()
        require_memory(model_bytes(model.cfg), device, f"{init} 的参数")
        # 载入的参数是内存映射上的视图：复制成普通的连续张量，训练时才能原地更新（共享的参数只复制一次）
        for param in model.parameters():
            param.data = param.data.clone()
    return model.to(device), tokenizer, model.cfg


def require_memory(need, device, what):
    """need 字节放不进 device 此刻的空闲内存时，在分配之前用一行中文拒绝。"""
    # 查不到空闲内存的系统（非 Linux 的 CPU）按 64 GB 的宽松上限算：挡住离谱的设置，不误拒正常的
    free = free_memory_bytes(device)
    free = 64 * 2**30 if free is None else free
    if need > free:
        raise UserError(f"{what}约需 {need / 2**30:.1f} GB 内存，{device.type} 上此刻只剩约 "
                        f"{free / 2**30:.1f} GB：请换小一点的模型或设置")


def param_count(cfg):
    """按配置算出 GPTModel 的参数个数，不必真的建模型（测试里与建出的模型逐个核对过）。"""
    d = cfg["emb_dim"]
    # 每个块：Q/K/V 与输出投影 4d²、前馈 8d²；偏置与两个 LayerNorm 共 10d（Q/K/V 带偏置再加 3d）
    block = 12 * d * d + (13 if cfg["qkv_bias"] else 10) * d
    # 词嵌入与输出头各 V·d（共享时只算一份，这里按不共享估：宁多勿少）、位置嵌入 T·d、最后的 LayerNorm
    return cfg["n_layers"] * block + (2 * cfg["vocab_size"] + cfg["context_length"] + 2) * d


def model_bytes(cfg):
    # fp32 参数每个 4 字节；每层还有一个 上下文² 的布尔因果掩码（每格 1 字节）
    return 4 * param_count(cfg) + cfg["n_layers"] * cfg["context_length"] ** 2


def tokenizer_from_record(record):
    # 项目分词器整份存在检查点里：即使 data/tokenizer.json 之后被重新训练，旧检查点也能正确解码
    try:
        if record["kind"] == "gpt2":
            return get_gpt2_tokenizer()
        ranks = {base64.b64decode(tok): rank for rank, tok in enumerate(record["mergeable_ranks"])}
        return tiktoken.Encoding(name=record["name"], pat_str=record["pat_str"],
                                 mergeable_ranks=ranks, special_tokens=record["special_tokens"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"检查点里记录的分词器已损坏（{type(err).__name__}）") from None


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


class LayerNorm(nn.Module):
    """层归一化：把每个词向量的各维减均值、除标准差，再学一个缩放 scale 和平移 shift。"""

    def __init__(self, emb_dim, eps=1e-5):
        super().__init__()
        self.eps = eps  # 防止方差为 0 时除以 0
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        # 与 03 的手写公式完全相同，只是交给 F.layer_norm 一个融合内核完成（训练快约三成）
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GELU 的 tanh 近似（GPT-2 训练时用的就是它）：x·Φ(x) 的一个便宜的光滑近似。"""

    def forward(self, x):
        # 03 里手写的 tanh 近似公式，这里交给一个融合内核（数值一致，省去一串逐元素运算）
        return F.gelu(x, approximate="tanh")


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


def build_on_meta(cfg):
    """在 meta 设备上建模型：张量只有形状、没有数据，数 15 亿个参数也不占内存、不花时间。"""
    with torch.device("meta"):
        return GPTModel(cfg)


HF_REPOS = {name: f"openai-community/{name}"
            for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}


MODELS_DIR = Path(__file__).resolve().parent / "models"


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


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


MAX_HEADER_BYTES = 100 * 2**20  # 正常的头只有几十 KB；大得离谱说明文件坏了


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


if __name__ == "__main__":
    main()
