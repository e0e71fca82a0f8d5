"""02_attention.py — 从零编写注意力机制
本章你会学到：
  1. 不带权重的自注意力：点积打分 → softmax → 加权求和，再用矩阵乘法一次算完所有词；
  2. 带可训练权重的缩放点积注意力，以及为什么要除以 √d_k；
  3. 因果掩码（为什么用 -inf 且在 softmax 之前）、注意力 dropout、掩码为什么注册成 buffer；
  4. 多头注意力：逐头包装版与 view/transpose 高效版，权重摆法相同时结果相同；
  5. 同一个因果多头注意力的 7 种等价写法（合并 QKV、einsum、SDPA、nn.MultiheadAttention……，
     设备支持时再加 FlexAttention），逐一与参考对齐，并比较前向/反向速度。
运行：python 02_attention.py               # 默认：2 核 CPU 约 15 秒
      python 02_attention.py --quick       # 冒烟：2 核 CPU 约 3 秒
      python 02_attention.py --bench-size  # 8×1024×768、12 头：2 核 CPU 约 10 分钟，建议用 GPU
"""
import argparse
import functools
import math
import sys
import time
import unicodedata
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # FlexAttention 是 torch 2.5 才有的新接口；旧版本没有就跳过这个变体
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    create_block_mask = flex_attention = None

# 本章用到的 UserError、ArgParser、check_range、resolve_device 来自 01，见文末附录；
# FlexAttention 与基准测试的计时细节在文末的进阶节。


# ===== 1. 不带权重的简化自注意力 =====
# 玩具句子"小猫在窗台上晒太阳"切成 6 个词。每个词配一个手挑的 3 维向量，
# 三维大致表示 [像动物, 像位置, 像阳光/温暖]，这样打分结果能看出"语义"。
TOKENS = ["小猫", "在", "窗台", "上", "晒", "太阳"]
EMBEDDINGS = [
    [0.9, 0.1, 0.3],  # 小猫
    [0.1, 0.6, 0.1],  # 在
    [0.2, 0.9, 0.4],  # 窗台
    [0.1, 0.7, 0.2],  # 上
    [0.4, 0.2, 0.8],  # 晒
    [0.2, 0.3, 1.0],  # 太阳
]
QUERY_INDEX = 4  # 以"晒"为例逐步演示：它应该最关注"太阳"


def show(title, tensor, labels=None, digits=2):
    """紧凑地打印一个小张量：一行一个向量，可选地在行首标上词。"""
    # 任意形状都摊平成 (行数, 最后一维)：一维向量恰好一行，(b, T, d) 就逐行列出
    rows = tensor.detach().float().reshape(-1, tensor.shape[-1]).tolist()
    print(f"  {title}")
    for i, row in enumerate(rows):
        head = display_pad(labels[i], 4) if labels else "    "
        print(f"  {head} [" + ", ".join(f"{v:6.{digits}f}" for v in row) + "]")


def display_pad(text, width):
    """按终端显示宽度补空格：一个汉字占两格。"""
    # len() 只数字符个数；汉字在终端里占两列（宽度类别 W/F），不这样算中文标签就对不齐
    shown = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
    return text + " " * max(width - shown, 0)


def simple_attention(inputs):
    """一次算完所有词：分数 = X·Xᵀ（两两点积），按行 softmax，再用权重对 X 加权求和。"""
    scores = inputs @ inputs.T            # (num_tokens, num_tokens)
    weights = torch.softmax(scores, dim=-1)
    # (T, T) @ (T, d) → (T, d)：第 i 行就是第 i 个词的上下文向量
    return scores, weights, weights @ inputs


def demo_simple_attention():
    inputs = torch.tensor(EMBEDDINGS)
    # inputs: (6, 3)，每行一个词向量；query: (3,)，即“晒”的向量
    query = inputs[QUERY_INDEX]
    print(f"句子：{' | '.join(TOKENS)}；以 “{TOKENS[QUERY_INDEX]}” 为查询")
    # 点积越大，两个向量方向越接近，说明这两个词越“相关”
    scores = inputs @ query
    show("注意力分数（与每个词的点积）", scores)
    # softmax 把分数变成和为 1 的正权重；手写版与 torch.softmax 相同
    # 手写版在分数很大时 exp 会溢出成 inf；torch.softmax 内部先减去最大值，数值更稳
    naive = torch.exp(scores) / torch.exp(scores).sum()
    weights = torch.softmax(scores, dim=0)
    show(f"注意力权重（和={weights.sum():.4f}，手写 softmax 最大差 "
         f"{(naive - weights).abs().max():.1e}）", weights)
    context = weights @ inputs  # 上下文向量 = 所有词向量按权重的加权和
    show("上下文向量", context)
    # 把上面对一个查询的三步换成矩阵乘法，6 个词同时当查询：第 5 行应与上面逐步算的相同
    _, all_weights, all_context = simple_attention(inputs)
    show("矩阵一次算完：所有词的注意力权重（每行和为 1）", all_weights, TOKENS)
    same = torch.allclose(all_context[QUERY_INDEX], context)
    print(f"  矩阵版“{TOKENS[QUERY_INDEX]}”那一行与上面逐步算出的上下文向量一致：{same}")


# ===== 2. 带可训练权重的自注意力 =====
# 直接用词向量点积，"相关"的定义就被固定死了。引入三个可学习矩阵：
# 查询 q = x·W_q（我在找什么）、键 k = x·W_k（我能被怎样找到）、值 v = x·W_v（我提供什么内容）。
class SelfAttentionV1(nn.Module):
    """用 nn.Parameter 手写权重矩阵，形状 (d_in, d_out)，计算 x @ W。"""

    def __init__(self, d_in, d_out):
        super().__init__()
        # torch.rand 是 [0, 1) 均匀分布，只为演示；实际训练用 nn.Linear 自带的初始化（见 V2）
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x):
        # (num_tokens, d_in) @ (d_in, d_out) → (num_tokens, d_out)，三个投影各算一次
        queries, keys, values = x @ self.W_query, x @ self.W_key, x @ self.W_value
        # (T, d_out) @ (d_out, T) → (T, T)：第 i 行是第 i 个查询对所有键的分数
        scores = queries @ keys.T
        # 除以 √d_k：让分数的方差不随维度增长，softmax 不至于饱和（见 demo_why_sqrt_dk）
        weights = torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)
        # 加权求和的是值 v 而不是键 k：键只负责“被匹配”，值才是要取走的内容
        return weights @ values


class SelfAttentionV2(nn.Module):
    """用 nn.Linear：初始化更合理，还能选偏置。注意它的 weight 形状是 (d_out, d_in)，算的是 x @ Wᵀ。"""

    def __init__(self, d_in, d_out, qkv_bias=False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x):
        # 输入仍是一句话 (num_tokens, d_in)，所以能用 .T；带批次维后要改成 transpose(1, 2)
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)
        scores = queries @ keys.T
        weights = torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)
        return weights @ values


def copy_v2_into_v1(v2, v1):
    """把 V2 的 Linear 权重转置后放进 V1：(d_out, d_in) → (d_in, d_out)。"""
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value"):
            getattr(v1, name).copy_(getattr(v2, name).weight.T)


def demo_trainable_attention():
    inputs = torch.tensor(EMBEDDINGS)
    sa_v2 = SelfAttentionV2(d_in=3, d_out=2)
    # 只演示一个查询：q 是 (2,)；所有词的 k、v 各是 (6, 2)
    query = sa_v2.W_query(inputs[QUERY_INDEX])
    keys, values = sa_v2.W_key(inputs), sa_v2.W_value(inputs)
    show(f"“{TOKENS[QUERY_INDEX]}”的查询向量 q（3 维投影到 2 维）", query, digits=3)
    # (6, 2) @ (2,) → (6,)：每个键得到一个分数
    scores = keys @ query
    show("分数 q·k", scores, digits=3)
    weights = torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)
    # 权重还很平均：W 是随机初始化的，"谁和谁相关"要靠训练才学得出来
    show("除以 √d_k 后 softmax 的权重", weights, digits=3)
    show("上下文向量（对 v 加权求和）", weights @ values, digits=3)
    # V1、V2 是同一个函数的两种写法：只要权重摆法对上，输出只剩 1e-7 级的浮点误差
    sa_v1 = SelfAttentionV1(d_in=3, d_out=2)
    copy_v2_into_v1(sa_v2, sa_v1)
    diff = (sa_v1(inputs) - sa_v2(inputs)).abs().max()
    print(f"  V1(nn.Parameter) 与 V2(nn.Linear) 复制权重后输出最大差：{diff:.1e}")


def demo_why_sqrt_dk(d_k=512, num_keys=6, trials=200):
    # q、k 各分量独立、方差 1 时，q·k 是 d_k 项之和，方差为 d_k；不缩放的话
    # softmax 几乎是 one-hot，梯度接近 0，训练学不动。除以 √d_k 把方差拉回 1。
    q, k = torch.randn(trials, 1, d_k), torch.randn(trials, num_keys, d_k)
    # (trials, 1, d_k) @ (trials, d_k, num_keys) → (trials, 1, num_keys)，去掉中间的 1
    scores = (q @ k.transpose(1, 2)).squeeze(1)
    for label, s in (("不缩放", scores), ("÷√d_k", scores / math.sqrt(d_k))):
        # 每行最大权重的平均：越接近 1，softmax 越像 one-hot，说明已经饱和
        top = torch.softmax(s, dim=-1).max(dim=-1).values.mean()
        print(f"  d_k={d_k}，{label}：分数标准差 {s.std():6.2f}，最大权重平均 {top:.3f}")


# ===== 3. 因果注意力 =====
# 语言模型按顺序预测下一个词，第 i 个位置不能偷看 i 之后的词。
# 做法：在 softmax 之前把"未来"位置的分数设为 -inf，exp(-inf)=0，权重自然为 0 且每行仍和为 1。
class CausalAttention(nn.Module):
    """单头因果自注意力，输入带批次维 (b, num_tokens, d_in)。"""

    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # 上三角（不含对角线）为 True 的位置就是"未来"，要被遮住
        # 按最大长度 context_length 一次建好；布尔类型每个元素只占 1 字节
        mask = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        num_tokens = x.shape[1]
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)
        # 有批次维：(b, T, d_out) @ (b, d_out, T) → (b, T, T)；.T 会把批次维也翻转，所以用 transpose
        scores = queries @ keys.transpose(1, 2) / keys.shape[-1] ** 0.5
        # 掩码按最大长度建好，按当前长度切出左上角即可
        scores = scores.masked_fill(self.mask[:num_tokens, :num_tokens], float("-inf"))
        # 先 softmax 再 dropout：被丢掉的是“看某个词”的权重，而不是输入本身
        weights = self.dropout(torch.softmax(scores, dim=-1))
        # (b, T, T) @ (b, T, d_out) → (b, T, d_out)
        return weights @ values


def demo_causal_mask():
    inputs = torch.tensor(EMBEDDINGS)
    ca = CausalAttention(d_in=3, d_out=2, context_length=len(TOKENS), dropout=0.0)
    # 手动重走 forward 的前半段（不带批次维），好把掩码前后的中间结果打印出来
    queries, keys = ca.W_query(inputs), ca.W_key(inputs)
    scores = queries @ keys.T / keys.shape[-1] ** 0.5
    masked = scores.masked_fill(ca.mask, float("-inf"))
    show("掩码后的分数（上三角为 -inf）", masked, TOKENS)
    weights = torch.softmax(masked, dim=-1)
    show("因果注意力权重（每个词只看自己和之前的词）", weights, TOKENS)
    # 另一种做法：先对全部分数 softmax，再把未来位置清零、按行重新归一化。数学上相同：
    # ~mask 把“未来”取反成“可见”；布尔与浮点相乘时 True 当 1、False 当 0
    renorm = torch.softmax(scores, dim=-1) * ~ca.mask
    renorm = renorm / renorm.sum(dim=-1, keepdim=True)
    print(f"  先 softmax 再掩码并重新归一化，与 -inf 掩码最大差：{(renorm - weights).abs().max():.1e}")
    # 模块要求带批次维：unsqueeze(0) 把 (6, 3) 变成 (1, 6, 3)
    show("CausalAttention 的输出（上下文向量）", ca(inputs.unsqueeze(0)), TOKENS, digits=3)


def demo_mask_after_softmax():
    # 既然结果相同，为什么不"先 softmax 后掩码"？
    # ① 多算一遍无用的 exp 与归一化；② 未来词的分数参与了 softmax 的分母，
    #    数值上仍会影响过去：未来分数很大时，可见位置的 exp 下溢成 0，重新归一化变成 0/0。
    scores = torch.tensor([[2.0, 1.0, 150.0]])  # 第 3 个是"未来"位置，分数极大
    future = torch.tensor([[False, False, True]])
    # exp(2-150) 在 float32 里下溢成 0：可见的两项全是 0，重新归一化就是 0/0 = nan
    after = torch.softmax(scores, dim=-1).masked_fill(future, 0.0)
    after = after / after.sum(dim=-1, keepdim=True)
    # 先掩码：未来位置根本不进分母，结果就是 softmax([2, 1]) 补一个 0
    before = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    print(f"  极端分数 {scores.tolist()[0]}：先 softmax 后掩码 → {after.tolist()[0]}；"
          f"-inf 先掩码 → {[round(v, 4) for v in before.tolist()[0]]}")


def demo_dropout():
    # dropout 随机把注意力权重置 0，剩下的乘以 1/(1-p)，保证期望不变；只在训练时生效。
    # 它让模型不能总依赖某几个位置（GPT-2 这类大模型预训练时常设为 0 或很小）
    # 新建的模块默认处于训练模式，所以下面第一次调用时 dropout 会生效
    dropout = nn.Dropout(0.5)
    weights = torch.full((1, 6), 1 / 6)
    show("训练模式 dropout(p=0.5) 作用于均匀权重 1/6：约一半变 0，其余 ×2", dropout(weights))
    dropout.eval()
    print(f"  eval 模式下 dropout 什么也不做：{torch.equal(dropout(weights), weights)}")


def demo_buffer(device):
    # 掩码不是要学习的参数，但它得跟着模型走：
    # 普通张量属性不会随 .to(...) 移动，GPU 上一算就报"设备不一致"；
    # register_buffer 会随 .to() 移动；persistent=False 让它不进 state_dict（可随时重建，省空间）。
    mask = torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1)
    demos = {"普通属性": nn.Module(), "buffer persistent=True": nn.Module(),
             "buffer persistent=False": nn.Module()}
    demos["普通属性"].mask = mask
    demos["buffer persistent=True"].register_buffer("mask", mask, persistent=True)
    demos["buffer persistent=False"].register_buffer("mask", mask, persistent=False)
    # 没有 GPU 时用 meta 设备（只有形状没有数据的"假设备"）演示同样的移动
    target = device if device.type != "cpu" else torch.device("meta")
    for name, module in demos.items():
        module.to(target)
        keys = str(list(module.state_dict()))
        print(f"  {display_pad(name, 24)} state_dict 键：{keys:<10} "
              f".to({target.type}) 后掩码在：{module.mask.device.type}")
    ca = CausalAttention(3, 2, context_length=4, dropout=0.0).to(torch.float64)
    # .to(dtype) 只转换浮点张量：权重变 float64，布尔掩码保持 bool（本来也不该变）
    print(f"  .to(torch.float64) 后：权重 {ca.W_query.weight.dtype}，掩码 {ca.mask.dtype}")


# ===== 4. 多头注意力 =====
# 一个头只能学一种"相关"的方式；多个头并行，各自在低维子空间里关注不同的关系，
# 最后把各头结果拼起来，再经过输出投影 out_proj 混合。
class MultiHeadAttentionWrapper(nn.Module):
    """逐头包装：num_heads 个 CausalAttention 依次运行，结果拼接后做输出投影。
    输出投影 out_proj 是为了与高效版算同一个函数；每个头的维度是 d_out // num_heads。"""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out 必须能被 num_heads 整除"
        # 每个头把 d_in 投影到 head_dim，拼起来正好 d_out：总参数量与一个 d_out 的大头相同
        head_dim = d_out // num_heads
        # 用 nn.ModuleList 而不是普通 list：各头的参数才会被注册、随 .to() 移动、进 state_dict
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, head_dim, context_length, dropout, qkv_bias)
             for _ in range(num_heads)])
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(self, x):
        # 每个头输出 (b, T, head_dim)，沿最后一维拼成 (b, T, d_out)；各头依次计算，没有并行
        return self.out_proj(torch.cat([head(x) for head in self.heads], dim=-1))

    @torch.no_grad()
    def load_from(self, mha):
        """高效版的第 h 个头，就是 W_query 等矩阵输出维度上的第 h 段 head_dim 行。"""
        for h, head in enumerate(self.heads):
            # nn.Linear 的 weight 是 (d_out, d_in)，输出维在第 0 维，所以按行切
            rows = slice(h * mha.head_dim, (h + 1) * mha.head_dim)
            for name in ("W_query", "W_key", "W_value"):
                getattr(head, name).weight.copy_(getattr(mha, name).weight[rows])
                if getattr(mha, name).bias is not None:
                    getattr(head, name).bias.copy_(getattr(mha, name).bias[rows])
        self.out_proj.load_state_dict(mha.out_proj.state_dict())


class MultiHeadAttention(nn.Module):
    """高效版因果多头注意力：一次投影算出所有头的 q、k、v，再用 view/transpose 拆头。"""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out 必须能被 num_heads 整除"
        self.d_out, self.num_heads = d_out, num_heads
        self.head_dim = d_out // num_heads
        # 不为每个头各建小 Linear：一个 d_in → d_out 的大投影一次算完所有头，输出再按头切开
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
        # (b, h, T, head_dim) @ (b, h, head_dim, T) → (b, h, T, T)：每个头一张分数表
        # 按 head_dim 而不是 d_out 缩放：每个头的点积只有 head_dim 项相加
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)
        # (T, T) 的掩码自动广播到 (b, h, T, T)：所有句子、所有头共用同一张
        scores = scores.masked_fill(self.mask[:num_tokens, :num_tokens], float("-inf"))
        context = self.dropout(torch.softmax(scores, dim=-1)) @ v
        # (b, num_heads, num_tokens, head_dim) -> (b, num_tokens, d_out)
        # transpose 之后内存不再连续，view 会报错，所以用 reshape（必要时它会复制一份）
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)


def copy_weights(src, dst):
    """把教学版 MultiHeadAttention 的权重按 dst 自己的布局搬过去，使二者算同一个函数。"""
    if isinstance(dst, MultiHeadAttention):
        dst.load_state_dict(src.state_dict())  # 同一布局（子类只换了 forward）
    else:
        dst.load_from(src)


def demo_multihead():
    # 两句相同的玩具句子组成批次：(b=2, num_tokens=6, d_in=3)
    batch = torch.stack([torch.tensor(EMBEDDINGS)] * 2)
    wrapper = MultiHeadAttentionWrapper(3, 4, len(TOKENS), 0.0, num_heads=2)
    mha = MultiHeadAttention(3, 4, len(TOKENS), 0.0, num_heads=2)
    b, t, _ = batch.shape
    # 手动拆一次头，只为打印形状：(2, 6, 4) → view (2, 6, 2, 2) → transpose (2, 2, 6, 2)
    q = mha.W_query(batch).view(b, t, mha.num_heads, mha.head_dim).transpose(1, 2)
    print(f"  输入 {tuple(batch.shape)} → 拆头后的 q {tuple(q.shape)}"
          f"（b, num_heads, num_tokens, head_dim）→ 输出 {tuple(mha(batch).shape)}")
    before = (wrapper(batch) - mha(batch)).abs().max()
    copy_weights(mha, wrapper)
    after = (wrapper(batch) - mha(batch)).abs().max()
    print(f"  包装版 vs 高效版 最大差：各自随机初始化 {before:.3f}，按头切分复制权重后 {after:.1e}")
    show("高效版输出（第 1 句）", mha(batch)[0], TOKENS, digits=3)


# ===== 5. 高效实现的变体 =====
# 下面每个类都计算同一个因果多头注意力（权重用 copy_weights 摆成相同），只是写法不同。
# 前四个把 (b, h, T, T) 的分数矩阵完整存进内存；SDPA 把"打分-掩码-softmax-加权"融合成
# 一个分块计算的内核（flash attention），不存整张分数矩阵，is_causal=True 时还能整块跳过未来位置。
# 第 8 种写法 FlexAttention 要较新的 torch，还得看设备支持，放在文末的进阶节。
def split_heads(mha, x):
    """用教学版布局的三个线性层算 q、k、v：(b, num_heads, num_tokens, head_dim)。"""
    b, num_tokens, _ = x.shape
    # view 把 d_out 拆成 (num_heads, head_dim)；transpose 把头提到 T 前面，各头就能批量计算
    return (w(x).view(b, num_tokens, mha.num_heads, mha.head_dim).transpose(1, 2)
            for w in (mha.W_query, mha.W_key, mha.W_value))


def merge_heads(mha, context):
    """(b, num_heads, num_tokens, head_dim) → (b, num_tokens, d_out)，再做输出投影。"""
    b, _, num_tokens, _ = context.shape
    # 先把头换回 T 后面，再把 (num_heads, head_dim) 摊平成 d_out；这正是“拼接各头”
    return mha.out_proj(context.transpose(1, 2).reshape(b, num_tokens, mha.d_out))


class CombinedQKVAttention(nn.Module):
    """合并 QKV 投影：一个 (3·d_out, d_in) 的线性层一次算出 q、k、v。
    三次小矩阵乘法变成一次大的，读一遍输入即可（GPT-2 原版的 c_attn 就是这种布局）。"""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        # 不继承 MultiHeadAttention：参数布局不同（一个 qkv 而非三个 W），state_dict 对不上
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        mask = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        b, num_tokens, _ = x.shape
        # (b, T, 3·d_out) -> (b, T, 3, h, head_dim) -> (3, b, h, T, head_dim)
        qkv = self.qkv(x).view(b, num_tokens, 3, self.num_heads, self.head_dim)
        # unbind(0) 沿第 0 维拆成 3 个视图，不复制数据；各是 (b, h, T, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(self.mask[:num_tokens, :num_tokens], float("-inf"))
        return merge_heads(self, self.dropout(torch.softmax(scores, dim=-1)) @ v)

    @torch.no_grad()
    def load_from(self, mha):
        """合并权重就是把 W_q、W_k、W_v 沿输出维依次摞起来。"""
        # cat 默认 dim=0 摞成 (3·d_out, d_in)；q、k、v 的先后要与 forward 里 view 的那个 3 一致
        self.qkv.weight.copy_(torch.cat([mha.W_query.weight, mha.W_key.weight,
                                         mha.W_value.weight]))
        if mha.W_query.bias is not None:
            self.qkv.bias.copy_(torch.cat([mha.W_query.bias, mha.W_key.bias, mha.W_value.bias]))
        self.out_proj.load_state_dict(mha.out_proj.state_dict())


class EinsumAttention(MultiHeadAttention):
    """einsum 版：给每个轴起名字，投影、打分、加权、输出投影都写成 einsum。
    轴名：b 批、t/s 查询/键位置、h 头、d 头内维度、i 输入维度、o 输出维度。"""

    def forward(self, x):
        num_tokens = x.shape[1]

        def project(linear):  # 把 (d_out, d_in) 的权重看成 (h, d, i)，直接投影出多头
            # weight (d_out, i) 的前 head_dim 行属于第 0 个头……与 view 拆头的切法一致
            w = linear.weight.view(self.num_heads, self.head_dim, -1)
            out = torch.einsum("bti,hdi->bhtd", x, w)
            bias = linear.bias
            # 偏置 (d_out,) 摆成 (h, 1, d)，广播到 (b, h, t, d)
            return out if bias is None else out + bias.view(self.num_heads, 1, self.head_dim)

        q, k, v = project(self.W_query), project(self.W_key), project(self.W_value)
        # 对 d 求和：每个头里 q·k，得 (b, h, t, s)
        scores = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(self.mask[:num_tokens, :num_tokens], float("-inf"))
        # 对 s 求和：按权重加权所有值向量，得 (b, h, t, d)
        context = torch.einsum("bhts,bhsd->bhtd", self.dropout(torch.softmax(scores, -1)), v)
        # 同时对 h 和 d 求和：等价于“拼接各头再乘 out_proj”，合并与投影一步完成
        w_out = self.out_proj.weight.view(self.d_out, self.num_heads, self.head_dim)
        return torch.einsum("bhtd,ohd->bto", context, w_out) + self.out_proj.bias


class SDPAttention(MultiHeadAttention):
    """F.scaled_dot_product_attention(is_causal=True)：融合内核，跳过未来块。
    不需要掩码张量，也不存整张分数矩阵。"""

    def forward(self, x):
        q, k, v = split_heads(self, x)
        # SDPA 默认按 1/√head_dim 缩放（head_dim 取 q 的最后一维），所以不用自己除
        p = self.dropout.p if self.training else 0.0  # SDPA 自己做 dropout，要手动按模式关掉
        return merge_heads(self, F.scaled_dot_product_attention(q, k, v, dropout_p=p,
                                                                is_causal=True))


class SDPAMaskAttention(MultiHeadAttention):
    """SDPA + 显式布尔掩码（SDPA 里 True 表示“可以看”，与我们 mask 的含义相反）。
    内核不知道掩码是因果的，只能逐元素套用，无法整块跳过未来位置。"""

    def forward(self, x):
        num_tokens = x.shape[1]
        q, k, v = split_heads(self, x)
        p = self.dropout.p if self.training else 0.0
        # 给了 attn_mask 就不能再设 is_causal=True（两者同时设置会报错），只能逐元素套用掩码
        allowed = ~self.mask[:num_tokens, :num_tokens]
        return merge_heads(self, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                                                dropout_p=p))


class TorchMHA(nn.Module):
    """PyTorch 自带的 nn.MultiheadAttention（need_weights=False，传 attn_mask）。
    它的布尔 attn_mask 与我们一样：True 表示“遮住”。权重布局：W_q、W_k、W_v 摞在一个
    in_proj_weight (3·E, E) 里，偏置在 in_proj_bias；要求 d_in == d_out，
    且 QKV 偏置与输出偏置只能一起开关。"""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_in == d_out, "nn.MultiheadAttention 要求输入维 == 输出维"
        # batch_first=True：输入输出都是 (b, T, E)，与本章其他写法一致（默认是 (T, b, E)）
        self.attn = nn.MultiheadAttention(d_out, num_heads, dropout=dropout, batch_first=True)
        if not qkv_bias:  # 没有 QKV 偏置：把它置 0 并冻结，才与教学版是同一个函数
            nn.init.zeros_(self.attn.in_proj_bias)
            self.attn.in_proj_bias.requires_grad_(False)
        mask = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        num_tokens = x.shape[1]
        # need_weights=False：不必算出各头平均的注意力权重，才能走 SDPA 融合内核。
        # 这里只给显式掩码；若再加 is_causal=True 提示，它内部会改走 SDPA 的 is_causal 路径
        out, _ = self.attn(x, x, x, attn_mask=self.mask[:num_tokens, :num_tokens],
                           need_weights=False)
        return out

    @torch.no_grad()
    def load_from(self, mha):
        names = ("W_query", "W_key", "W_value")
        # in_proj_weight 的行顺序固定是 q、k、v，所以按这个顺序拼接
        self.attn.in_proj_weight.copy_(torch.cat([getattr(mha, n).weight for n in names]))
        if mha.W_query.bias is not None:
            self.attn.in_proj_bias.copy_(torch.cat([getattr(mha, n).bias for n in names]))
        # 它自带的 out_proj 也是 Linear(E, E)（带偏置），与教学版同形状，可直接加载
        self.attn.out_proj.load_state_dict(mha.out_proj.state_dict())


# 基准与测试遍历的变体表：名字 → 类，构造参数统一为
# (d_in, d_out, context_length, dropout, num_heads, qkv_bias=False)
MHA_VARIANTS = {
    "wrapper": MultiHeadAttentionWrapper,
    "view_transpose": MultiHeadAttention,
    "combined_qkv": CombinedQKVAttention,
    "einsum": EinsumAttention,
    "sdpa_causal": SDPAttention,
    "sdpa_mask": SDPAMaskAttention,
    "nn_mha": TorchMHA,
}


def demo_variants_agree(variants, device, d=64, num_heads=4, num_tokens=16):
    # qkv_bias=True：连偏置一起核对，检查各 load_from 没把偏置搬错
    # dropout=0 且 eval()：去掉随机性，差值只剩浮点误差
    base = MultiHeadAttention(d, d, num_tokens, 0.0, num_heads, qkv_bias=True).to(device).eval()
    x = torch.randn(2, num_tokens, d, device=device)
    with torch.no_grad():
        expected = base(x)
        for name, cls in variants.items():
            model = cls(d, d, num_tokens, 0.0, num_heads, qkv_bias=True).to(device).eval()
            copy_weights(base, model)
            diff = (model(x) - expected).abs().max().item()
            print(f"  {name:<15} 与教学版最大差 {diff:.1e}   {cls.__doc__.splitlines()[0]}")


# ===== 6. 主程序 =====
def build_parser():
    parser = ArgParser(description="从零编写注意力机制：逐步演示并对比各种实现的速度")
    # 两个尺寸开关互斥：同时给 --quick 和 --bench-size 时 argparse 直接报错
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="冒烟模式：极小的基准，几秒内跑完")
    sizes.add_argument("--bench-size", action="store_true",
                       help="用 GPT-2 规模的基准：批次 8 × 长度 1024 × 维度 768，12 头（CPU 上较慢）")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="运行设备：auto 按 cuda > mps > cpu 自动选择（默认 auto）")
    parser.add_argument("--seed", type=int, default=123, help="随机种子，保证结果可复现（默认 123）")
    return parser


def check_args(args, device, size):
    # 开工之前先查：错了立刻一行中文说明，而不是演示跑完、到基准测试时才因内存不够被杀掉
    check_range("--seed", args.seed, 0, 2**32 - 1)
    need, free = bench_memory_bytes(size), free_memory_bytes(device)
    if free is not None and need > free:
        raise UserError(f"这个基准约需 {need / 2**30:.1f} GB 内存，{device.type} 上此刻只剩 "
                        f"{free / 2**30:.1f} GB：请去掉 --bench-size，或换一台内存更大的机器")


def section(title):
    print(f"\n===== {title} =====")


def run(args):
    device = resolve_device(args.device)
    size_name = "quick" if args.quick else "bench" if args.bench_size else "default"
    check_args(args, device, BENCH_SIZES[size_name])
    # 固定种子：随机初始化的权重和输入每次都一样，打印出的数字可复现
    torch.manual_seed(args.seed)
    section("1. 不带权重的简化自注意力")
    demo_simple_attention()
    section("2. 带可训练权重的自注意力")
    demo_trainable_attention()
    demo_why_sqrt_dk()
    section("3. 因果注意力")
    demo_causal_mask()
    demo_mask_after_softmax()
    demo_dropout()
    demo_buffer(device)
    section("4. 多头注意力")
    demo_multihead()
    section("5. 高效变体：都与教学版算同一个函数")
    variants = variants_for(device)
    demo_variants_agree(variants, device)
    # 基准测试的代码在文末的进阶节：怎样计时才可信，第一次读可以先跳过
    section(f"6. 基准测试（{size_name}）")
    run_benchmark(variants, BENCH_SIZES[size_name], device)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    # 只捕获 UserError：用户能自己改正的错误打印一行中文；其他异常照常抛出，方便排错
    except UserError as err:
        print(f"错误：{err}", file=sys.stderr)
        # 状态码 2 与 argparse 的参数错误一致
        sys.exit(2)


# ===== 进阶：FlexAttention 与基准测试（第一次读可以跳过）=====
# run() 用到这里的函数；Python 在调用时才查找名字，所以定义写在 main() 后面也没关系。


# ---- FlexAttention：用一个小函数描述掩码，编译成块稀疏内核（torch ≥ 2.5）----
def causal_mask_mod(b, h, q_idx, kv_idx):
    """FlexAttention 用一个小函数描述掩码：查询位置 ≥ 键位置时才可见。"""
    return q_idx >= kv_idx


class FlexAttentionMHA(MultiHeadAttention):
    """FlexAttention：用 mask_mod 函数描述掩码，编译成块稀疏内核。
    块掩码记录哪些块全被遮住，可整块跳过；它没有注意力 dropout，训练时 dropout 必须为 0。"""

    supports_dropout = False

    def forward(self, x):
        if self.training and self.dropout.p > 0:
            raise ValueError("FlexAttention 不支持注意力 dropout，请把 dropout 设为 0")
        q, k, v = split_heads(self, x)
        # q、k、v 仍是 (b, h, T, head_dim)；缩放同样默认 1/√head_dim
        block_mask = causal_block_mask(x.shape[1], x.device)
        # CUDA 上用 torch.compile 生成融合内核；其他设备只能跑未融合的参考实现
        fn = compiled_flex() if x.device.type == "cuda" else flex_attention
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 未编译时 torch 会提醒"没有融合"，这里已知
            return merge_heads(self, fn(q, k, v, block_mask=block_mask))


@functools.lru_cache(maxsize=None)
def causal_block_mask(num_tokens, device):
    """块掩码只取决于长度和设备：建一次缓存起来，不必每次前向都重算。"""
    # B=None、H=None：掩码与批次和头无关，所有句子、所有头共用一份
    return create_block_mask(causal_mask_mod, None, None, num_tokens, num_tokens, device=device)


@functools.lru_cache(maxsize=None)
def compiled_flex():
    """第一次用到时才编译（要几十秒），之后复用。"""
    return torch.compile(flex_attention, dynamic=False)


def flex_support(device):
    """在 device 上实际跑一次很小的前向+反向，返回 (能否用于基准, 原因)。"""
    if flex_attention is None:
        return False, f"torch {torch.__version__} 没有 torch.nn.attention.flex_attention（需 ≥ 2.5）"
    try:
        # 只看 import 成功不够：有的设备/版本能导入却跑不了前向或反向，所以真跑一次
        q = torch.randn(1, 1, 8, 8, device=device, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flex_attention(q, q, q).sum().backward()  # 最便宜的检查：不支持时立刻失败
        probe = FlexAttentionMHA(16, 16, 8, 0.0, num_heads=2).to(device)
        probe(torch.randn(1, 8, 16, device=device)).sum().backward()  # 再试完整的带掩码版本
    except Exception as err:  # 不同版本/设备报错各不相同，统一转成一行原因
        message = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
        return False, f"{type(err).__name__}: {message}"
    return True, "可用"


def variants_for(device, verbose=True):
    """MHA_VARIANTS 加上 FlexAttention（仅当当前 torch 与设备支持它的前向和反向）。"""
    # 复制一份再加 flex，不改动全局表 MHA_VARIANTS
    variants = dict(MHA_VARIANTS)
    ok, reason = flex_support(device)
    if ok:
        variants["flex"] = FlexAttentionMHA
    elif verbose:
        print(f"  FlexAttention：跳过（torch {torch.__version__}，{device.type}）— {reason}")
    return variants


# ---- 基准测试：怎样计时才可信 ----
# 读表时可以对照这些原因（表里的数字每次运行现场测量，机器不同排名也可能不同）：
# - wrapper 逐头调用小矩阵乘法，头越多越吃亏；
# - view_transpose / combined_qkv / einsum 都把 (b, h, T, T) 的分数矩阵写进内存再读好几遍
#   （掩码、softmax、dropout、乘 v），T 一长就卡在内存带宽上；
# - SDPA 分块计算，不落地整张分数矩阵；is_causal=True 还整块跳过未来位置，省下约一半计算；
# - 显式掩码（sdpa_mask、nn_mha）要逐元素读掩码、不能跳块，所以通常比 is_causal 慢。
BENCH_SIZES = {
    "quick": dict(batch=2, num_tokens=64, emb_dim=64, num_heads=4, warmup=2, repeats=5),
    # 默认选长序列、窄模型（头维度仍是 GPT-2 的 64）：注意力的 T² 部分占大头而不是线性投影，
    # 融合内核的优势才是真实可见的；序列短时各写法都被投影和调用开销淹没，排名只剩噪声
    "default": dict(batch=1, num_tokens=2048, emb_dim=128, num_heads=2, warmup=1, repeats=5),
    # bench 是 GPT-2 small 的注意力形状：768 维、12 头、长度 1024
    "bench": dict(batch=8, num_tokens=1024, emb_dim=768, num_heads=12, warmup=2, repeats=5),
}


def bench_memory_bytes(size):
    """粗估基准的峰值内存：朴素写法做前向+反向时，同时活着约 4～5 份 (b, h, T, T) 的
    fp32 分数矩阵（打分、掩码、softmax 的结果和它们的梯度；实测约 3.5 份），按 6 份留余量。"""
    return 6 * 4 * size["batch"] * size["num_heads"] * size["num_tokens"] ** 2


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


def sync(device):
    if device.type != "cpu":  # GPU 的运算是异步排队的：计时前后都要等它真正算完
        getattr(torch, device.type).synchronize()


def timed_call(fn, device):
    """运行一次 fn，返回耗时（秒）。"""
    # 前一次 sync 让之前排队的运算不算进来；后一次 sync 等本次真正算完再停表
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench_closures(cls, size, device):
    """为一个变体准备两个待计时的函数：前向（no_grad，推理时不必为反向保存中间结果）、前向+反向。"""
    d = size["emb_dim"]
    # dropout=0 且 eval()：计时不含随机丢弃，各变体做完全相同的计算
    model = cls(d, d, size["num_tokens"], 0.0, size["num_heads"]).to(device).eval()
    # requires_grad=True：反向时也算对输入的梯度，就像注意力层位于模型中间
    x = torch.randn(size["batch"], size["num_tokens"], d, device=device, requires_grad=True)

    def forward():
        with torch.no_grad():
            model(x)

    def forward_backward():
        # 每轮先清掉梯度，否则 backward 会累加到上一轮上；set_to_none 直接丢弃，连清零都省了
        model.zero_grad(set_to_none=True)
        x.grad = None
        model(x).sum().backward()

    return forward, forward_backward


def best_times(closures, device, warmup, repeats):
    """closures = {名字: (前向, 前向+反向)}。先把每个变体都预热 warmup 轮，再交替计时 repeats 轮
    （每一轮所有变体各跑一次，机器负载的起伏均匀地落到每个变体上），每项取最快的一次。
    返回 {名字: (前向 ms, 前向+反向 ms)}。"""
    # 预热：内存分配器、线程池、autograd 引擎、CUDA 内核与编译都先就绪，不算进计时
    for fns in closures.values():
        for fn in fns * warmup:
            fn()
    best = {name: [math.inf, math.inf] for name in closures}

    def one_round(names):
        for name in names:
            for i, fn in enumerate(closures[name]):
                best[name][i] = min(best[name][i], timed_call(fn, device))

    # 取最快而不是平均或中位数：别的进程、线程调度只会让某次变慢，不会让它变快，
    # 所以最快的那次最接近这段代码本身的耗时（2 核机器很忙时，一半以上的调用都可能被拖慢）
    for _ in range(repeats):
        one_round(closures)
    # 前向+反向里包含一次前向，不可能比单独前向快；最快值若仍是这样，说明这一项的
    # 每次前向都被打断了，只对这几项再多测几轮
    for _ in range(2 * repeats):
        suspects = [name for name, (fwd, both) in best.items() if fwd > both]
        if not suspects:
            break
        one_round(suspects)
    return {name: (fwd * 1000, both * 1000) for name, (fwd, both) in best.items()}


def run_benchmark(variants, size, device):
    print(f"  批次 {size['batch']} × 长度 {size['num_tokens']} × 维度 {size['emb_dim']}，"
          f"{size['num_heads']} 头，{device.type}，{torch.get_num_threads()} 线程，"
          f"预热 {size['warmup']} 轮后交替计时 {size['repeats']} 轮，每项取最快的一次")
    closures = {name: bench_closures(cls, size, device) for name, cls in variants.items()}
    results = best_times(closures, device, size["warmup"], size["repeats"])
    # “相对最慢” = 最慢耗时 / 本变体耗时：数字越大越快，最慢的那个是 1.00×
    slowest = [max(r[i] for r in results.values()) for i in range(2)]
    print("  " + display_pad("变体", 16) + display_pad("前向 ms", 12) + display_pad("相对最慢", 10)
          + display_pad("前向+反向 ms", 14) + "相对最慢")
    for name, (fwd, both) in results.items():
        print(f"  {name:<16}{fwd:>9.2f}   {slowest[0] / fwd:>6.2f}×   "
              f"{both:>11.2f}   {slowest[1] / both:>6.2f}×")
    noisy = [name for name, (fwd, both) in results.items() if fwd > both]
    if noisy:  # 多测几轮仍不合理：如实说明，而不是假装这些数字可信
        print(f"  注意：{'、'.join(noisy)} 的计时一直被其他进程打断（前向反而慢于前向+反向），"
              "请在机器空闲时重跑")
    fastest = [min(results, key=lambda n: results[n][i]) for i in range(2)]
    print(f"  本次最快：前向 {fastest[0]}，前向+反向 {fastest[1]}")
    return results


# ===== 附录：前几章的部件（逐字复制）=====
# 来自 01_tokenizer.py：错误类型、命令行解析与范围检查、设备选择
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


if __name__ == "__main__":
    main()
