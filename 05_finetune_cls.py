"""05_finetune_cls.py — 分类任务微调：让预训练的 GPT 识别垃圾短信

本章你会学到：
- 把"预测下一个词"的 GPT 改成分类器：只换掉输出头（emb_dim → 类别数），其余参数都复用
- 填充与截断：因果模型为什么在右边填充、为什么取"最后一个真实 token"的输出来分类
- 冻结大部分参数，只微调最后一个块、最终 LayerNorm 和新输出头：又快又不容易过拟合
- 准确率必须和基线比：随机猜、总猜多数类、numpy 写的词袋逻辑回归
- 进阶：取哪个位置、训练哪些层、填充到多长、去掉因果掩码的对比表（--compare），英文数据集下载
运行：python 05_finetune_cls.py          # 默认：中文短信，2 核 CPU 约 1 分钟
      python 05_finetune_cls.py --quick  # 冒烟：tiny 模型，约 7 秒
      python 05_finetune_cls.py --predict "【XX银行】您的账户已冻结，请点击 t.cn/abc 解冻"
"""
import argparse
import base64
import contextlib
import http.client
import importlib.util
import io
import json
import math
import mmap
import os
import random
import signal
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

# 本章用到的 UserError、ArgParser、check_range、GPTModel、MultiHeadAttention、load_init、
# save_checkpoint、StopFlag 等来自 01–04，见文末附录。


# ===== 1. 数据：一条短信 → token → 填充成批次 =====
# 数据文件每行一条：label<TAB>text。三个划分（train/val/test）是固定的文件：data/sms/ 里的中文短信，
# 测试集只从逐条手写的短信里抽（生成器的模板一条也不进测试集，见 data/README.md）。

LABELS = {"sms-zh": ["ham", "spam"], "sms-spam": ["ham", "spam"], "imdb": ["neg", "pos"]}
LABEL_NAMES = {"ham": "正常短信", "spam": "垃圾短信", "neg": "差评", "pos": "好评"}
SPLITS = ("train", "val", "test")


def read_tsv(path, labels):
    """读一个 label<TAB>text 文件 → [(text, 类别下标), ...]。格式不对就报出文件名和行号。"""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"找不到数据文件 {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} 不是 UTF-8 文本") from None
    rows = []
    for number, line in enumerate(lines, 1):
        # 空行（常见于文件末尾）不算错：手工编辑的文件里它们很常见
        if not line.strip():
            continue
        # 只按第一个制表符切：标签里不会有制表符，文本里万一有，也原样留在文本里
        label, tab, text = line.partition("\t")
        where = f"{path} 第 {number} 行"
        if not tab:
            raise UserError(f"{where} 不是 标签<TAB>文本 的格式")
        # 拼错的标签（"Spam"、"垃圾"）若悄悄当成某一类，准确率就没有意义了：宁可停下来说清楚
        if label not in labels:
            raise UserError(f"{where} 的标签 {label!r} 不认识（应为 {' / '.join(labels)}）")
        if not text.strip():
            raise UserError(f"{where} 的文本是空的")
        # 类别存成下标（ham=0、spam=1）：交叉熵要的就是整数类别
        rows.append((text, labels.index(label)))
    if not rows:
        raise UserError(f"数据文件 {path} 是空的")
    return rows


def encode_rows(tokenizer, rows, max_length):
    """每条文本切成 token，超过 max_length 的截掉尾巴（短信的要点通常在开头）→ [(ids, 类别), ...]。"""
    # encode_ordinary：把文本里的 "<|endoftext|>" 当普通字符，用户写的字不会变成特殊 token
    all_ids = tokenizer.encode_ordinary_batch([text for text, _ in rows])
    # 截断后至少留一个 token：空列表没有"最后一个 token"可取（emoji 之类极少出现，但要防住）
    return [(ids[:max_length] or [tokenizer.eot_token], label)
            for ids, (_, label) in zip(all_ids, rows)]


def collate(batch, pad_id, pad_to=None):
    """[(ids, 类别), ...] → x (b, T)、lengths (b,)、y (b,)。
    在右边用 pad_id（<|endoftext|>）填充到本批最长（或 pad_to）：每条短信的真实 token 都从位置 0 开始，
    位置嵌入和预训练时一样；因果掩码下真实 token 看不见它后面的填充，所以填充不改变它们的输出。
    如果在左边填充，真实 token 就能看见前面那串填充，分类结果会随"这一批最长的是谁"而变。"""
    # 只填充到本批最长：短信大多只有二三十个 token，统统填到上下文长度会多算好几倍的无用功
    width = pad_to or max(len(ids) for ids, _ in batch)
    # 先整块填成 pad_id，再把每条的真实 token 拷到开头：填充自然就落在右边
    x = torch.full((len(batch), width), pad_id, dtype=torch.long)
    for row, (ids, _) in enumerate(batch):
        x[row, :len(ids)] = torch.tensor(ids)
    # 真实长度要一起带上：模型靠它找到"最后一个真实 token"，均值池化靠它排除填充
    lengths = torch.tensor([len(ids) for ids, _ in batch])
    y = torch.tensor([label for _, label in batch])
    return x, lengths, y


def batches(examples, batch_size, pad_id, pad_to=None, generator=None):
    """按 batch_size 切批次；给了 generator 就先打乱（训练时每轮顺序都不同，评估时不打乱）。"""
    order = (torch.randperm(len(examples), generator=generator).tolist() if generator is not None
             else range(len(examples)))
    # 用独立的生成器打乱：顺序只由 --seed 决定，和模型初始化、dropout 用的随机数互不干扰
    order = list(order)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]], pad_id, pad_to)


# ===== 2. 模型要改什么：换一个输出头，只看一个位置 =====
# 预训练的 GPT 在每个位置输出 vocab_size 个分数（下一个词是谁）；分类只需要每条短信 n_classes 个分数。
# 所以只把 out_head 换成 emb_dim → n_classes 的线性层，其余参数原样保留：模型读懂中文的本事都在里面。
# 用哪个位置的输出？因果掩码下位置 t 只看得见 0..t，只有最后一个真实 token 看过整条短信（演示见 show_positions）。

class GPTClassifier(nn.Module):
    """GPT 分类器：GPTModel 的全部部件，加一个 len(labels) 维的新输出头；forward 多收一个 lengths
    （每条的真实长度），只把 token_position 指定的位置（last / first / mean）送进输出头。
    部件直接借一个 GPTModel 的，参数名与它完全相同：04 的检查点、GPT-2 权重都能原样载入。
    （没写成 class GPTClassifier(GPTModel)，只因 GPTModel 定义在文末附录，而定义子类时基类必须已经存在。）"""

    def __init__(self, cfg, labels, token_position="last", causal=True):
        super().__init__()
        # 先建一个完整的 GPTModel，再把它的部件挂到自己身上：写法最短，参数名也就和它一模一样
        gpt = GPTModel(cfg)
        self.cfg = cfg
        self.tok_emb, self.pos_emb, self.drop_emb = gpt.tok_emb, gpt.pos_emb, gpt.drop_emb
        self.trf_blocks, self.final_norm = gpt.trf_blocks, gpt.final_norm
        self.labels = list(labels)  # 类别名，下标即类别编号：classify 据此把分数翻译成 "spam"/"ham"
        # 新输出头带偏置：两类样本不一样多时，偏置一项就能学到"先验"，不必挤占词向量的方向
        self.out_head = nn.Linear(cfg["emb_dim"], len(self.labels))
        nn.init.normal_(self.out_head.weight, std=0.02)  # 小的初始权重：开始时各类概率接近均等
        nn.init.zeros_(self.out_head.bias)
        self.token_position = token_position
        if not causal:  # --no-causal-mask 的对比实验：每个块的注意力换成双向的（参数不变）
            for block in self.trf_blocks:
                block.att = BidirectionalAttention(block.att)

    def hidden_states(self, in_idx, lengths):
        """和 GPTModel.forward 一样走完嵌入、所有块、最终 LayerNorm，只是不过输出头 → (b, T, emb_dim)。"""
        seq_len = in_idx.shape[1]
        # (b, T)：真实 token 处为 True
        real = torch.arange(seq_len, device=in_idx.device) < lengths[:, None]
        for block in self.trf_blocks:
            if isinstance(block.att, BidirectionalAttention):
                block.att.key_mask = real  # 双向注意力要知道哪些位置是填充，见 BidirectionalAttention
        # 下面三行与 GPTModel.forward 相同：词嵌入 + 位置嵌入 → 各个块 → 最终 LayerNorm
        positions = torch.arange(seq_len, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))
        return self.final_norm(self.trf_blocks(x))

    def forward(self, in_idx, lengths):
        # h: (b, T, emb_dim)，每个位置一个向量；分类只要每条短信一个向量，所以要挑（或平均）
        h = self.hidden_states(in_idx, lengths)
        if self.token_position == "last":  # 第 i 条的最后一个真实 token 在位置 lengths[i]-1，不是 -1
            pooled = h[torch.arange(len(h), device=h.device), lengths - 1]
        elif self.token_position == "first":  # 第一个 token 什么都看不见（只有它自己）：对照组
            pooled = h[:, 0]
        else:  # mean：所有真实 token 的平均，填充位置不算
            real = (torch.arange(h.shape[1], device=h.device) < lengths[:, None]).unsqueeze(-1)
            # 除以真实长度而不是 T：否则同一条短信填充得越多，平均值就越被拉向 0
            pooled = (h * real).sum(1) / lengths[:, None]
        return self.out_head(pooled)  # (b, n_classes)


class BidirectionalAttention(nn.Module):
    """去掉因果掩码的注意力：每个位置都看得见整条短信（BERT 的做法）。沿用 att（一个
    MultiHeadAttention）的全部参数，只改 forward。这时真实 token 也能看见右边的填充，
    所以改用 key_mask 遮住填充：填充的位置谁也不看。"""

    def __init__(self, att):
        super().__init__()
        self.W_query, self.W_key, self.W_value = att.W_query, att.W_key, att.W_value
        self.out_proj, self.dropout = att.out_proj, att.dropout
        self.num_heads, self.head_dim, self.d_out = att.num_heads, att.head_dim, att.d_out
        self.key_mask = None  # (b, T) 的布尔张量，GPTClassifier 每次前向前设好

    def forward(self, x):
        b, num_tokens, _ = x.shape
        q, k, v = (w(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))
        # (b, 1, 1, T)：对每个头、每个查询位置都一样，True = 这个键可以被看
        # 布尔掩码交给 SDPA：False 的位置在 softmax 之前被设成 −∞，权重正好是 0
        mask = self.key_mask[:, None, None, :]
        p = self.dropout.p if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out_proj(context.transpose(1, 2).reshape(b, num_tokens, self.d_out))


def build_classifier(base, labels, token_position="last", causal=True):
    """用 load_init 得到的语言模型 base 搭分类器：除了新的输出头，所有参数从 base 原样复制。"""
    model = GPTClassifier(base.cfg, labels, token_position, causal)
    # 旧输出头是 emb_dim × 词表大小，新的是 emb_dim × 2：形状不同，只能丢掉旧的、新的从头学
    weights = {k: v for k, v in base.state_dict().items() if not k.startswith("out_head.")}
    # strict=False 只是为了容忍"缺新输出头"；下一行把其余任何不匹配都当成错误
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # 只允许缺新输出头的两个参数：别的键对不上，说明 base 不是同一种模型
    if set(missing) != {"out_head.weight", "out_head.bias"} or unexpected:
        raise UserError(f"起点模型的参数与分类器对不上（缺 {missing[:3]}，多 {unexpected[:3]}）")
    return model.to(next(base.parameters()).device)


def set_trainable(model, mode, n_last=1):
    """冻结全部参数，再按 mode 解冻一部分；返回可训练参数的个数。
    head：只训练新输出头；last-n：再加最后 n_last 个块和最终 LayerNorm（last-block 即 n_last=1）；all：全部。
    只训练最后几层：底层学到的"字和词"对分类同样有用，不动它们，几千条短信也不容易过拟合，还省掉大半反向传播。"""
    # requires_grad=False 的参数不算梯度、不被优化器更新；反向传播到最底层的可训练参数就停
    for param in model.parameters():
        param.requires_grad = mode == "all"
    # 新输出头总要训练：它是随机初始化的，不训练就只会随机猜
    parts = [model.out_head]
    if mode in ("last-block", "last-n"):
        # 最终 LayerNorm 紧挨着输出头，它的缩放和平移是为"预测下一个词"调的，换了任务也一起放开
        parts += [model.final_norm, *model.trf_blocks[-n_last:]]
    for part in parts:
        for param in part.parameters():
            param.requires_grad = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def show_positions(model, ids):
    """演示：把一条短信的第一个 / 最后一个 token 换掉，看哪些位置的隐藏状态跟着变。
    改第一个 token，所有位置都变（它们都看得见位置 0）；改最后一个，只有最后一个位置变：
    只有最后一个位置"读过"整条短信。返回两个改动各自影响到的位置列表。"""
    model.eval()
    x = torch.tensor([ids])
    lengths = torch.tensor([len(ids)])
    base = model.hidden_states(x, lengths)[0]
    changed = []
    for pos in (0, len(ids) - 1):
        other = x.clone()
        # 换成相邻编号的另一个 token：只要换了就行，是什么词无所谓
        other[0, pos] = (other[0, pos] + 1) % model.cfg["vocab_size"]
        diff = (model.hidden_states(other, lengths)[0] - base).abs().amax(-1)
        # 1e-5 的容差：浮点运算的舍入会带来极小的抖动，真正"看得见"的改动要大得多
        changed.append([t for t in range(len(ids)) if diff[t] > 1e-5])
    return changed


# ===== 3. 训练：交叉熵 + AdamW，每轮看一次验证集，只存最好的那一轮 =====

@dataclass
class ClsState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: tiktoken.Encoding
    data: dict                    # {"train": [(ids, 类别), ...], "val": …, "test": …}
    device: torch.device
    generator: torch.Generator    # 打乱训练集专用的随机数生成器
    epoch: int = 0
    step: int = 0
    examples_seen: int = 0
    tokens_seen: int = 0          # 真实 token（不含填充）
    train_seconds: float = 0.0
    best: dict = field(default_factory=dict)  # 验证集上最好的一轮：{"epoch", "acc", "loss"}
    history: list = field(default_factory=list)


@torch.no_grad()
def evaluate_split(model, examples, batch_size, pad_id, device, pad_to=None):
    """一个划分上的平均损失与准确率。eval() 关掉 dropout；不打乱、不算梯度。"""
    model.eval()
    loss_sum, correct = 0.0, 0
    for x, lengths, y in batches(examples, batch_size, pad_id, pad_to):
        x, lengths, y = x.to(device), lengths.to(device), y.to(device)
        logits = model(x, lengths)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    return {"loss": loss_sum / len(examples), "acc": correct / len(examples)}


def train_epoch(state, s, stop):
    """训练一轮：每个批次一次前向、反向、更新。Ctrl-C（stop.requested）时做完当前批次就返回。"""
    state.model.train()
    pad_id = state.tokenizer.eot_token
    total = s.epochs * math.ceil(len(state.data["train"]) / s.batch_size)
    for x, lengths, y in batches(state.data["train"], s.batch_size, pad_id, s.pad_length,
                                 state.generator):
        t0 = time.perf_counter()
        # 学习率从 lr 线性降到 0：后几轮步子越来越小，验证准确率不再一轮高一轮低地乱跳
        for group in state.optimizer.param_groups:
            group["lr"] = s.lr * (1 - state.step / total)
        state.step += 1
        x, lengths, y = x.to(state.device), lengths.to(state.device), y.to(state.device)
        # 两类的交叉熵：和 04 的"下一个词"是同一个损失，只是候选从 2048 个词变成 2 个类别
        loss = F.cross_entropy(state.model(x, lengths), y)
        loss.backward()
        # 梯度裁剪：新输出头刚开始学时梯度可能很大，别让一步就把预训练好的参数冲乱
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), 1.0)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.train_seconds += time.perf_counter() - t0
        state.examples_seen += len(y)
        # token/s 只数真实 token：填充也要算，但它们不是"读过的文字"，算进去会把速度说得偏高
        state.tokens_seen += int(lengths.sum())
        # Ctrl-C：当前这一批已经更新完，参数是完整的；回到 finetune 评估并按需保存后再退出
        if stop.requested:
            return False
    return True


def finetune(state, s):
    """训练 s.epochs 轮；每轮结束在验证集上评估，比此前最好的还好就存成 best.pt（原子写入）。"""
    out = Path(s.out_dir) / "best.pt"
    pad_id = state.tokenizer.eot_token
    with StopFlag() as stop:
        while state.epoch < s.epochs:
            finished = train_epoch(state, s, stop)
            state.epoch += 1
            # 训练集只评估前 EVAL_TRAIN 条（文件已打乱，前面的就是随机样本）：够看出是否过拟合，又不拖慢
            scores = {split: evaluate_split(state.model, state.data[split][:limit], EVAL_BATCH,
                                            pad_id, state.device, s.pad_length)
                      for split, limit in (("train", EVAL_TRAIN), ("val", None))}
            # 只按训练步计时（不含评估）：和 04 打印的 token/s 口径相同
            tok_s = state.tokens_seen / max(state.train_seconds, 1e-9)
            print(f"第 {state.epoch}/{s.epochs} 轮  训练 loss {scores['train']['loss']:.3f} "
                  f"准确率 {scores['train']['acc']:.1%}｜验证 loss {scores['val']['loss']:.3f} "
                  f"准确率 {scores['val']['acc']:.1%}｜已见 {state.examples_seen:,} 条  "
                  f"训练用时 {state.train_seconds:.0f}s  {tok_s:,.0f} token/s", flush=True)
            state.history.append({"epoch": state.epoch, **{f"{k}_{m}": v[m] for k, v in
                                                            scores.items() for m in v}})
            val = scores["val"]
            # 先比准确率，相同时比损失：几百条验证短信上准确率常常打平，损失更细
            best = state.best
            if not best or (val["acc"], -val["loss"]) > (best["acc"], -best["loss"]):
                state.best = {"epoch": state.epoch, **val}
                save_checkpoint(out, classifier_checkpoint(state, s))
            # 只在验证集变好时才覆盖 best.pt：过拟合的后几轮不会冲掉最好的那一轮
            if not finished:
                print(f"收到 Ctrl-C：已停止；最好的一轮（第 {state.best['epoch']} 轮）在 {out}")
                sys.exit(130)
    return out


def classifier_checkpoint(state, s):
    """分类器检查点：权重 + 分词器 + 类别名 + 怎么取位置、是否因果、截断长度——载入时原样重建。"""
    # "kind" 让 load_classifier 一眼认出它：04 的预训练检查点也有 config、model，但没有分类头
    return {"kind": "classifier", "config": state.model.cfg, "model": state.model.state_dict(),
            "tokenizer": tokenizer_record(state.tokenizer), "labels": state.model.labels,
            "token_position": s.token_position, "causal": not s.no_causal_mask,
            "max_length": s.max_length, "epoch": state.epoch, "val_acc": state.best.get("acc"),
            "history": state.history}


# ===== 4. 评估：比基线好多少 =====
# 两类短信差不多一样多时，随机猜就有约 50%，总猜多数类也有一半以上：准确率要和它们放在一起看。
# 更强的基线是"词袋"逻辑回归：只数每个字出现没有，完全不管顺序。GPT 要赢它，才说明读上下文有用。

def bow_units(text, unit):
    """词袋的单位：中文按字（每个字一个特征），英文按小写单词（空格切开）。"""
    return set(text) if unit == "char" else set(text.lower().split())


def bow_baseline(train_rows, test_rows, n_classes, unit, steps=300, lr=0.5, l2=1e-4):
    """numpy 写的词袋逻辑回归：特征 = 每个字（词）出现与否，softmax 回归，整批梯度下降。
    返回测试集准确率。特征矩阵是稀疏的：只存每条文本出现过的特征编号（CSR 的写法）。"""
    counts = {}
    for text, _ in train_rows:
        for u in bow_units(text, unit):
            counts[u] = counts.get(u, 0) + 1
    # 只出现在一条文本里的字词对别的文本没有帮助，去掉；最多留 20000 个最常见的
    # 按出现次数排序再截断：留下最常见的特征，结果也不随集合的遍历顺序变化
    vocab = {u: i for i, u in enumerate(sorted((u for u, c in counts.items() if c >= 2),
                                              key=lambda u: -counts[u])[:20000])}

    def features(rows):  # → 扁平的特征编号、每条文本的起点、条数
        ids = [[vocab[u] for u in bow_units(text, unit) if u in vocab] for text, _ in rows]
        flat = np.array([j for row in ids for j in row], dtype=np.int64)
        owner = np.repeat(np.arange(len(ids)), [len(row) for row in ids])  # 每个特征属于哪条文本
        return flat, owner, len(ids)

    def scores(flat, owner, n, W, b):  # X @ W：把每条文本出现的特征的权重加起来
        out = np.tile(b, (n, 1))
        np.add.at(out, owner, W[flat])
        return out

    flat, owner, n = features(train_rows)
    y = np.array([label for _, label in train_rows])
    W, b = np.zeros((len(vocab), n_classes)), np.zeros(n_classes)
    for _ in range(steps):
        logits = scores(flat, owner, n, W, b)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(n), y] -= 1  # softmax 交叉熵对 logits 的梯度 = p − onehot(y)
        # Xᵀ(p − y)：每个特征的梯度 = 含有它的那些文本的 (p − y) 之和，bincount 一次算完一个类别
        grad_W = np.stack([np.bincount(flat, weights=p[owner, c], minlength=len(vocab))
                           for c in range(n_classes)], axis=1) / n + l2 * W
        # 特征只取 0/1、又有 L2 正则，损失是凸的：固定学习率的梯度下降几百步就收敛，不必用 Adam
        W -= lr * grad_W
        b -= lr * p.mean(0)
    flat, owner, n = features(test_rows)
    pred = scores(flat, owner, n, W, b).argmax(1)
    return float(np.mean(pred == np.array([label for _, label in test_rows])))


def baselines(rows, labels, unit):
    """三个基线在测试集上的准确率：随机猜、总猜训练集里最多的类、词袋逻辑回归。"""
    train_labels = [label for _, label in rows["train"]]
    # 多数类按训练集定、在测试集上数：和模型一样，不许偷看测试集的标签比例
    majority = max(range(len(labels)), key=train_labels.count)
    test_labels = [label for _, label in rows["test"]]
    return {"随机猜（期望）": 1 / len(labels),
            f"总猜多数类（{LABEL_NAMES[labels[majority]]}）":
                test_labels.count(majority) / len(test_labels),
            f"词袋逻辑回归（按{'字' if unit == 'char' else '词'}，numpy）":
                bow_baseline(rows["train"], rows["test"], len(labels), unit)}


# ===== 5. 用起来：load_classifier、classify、--predict、--interactive =====

def load_classifier(path):
    """本章写出的 best.pt → (model, tokenizer, labels)。04 的预训练检查点等别的文件：一行中文报错。"""
    # load_checkpoint（04）已经挡住了不存在、损坏、不是 torch 检查点的文件；这里再认一认种类
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "classifier":
        raise UserError(f"{path} 不是本章写出的分类器检查点（可能是 04 的预训练检查点）；"
                        "先运行 05_finetune_cls.py 训练一个")
    try:
        model = GPTClassifier(ckpt["config"], ckpt["labels"], ckpt["token_position"],
                              ckpt["causal"])
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"分类器检查点 {path} 与模型结构不匹配（{type(err).__name__}）") from None
    return model.eval(), tokenizer_from_record(ckpt["tokenizer"]), model.labels


@torch.no_grad()
def classify(model, tokenizer, texts, batch_size=64):
    """每条文本 → (类别名, 概率)：概率是 softmax 之后最大的那一类的。超过上下文的部分截掉。"""
    if any(not text.strip() for text in texts):
        raise UserError("要分类的文本是空的")
    model.eval()
    device = next(model.parameters()).device
    # 类别随便填个 0：collate 需要它，预测用不上；超出上下文的部分截掉（模型的位置嵌入只有这么长）
    examples = encode_rows(tokenizer, [(text, 0) for text in texts], model.cfg["context_length"])
    results = []
    for x, lengths, _ in batches(examples, batch_size, tokenizer.eot_token):
        # softmax 把两个分数变成两类的概率；返回较大的那个，读者一眼看出模型有多确定
        probs = torch.softmax(model(x.to(device), lengths.to(device)).float(), dim=-1)
        best, index = probs.max(dim=-1)
        results += [(model.labels[i], p) for i, p in zip(index.tolist(), best.tolist())]
    return results


def print_predictions(model, tokenizer, texts):
    for text, (label, prob) in zip(texts, classify(model, tokenizer, texts)):
        print(f"{LABEL_NAMES.get(label, label)}（{label}，{prob:.1%}）  {clip_text(text, 60)}")


def use_saved(s):
    """--predict / --interactive：不训练，载入 --out-dir 里的 best.pt 来分类。"""
    model, tokenizer, _ = load_classifier(Path(s.out_dir) / "best.pt")
    # 分类用不着训练时的设备设置：载入到 --device 上就能用，CPU 上一条短信只要几毫秒
    model.to(resolve_device(s.device))
    if s.predict:
        return print_predictions(model, tokenizer, s.predict)
    print("输入一条短信，回车分类；空行或 Ctrl-D 退出。")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line.strip():
            return
        print_predictions(model, tokenizer, [line])


# ===== 6. 主程序：命令行 → 设置 → 数据与模型 → 训练 → 和基线比 =====
DEFAULTS = {"epochs": 5, "batch_size": 16, "lr": 5e-4, "weight_decay": 0.01, "drop_rate": 0.1,
            "seed": 123,
            "compare_epochs": 2}
QUICK = {"model": "tiny", "epochs": 2, "limit": 300, "compare_epochs": 1}
PRETRAINED = Path("runs/pretrain/ckpt.pt")  # 04_pretrain.py 默认写出的检查点
EVAL_BATCH, EVAL_TRAIN = 64, 1000


def make_settings(args):
    """默认值 < --quick 的取值 < 命令行显式给出的值；--trainable 解析成 (模式, 块数)。"""
    # 先让所有键都在（没给的是 None），再由低到高一层层盖上去：和 04 的 make_settings 同一个思路
    merged = dict(vars(args))
    for layer in (DEFAULTS, QUICK if args.quick else {},
                  {k: v for k, v in vars(args).items() if v is not None}):
        merged.update(layer)
    s = argparse.Namespace(**merged)
    if s.quick and s.init == "auto":
        s.init = "random"  # 冒烟测试要快、要可复现：不依赖有没有跑过 04
    s.model = s.model or "mini"
    s.trainable = parse_trainable(s.trainable)
    return s


def resolve_init(s):
    """--init auto：有 04 的检查点就从它开始，没有就随机初始化——两种情况都说清楚。"""
    if s.init != "auto":
        return s.init
    if PRETRAINED.is_file():
        print(f"起点：{PRETRAINED}（04_pretrain.py 预训练的检查点）")
        return str(PRETRAINED)
    print(f"起点：随机初始化（没找到 {PRETRAINED}；先运行 python 04_pretrain.py，"
          "就会从预训练的模型开始）")
    return "random"


def load_rows(s, labels):
    """三个划分的原始行。--limit：每个划分先按种子打乱再取前 N 条（类别比例大致不变）。"""
    folder = Path(s.data) if s.data else (DATA_DIR / "sms" if s.dataset == "sms-zh"
                                          else prepare_dataset(s.dataset))
    # 三个划分都是现成的文件：划分固定，换机器、换种子，测试集都是同样的 688 条
    rows = {split: read_tsv(folder / f"{split}.tsv", labels) for split in SPLITS}
    if s.limit:
        rng = random.Random(s.seed)
        rows = {split: rng.sample(r, min(s.limit, len(r))) for split, r in rows.items()}
    return rows


def build_finetune(s, quiet=False):
    """按设置搭好一次微调：起点模型 → 分类器 → 数据 → 冻结 → 优化器。"""
    device = resolve_device(s.device)
    init = resolve_init(s) if not quiet else (s.init if s.init != "auto" else
                                              str(PRETRAINED) if PRETRAINED.is_file() else "random")
    labels = LABELS[s.dataset]
    rows = load_rows(s, labels)
    torch.manual_seed(s.seed)
    # 一行载入起点（04 的 load_init）：随机、04 的检查点、GPT-2 都走这里，分词器跟着起点走
    base, tokenizer, cfg = load_init(init, device, s.model)
    if (s.max_length or 0) > cfg["context_length"]:
        raise UserError(f"--max-length {s.max_length} 超过模型的上下文长度 {cfg['context_length']}")
    s.max_length = s.max_length or cfg["context_length"]
    s.pad_length = cfg["context_length"] if s.pad_to == "context" else None
    data = {split: encode_rows(tokenizer, r, s.max_length) for split, r in rows.items()}
    # dropout 只在微调时打开（预训练的检查点里是 0）：几千条短信很容易被背下来，它是最省事的正则化
    base.cfg = dict(base.cfg, drop_rate=s.drop_rate)
    model = build_classifier(base, labels, s.token_position, not s.no_causal_mask)
    # 语言模型本身不再需要：参数已复制进分类器，删掉它省一份内存（GPT-2 时有几百 MB）
    del base
    mode, n_last = s.trainable or (("all", 0) if init == "random" else ("last-n", 1))
    if n_last > cfg["n_layers"]:
        raise UserError(f"--trainable last-n {n_last} 超过模型的层数 {cfg['n_layers']}")
    n_train = set_trainable(model, mode, n_last)
    # 只把可训练的参数交给优化器；和 04 一样，只对矩阵做权重衰减，偏置和 LayerNorm 不衰减
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=s.lr)
    state = ClsState(model, optimizer, tokenizer, data, device,
                     torch.Generator().manual_seed(s.seed))
    if not quiet:
        describe(state, rows, cfg, mode, n_last, n_train)
    return state, rows


def describe(state, rows, cfg, mode, n_last, n_train):
    """开训前打印：数据规模、一条样例怎么变成 token、填充、哪个位置看得见全文、训练哪些参数。"""
    labels = state.model.labels
    for split in SPLITS:
        counts = [sum(label == i for _, label in rows[split]) for i in range(len(labels))]
        print(f"{split:>5}：{len(rows[split]):,} 条（" + "，".join(
            f"{LABEL_NAMES[name]} {n}" for name, n in zip(labels, counts)) + "）")
    text, label = rows["train"][0]
    ids, _ = state.data["train"][0]
    print(f"样例：「{clip_text(text, 40)}」（{LABEL_NAMES[labels[label]]}）→ {len(ids)} 个 token，"
          f"前几个是 {ids[:8]}")
    x, lengths, _ = collate(state.data["train"][:8], state.tokenizer.eot_token)
    print(f"8 条一批：真实长度 {lengths.tolist()} → 右侧用 <|endoftext|>"
          f"（id {state.tokenizer.eot_token}）填充成 {tuple(x.shape)}")
    first, last = show_positions(state.model, ids)
    print(f"因果掩码：改第 1 个 token，变化的位置有 {len(first)}/{len(ids)} 个；改最后一个，"
          f"只有位置 {last} 变了——只有最后一个 token 读过整条文本，所以用它分类")
    total = sum(p.numel() for p in state.model.parameters())
    what = {"head": "只训练输出头", "all": "训练全部参数"}.get(mode, f"训练最后 {n_last} 个块 + 最终 LayerNorm + 输出头")
    print(f"模型：{cfg['n_layers']} 层，宽 {cfg['emb_dim']}，上下文 {cfg['context_length']}；"
          f"{what}：{n_train:,} / {total:,} 个参数可训练")


def run(args):
    s = make_settings(args)
    check_args(s)
    if s.predict or s.interactive:
        return use_saved(s)
    if s.compare:
        return compare(s)
    t_start = time.perf_counter()
    state, rows = build_finetune(s)
    try:  # 数据和模型都没问题了才建输出目录：出错时不留下空目录
        Path(s.out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"无法创建 --out-dir {s.out_dir}（{type(err).__name__}）") from None
    pad_id = state.tokenizer.eot_token
    test = lambda model: evaluate_split(model, state.data["test"], EVAL_BATCH, pad_id, state.device)
    before = test(state.model)
    unit = "char" if s.dataset == "sms-zh" else "word"
    t0 = time.perf_counter()
    base = baselines(rows, state.model.labels, unit)
    print(f"基线已算好（词袋逻辑回归用时 {time.perf_counter() - t0:.1f} 秒）；微调前测试集准确率 "
          f"{before['acc']:.1%}（新输出头还没学过，和随机猜差不多）")
    best_path = finetune(state, s)
    model, _, _ = load_classifier(best_path)
    after = test(model.to(state.device))
    note = "，全是手写短信" if s.dataset == "sms-zh" and not s.data else ""
    print(f"\n测试集准确率（{len(rows['test']):,} 条{note}）：")
    for name, acc in [*base.items(), ("GPT 微调前", before["acc"]),
                      (f"GPT 微调后（验证集最好的第 {state.best['epoch']} 轮）", after["acc"])]:
        print(f"  {acc:7.1%}  {name}")
    print(f"总用时 {time.perf_counter() - t_start:.0f} 秒；模型存在 {best_path}；试试 "
          f"python 05_finetune_cls.py --predict \"你的短信\"")


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



# ===== 进阶：对比实验（--compare）与英文数据集的下载（第一次读可以跳过）=====

# —— 对比实验：书里那张表的几行，在同样的短预算下各训练一次 ——
COMPARE_ROWS = [
    ("默认：最后一个 token", {}),
    ("第一个 token", {"token_position": "first"}),
    ("所有真实 token 的平均", {"token_position": "mean"}),
    ("只训练输出头", {"trainable": ("head", 0)}),
    ("训练最后 2 个块", {"trainable": ("last-n", 2)}),
    ("训练全部参数", {"trainable": ("all", 0)}),
    ("填充到整个上下文", {"pad_to": "context"}),
    ("去掉因果掩码（双向注意力）", {"no_causal_mask": True}),
]


def compare(s):
    """每一行只改一个设置，其余与默认相同；每行训练 --compare-epochs 轮，报测试准确率与用时。"""
    print(f"对比实验：每组训练 {s.compare_epochs} 轮，起点 {resolve_init(s)}")
    print("测试准确率   用时  设置")
    for name, change in COMPARE_ROWS:
        trial = argparse.Namespace(**{**vars(s), "epochs": s.compare_epochs, **change,
                                      "out_dir": str(Path(s.out_dir) / "compare"),
                                      "max_length": None})
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # 每组的逐轮输出不打印，只留表里的一行
            state, _ = build_finetune(trial, quiet=True)
            model, _, _ = load_classifier(finetune(state, trial))
        acc = evaluate_split(model, state.data["test"], EVAL_BATCH, state.tokenizer.eot_token,
                       state.device)["acc"]
        print(f"{acc:>10.1%} {time.perf_counter() - t0:>5.0f}s  {name}", flush=True)


def clip_text(text, limit=24):
    """长文本在输出里只显示开头，免得一行被淹没。"""
    return text if len(text) <= limit else f"{text[:limit]}…"


# —— 英文数据集：下载一次（断点续传、显示进度），转成同样的三个 TSV 文件，缓存在 cache/ ——
CACHE_DIR = Path(__file__).resolve().parent / "cache"
DATASET_URLS = {  # 环境变量可以指向镜像或本地服务器（测试就这样做）
    "sms-spam": ("SMS_SPAM_URL",
                 "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"),
    "imdb": ("IMDB_URL", "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"),
}


def download(name):
    """下载 name 的压缩包到 cache/downloads/，返回路径；下载完整才改成正式文件名。"""
    env, default = DATASET_URLS[name]
    url = os.environ.get(env, default)
    dest = CACHE_DIR / "downloads" / f"{name}{'.zip' if name == 'sms-spam' else '.tar.gz'}"
    if dest.is_file():
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        total = _fetch_into(url, part)
    except urllib.error.HTTPError as err:
        raise UserError(f"下载 {name}（{url}）失败：HTTP {err.code}") from None
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise UserError(f"无法下载 {name}（{url}：{err}）。网络不通时可以设置镜像 {env}=地址，"
                        "或改用随项目发布的中文短信（--dataset sms-zh）；已下载的部分会续传") from None
    if total is not None and part.stat().st_size != total:
        raise UserError(f"{name} 只下载了 {part.stat().st_size}/{total} 字节；重新运行会从断点续传")
    os.replace(part, dest)
    return dest


def read_sms_spam(archive):
    """UCI SMS Spam Collection：zip 里的 SMSSpamCollection 文件，每行 "ham<TAB>text"。"""
    try:
        with zipfile.ZipFile(archive) as zf:
            lines = zf.read("SMSSpamCollection").decode("utf-8", errors="replace").splitlines()
    except (zipfile.BadZipFile, KeyError) as err:
        raise UserError(f"{archive} 不是预期的 SMS Spam Collection 压缩包（{err}）；删掉它重新下载"
                        ) from None
    return [(text, label) for label, _, text in (line.partition("\t") for line in lines)
            if label in ("ham", "spam") and text.strip()]


def read_imdb(archive):
    """IMDb 影评：tar.gz 里 aclImdb/{train,test}/{pos,neg}/*.txt，一个文件一条；边解压边读，不落盘。"""
    rows = []
    try:
        with tarfile.open(archive, "r:gz") as tf:
            for member in tf:
                parts = member.name.split("/")
                if member.isfile() and len(parts) == 4 and parts[2] in ("pos", "neg") \
                        and parts[1] in ("train", "test") and parts[3].endswith(".txt"):
                    text = tf.extractfile(member).read().decode("utf-8", errors="replace")
                    rows.append((text.replace("<br />", " "), parts[2]))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"{archive} 不是预期的 IMDb 压缩包（{type(err).__name__}）；删掉它重新下载"
                        ) from None
    return sorted(rows)  # 压缩包里的顺序不保证：排好序，划分才可复现


def prepare_dataset(name, seed=123):
    """下载并转换成 cache/<name>/{train,val,test}.tsv，返回该目录；转换过的直接复用。
    sms-spam 照书里的做法：正常短信随机抽到和垃圾短信一样多（两类平衡），再按 70/10/20 划分；
    imdb：5 万条（正负各半）打乱后按 35000/5000/10000 划分。"""
    folder = CACHE_DIR / name
    if (folder / "test.tsv").is_file():  # test.tsv 最后写：它在，说明三个文件都完整
        return folder
    archive = download(name)
    rows = read_sms_spam(archive) if name == "sms-spam" else read_imdb(archive)
    rng = random.Random(seed)
    if name == "sms-spam":
        spam = [r for r in rows if r[1] == "spam"]
        ham = rng.sample([r for r in rows if r[1] == "ham"], min(len(spam), len(rows) - len(spam)))
        rows = spam + ham
    if len(rows) < 10:
        raise UserError(f"{archive} 里只读到 {len(rows)} 条，太少了；删掉它重新下载")
    rng.shuffle(rows)
    cut1, cut2 = int(len(rows) * 0.7), int(len(rows) * 0.8)
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", rows[:cut1]), ("val", rows[cut1:cut2]), ("test", rows[cut2:])):
        # 文本里的制表符、换行换成空格：一行一条、一个制表符分隔标签
        body = "".join(f"{label}\t{' '.join(text.split())}\n" for text, label in part)
        tmp = folder / f"{split}.tsv.tmp"
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, folder / f"{split}.tsv")
    print(f"{name}：{len(rows):,} 条 → {folder}"
          f"（train/val/test = {cut1}/{cut2 - cut1}/{len(rows) - cut2}）")
    return folder


# —— 命令行：每个旗标的中文说明，开工前的范围检查 ——
def build_parser():
    p = ArgParser(description="分类任务微调：把 GPT 改成垃圾短信分类器（默认：data/sms 中文短信）")
    p.add_argument("--dataset", choices=list(LABELS), default="sms-zh",
                   help="sms-zh=随项目发布的中文短信（默认）；sms-spam=UCI 英文短信（需联网下载）；"
                        "imdb=IMDb 5 万条影评情感（需联网下载，约 80 MB）")
    p.add_argument("--data", help="含 train.tsv、val.tsv、test.tsv（每行 标签<TAB>文本）的目录，"
                                  "标签用 --dataset 的那两个")
    p.add_argument("--init", default="auto",
                   help=f"起点：auto=有 {PRETRAINED} 就用它（04 预训练的结果），否则随机初始化（默认）；"
                        "random；一个 *.pt 检查点；gpt2/gpt2-medium/…=真实 GPT-2 权重（书中的设定）")
    p.add_argument("--model", choices=["tiny", "mini"], help="随机初始化时的模型尺寸（默认 mini）")
    p.add_argument("--trainable", nargs="+", metavar="MODE",
                   help="训练哪些参数：head | last-block | last-n N | all（默认：预训练起点用 last-block，"
                        "随机起点用 all——冻住随机参数没有意义）")
    p.add_argument("--token-position", choices=["last", "first", "mean"], default="last",
                   help="用哪个位置的输出分类（默认 last：只有它看过整条文本）")
    p.add_argument("--pad-to", choices=["longest", "context"], default="longest",
                   help="填充到本批最长（默认）或模型的整个上下文长度（慢：多算了许多填充；因果掩码下每条的输出不变）")
    p.add_argument("--no-causal-mask", action="store_true", help="对比实验：去掉因果掩码（双向注意力）")
    for flag, kind, text in (("--epochs", int, "训练轮数"), ("--batch-size", int, "每批几条"),
                             ("--lr", float, "AdamW 峰值学习率（之后线性降到 0）"),
                             ("--weight-decay", float, "AdamW 权重衰减"),
                             ("--drop-rate", float, "微调时的 dropout 概率"),
                             ("--seed", int, "随机种子，CPU 上完全可复现"),
                             ("--compare-epochs", int, "--compare 时每组训练几轮")):
        key = flag[2:].replace("-", "_")
        quick = f"，--quick 时 {QUICK[key]}" if key in QUICK else ""
        p.add_argument(flag, type=kind, help=f"{text}（默认 {DEFAULTS[key]}{quick}）")
    p.add_argument("--max-length", type=int, help="每条文本最多保留几个 token（默认：模型的上下文长度）")
    p.add_argument("--limit", type=int, help="每个划分最多用几条（先打乱再取；--quick 时 300）")
    p.add_argument("--out-dir", default="runs/classify", help="best.pt（验证集上最好的一轮）的目录")
    p.add_argument("--predict", action="append", metavar="TEXT",
                   help="不训练：用 out-dir 的 best.pt 给这段文本分类（可给多次）")
    p.add_argument("--interactive", action="store_true", help="不训练：在终端里逐条输入、分类")
    p.add_argument("--compare", action="store_true",
                   help="对比实验：取位置、训练哪些层、填充、因果掩码，各训练 --compare-epochs 轮，打印一张表")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="计算设备，auto = cuda > mps > cpu")
    p.add_argument("--quick", action="store_true", help="冒烟测试：tiny 随机模型、每个划分 300 条、2 轮")
    return p


def parse_trainable(words):
    """["last-n", "2"] → ("last-n", 2)；["last-block"] → ("last-n", 1)；None → None（自动选）。"""
    if words is None:
        return None
    mode, rest = words[0], words[1:]
    if mode in ("head", "all", "last-block") and not rest:
        return ("last-n", 1) if mode == "last-block" else (mode, 0)
    if mode == "last-n" and len(rest) == 1 and rest[0].isdigit() and int(rest[0]) >= 1:
        return ("last-n", int(rest[0]))
    raise UserError(f"--trainable 应为 head、last-block、last-n N（N ≥ 1）或 all，收到 {' '.join(words)}")


def check_args(s):
    """开工之前检查每个数值设置（负数、零、NaN、大得离谱），以及文件和目录。"""
    limits = {"epochs": (1, 10_000), "batch_size": (1, 4096), "lr": (1e-8, 1),
              "weight_decay": (0, 1), "drop_rate": (0, 0.9), "seed": (0, 2**32 - 1),
              "compare_epochs": (1, 1000),
              "max_length": (1, 1 << 20), "limit": (1, 10**9)}
    for key, (low, high) in limits.items():
        if getattr(s, key) is not None:
            check_range(f"--{key.replace('_', '-')}", getattr(s, key), low, high)
    if Path(s.out_dir).exists() and not Path(s.out_dir).is_dir():
        raise UserError(f"--out-dir {s.out_dir} 已存在，但不是目录")
    if s.predict and any(not text.strip() for text in s.predict):
        raise UserError("--predict 的文本是空的")


# ===== 附录：前几章的部件（逐字复制，读过前几章可以跳过）=====
# 放在文件末尾，是为了让本章从第 1 节就讲新东西；Python 在调用时才查找这些名字，
# 所以定义写在后面也没关系。

# 来自 04_pretrain.py


# mini 是默认：约 4 分钟的训练就比 bigram 基线低约 0.5 nats/token；tiny 只用于 --quick 冒烟。
# mini 浅（2 层）、上下文短（64）是实测选的：CPU 上同样的时间里，它走的步数多、每批的窗口也多（见 README）
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


def save_checkpoint(path, ckpt):
    """先写到同目录的临时文件，落盘后再 os.replace 成正式文件名：这一步是原子的，
    进程在任何时刻被杀，磁盘上要么是旧的完整检查点，要么是新的完整检查点。"""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # fsync：确认数据真正写到了磁盘上再改名，断电后也不会得到一个"名字对、内容空"的文件
    with open(tmp, "wb") as fh:
        torch.save(ckpt, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# —— 内存：先估算，放不下就用一行中文拒绝，而不是等系统把进程杀掉 ——
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


# —— 检查点里的分词器 ——
def tokenizer_record(enc):
    """检查点里记下分词器本身（项目分词器连同 ranks 一起存），载入时用同一个。"""
    if enc.name == "gpt2":
        return {"kind": "gpt2", "name": enc.name}
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda item: item[1])
    # tiktoken 没有公开导出 ranks 的接口，这里读它的内部属性；按 rank 排序后存成 base64 列表
    return {"kind": "project", "name": enc.name, "pat_str": enc._pat_str,
            "special_tokens": enc._special_tokens,
            "mergeable_ranks": [base64.b64encode(tok).decode("ascii") for tok, _ in ranks]}


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


# —— Ctrl-C：做完这一步、存好检查点再退出 ——
class StopFlag:
    """Ctrl-C 不立刻打断：只记下"要停"，当前这一步做完后保存检查点再退出，
    这样参数不会停在"更新了一半"的状态。再按一次 Ctrl-C 才强制退出。"""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        # 记下原来的处理函数，退出训练循环时还原：交互模式等其他地方的 Ctrl-C 行为不受影响
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        # 第二次 Ctrl-C：用户不想等了，恢复 Python 默认行为（立即抛出 KeyboardInterrupt）
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n收到 Ctrl-C：做完这一步就保存检查点并退出（再按一次强制退出）", flush=True)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


# 来自 01_tokenizer.py：错误类型、命令行工具与分词器
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


# 来自 03_gpt.py：GPT 模型与生成（LayerNorm、GELU 是换成融合内核的变体）
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


# 来自 01/02/03：设备、计时与空闲内存
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


# 来自 03_gpt.py：下载并载入 Hugging Face 上的 GPT-2 权重
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
