"""04_pretrain.py — 在无标注文本上预训练 GPT（本课程的主线任务）

本章你会学到：
- 语料 → token 缓存（np.memmap）：任意大的语料只切一次词，训练时按需取批次，不占内存
- 语言模型的训练目标：错开一位的交叉熵、困惑度，以及模型必须赢过的计数基线（unigram、bigram）
- AdamW（只对矩阵做权重衰减，嵌入和输出头用大 10 倍的学习率）、预热 + 余弦退火、梯度裁剪、梯度累积
- 一次训练的全部状态装进一个 RunState：可逐位续训的检查点、Ctrl-C 安全退出
- load_init：随机初始化、本章的检查点、GPT-2 权重，一个函数载入（后面各章都复制它）
- 进阶：SDPA、词表补齐、融合 AdamW、bf16、compile、MFU、时间预算、内存、超参数搜索、交互生成、--data
运行：python 04_pretrain.py            # 默认：mini 模型训练约 225 秒（步数按本机速度换算），共约 4 分钟
      python 04_pretrain.py --quick    # 冒烟：tiny 模型 40 步，2 核 CPU 约 8 秒
"""
import argparse
import base64
import contextlib
import copy
import csv
import hashlib
import http.client
import importlib.util
import json
import math
import mmap
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

# 本章用到的 UserError、ArgParser、check_range、GPTModel、generate、load_gpt2_hf 等来自 01–03，
# 见文末附录。


# ===== 1. 语料 → token 缓存 =====
# 训练时要反复随机取"一段连续的 token"。先把整个语料切词一次，写成磁盘上的 uint16/uint32 数组，
# 再用 np.memmap 映射进来：取一个批次只读几 KB，几 GB 的语料也不会整个进内存；下次运行直接复用。

CACHE_DIR = Path(__file__).resolve().parent / "cache"
VAL_EVERY = 10  # 每 10 个文本块留 1 块做验证集：验证集与训练集不重叠，但来自同样的分布


def corpus_key(files, tokenizer_name):
    """缓存的钥匙 = 语料内容 + 分词器：任何一个变了，就重新切词。"""
    # 哈希内容而不是文件名或修改时间：改一个字就会换钥匙，复制、挪动语料则仍能命中缓存
    digest = hashlib.sha256(tokenizer_name.encode())
    for file in files:
        with open(file, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()[:16]


def iter_documents(files, chunk_chars=1 << 20):
    """逐个文档、每次约 1M 字符地读文本，在换行处切块：再大的文件也不会一次读进内存。
    产出 (是否文档开头, 文本块)。"""
    for file in files:
        try:
            if file.suffix == ".jsonl":  # JSON Lines：每行的 "text" 是一篇文档（见进阶 iter_jsonl）
                yield from ((True, text) for text in iter_jsonl(file))
                continue
            with open(file, encoding="utf-8") as fh:
                first, carry = True, ""
                # 上一块末尾没读完的那一行（carry）接到下一块开头，保证切口总落在换行处
                while block := fh.read(chunk_chars):
                    block = carry + block
                    cut = block.rfind("\n") + 1 or len(block)
                    carry = block[cut:]
                    yield first, block[:cut]
                    first = False
                # 空文件也产出一个空块：它仍算一篇文档（前面放一个 <|endoftext|>）
                if carry or first:
                    yield first, carry
        except UnicodeDecodeError as err:
            raise UserError(f"{file} 不是 UTF-8 文本（第 {err.start} 字节附近无法解码）") from None


def build_token_cache(files, enc, folder):
    """把语料切词写进 folder/train.bin 与 folder/val.bin；每个文档前放一个 <|endoftext|>，
    让模型知道"这里换了一篇文章"。先写临时文件，成功后才改名：中途被杀也不会留下半个缓存。"""
    folder.mkdir(parents=True, exist_ok=True)
    # 词表不超过 65536 时每个 token 只占 2 字节（项目分词器 2048、GPT-2 的 50257 都是）
    dtype = np.uint16 if enc.n_vocab <= 2 ** 16 else np.uint32
    counts = {"train": 0, "val": 0}
    outs = {split: open(folder / f"{split}.bin.tmp", "wb") for split in counts}
    batch, batch_chars = [], 0

    def flush():
        # encode_ordinary_batch 用多线程切词（tiktoken 的 Rust 内核），大语料快得多
        all_ids = enc.encode_ordinary_batch([text for _, _, text in batch])
        for (start, split, _), ids in zip(batch, all_ids):
            arr = np.array(([enc.eot_token] if start else []) + ids, dtype=dtype)
            # tofile 直接把原始字节追加到文件末尾：没有文件头，np.memmap 读回来就是同一个数组
            arr.tofile(outs[split])
            counts[split] += len(arr)
        batch.clear()

    with contextlib.ExitStack() as stack:
        for fh in outs.values():
            stack.enter_context(fh)
        for n_chunks, (start, text) in enumerate(iter_documents(files)):
            # 按"块"而不是按 token 划分：一篇文章整块进验证集，验证损失才反映"没见过的文字"
            split = "val" if n_chunks % VAL_EVERY == VAL_EVERY - 1 else "train"
            batch.append((start, split, text))
            batch_chars += len(text)
            if batch_chars > 1 << 19:  # 攒约 50 万字符切一次：够多线程并行，又只占几十 MB 内存
                flush()
                batch_chars = 0
        flush()
    # 两个文件都完整写好才改名，最后写 meta.json：有 meta.json 就说明缓存是完整的
    for split in counts:
        os.replace(folder / f"{split}.bin.tmp", folder / f"{split}.bin")
    meta = {"dtype": np.dtype(dtype).name, **counts, "files": len(files)}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return meta


def load_corpus(data_path, enc, context_length):
    """返回 (train_tokens, val_tokens) 两个 np.memmap，缓存不存在时先建。data_path 的写法见进阶。"""
    files = find_text_files(data_path)
    folder = CACHE_DIR / f"tokens-{corpus_key(files, enc.name)}"
    # 缓存目录名里带着内容哈希，所以只要 meta.json 在，就可以放心复用
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        print(f"复用 token 缓存 {folder}（{meta['train'] + meta['val']:,} 个 token）")
    else:
        t0 = time.perf_counter()
        meta = build_token_cache(files, enc, folder)
        n_chars = sum(f.stat().st_size for f in files)
        print(f"切词：{len(files)} 个文件、{n_chars:,} 字节 → {meta['train'] + meta['val']:,} 个 token，"
              f"用时 {time.perf_counter() - t0:.1f} 秒，缓存于 {folder}")
    # 每篇文档至少贡献一个 <|endoftext|>；token 总数不比文件数多，说明一个字也没有
    if meta["train"] + meta["val"] <= len(files):
        raise UserError(f"语料 {data_path} 是空的（没有任何文字）")
    # mode="r"：只读映射，数据留在磁盘（和操作系统的页缓存）里，用到哪页才读哪页
    train, val = (np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r")
                  if meta[split] else np.zeros(0, dtype=meta["dtype"])
                  for split in ("train", "val"))
    if len(val) < context_length + 1:
        # 语料太小、凑不出验证块时：退而取训练 token 的最后 10% 做验证
        cut = int(len(train) * 0.9)
        train, val = train[:cut], train[cut:]
    if min(len(train), len(val)) < context_length + 1:
        raise UserError(f"语料太短：只有 {meta['train'] + meta['val']} 个 token，"
                        f"不够切出一个长度为 {context_length} 的上下文窗口（可用 --context-length 调小）")
    return train, val


def get_batch(tokens, batch_size, context_length, generator, device):
    """随机取 batch_size 个起点，各截 context_length+1 个 token：前 n 个是输入，后 n 个是目标。"""
    starts = torch.randint(len(tokens) - context_length, (batch_size,), generator=generator)
    # 每个窗口只从 memmap 读 context_length+1 个数；np.stack 之后才是内存里的小数组
    windows = np.stack([tokens[s:s + context_length + 1] for s in starts.tolist()])
    # nn.Embedding 和 cross_entropy 要求 int64 下标；uint16 只是存盘用的紧凑格式
    windows = torch.from_numpy(windows.astype(np.int64))
    # 目标就是输入右移一位：y[i, t] 是 x[i, 0..t] 之后的下一个 token
    x, y = windows[:, :-1], windows[:, 1:]
    if device.type == "cuda":
        # 锁页内存 + non_blocking：拷贝到显卡与计算重叠进行
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in (x, y))
    return x.to(device), y.to(device)



# ===== 2. 模型、分词器与起点：load_init =====
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


# ===== 3. 训练目标：交叉熵与困惑度 =====
# 输入是 token[0..n-1]，目标是 token[1..n]：每个位置都在预测"下一个词"，一个窗口就有 n 个训练样本。
# 交叉熵 = -log(模型给正确下一个词的概率) 的平均；困惑度 = exp(交叉熵)，
# 可读作"模型平均在多少个候选词之间犹豫"：随机初始化时约等于词表大小，学得越好越小。

# 模型要赢过"只会数数"的基线，才算学到了东西。unigram 只看每个词多常见；bigram 只看前一个词
# （数训练集里"v 后面跟 w"的次数）。Transformer 看得见整段上下文，验证损失必须明显低于 bigram：
# 只和它打平，说明模型学到的不过是"上一个词后面常跟什么"，注意力和多层网络都白费了。
BASELINE_TOKENS = 20_000_000  # 大语料只数前这么多 token：基线已经够准，计数的内存却随它线性增长


def count_baselines(train, val, vocab_size):
    """验证集上的交叉熵 {"unigram": …, "bigram": …}，nats/token。bigram 用插值 Kneser-Ney 平滑：
    P(w|v) = max(c(v,w) − d, 0)/c(v) + d·N(v•)/c(v)·P_cont(w)，N(v•) = v 后面跟过几种不同的词。
    P_cont(w) 按"w 跟在几种不同的词后面"算：没见过的组合也有概率，只跟一个词连用的词（"乓"）不占便宜。"""
    V = vocab_size
    train, val = (np.asarray(t[:BASELINE_TOKENS], dtype=np.int64) for t in (train, val))
    prev, nxt = val[:-1], val[1:]
    unigram = np.bincount(train, minlength=V) + 1.0  # 加一平滑：没见过的词也不是零概率
    # 把一对 (v, w) 编成一个整数 v·V + w：np.unique 一次数出所有出现过的组合与次数
    pairs, counts = np.unique(train[:-1] * V + train[1:], return_counts=True)
    n1, n2 = np.sum(counts == 1), np.sum(counts == 2)
    # 折扣 d 的经典估计（Ney 1994）：只出现一次的组合越多，扣得越多。d 必须大于 0，否则没见过的组合
    # 概率为 0、损失为无穷大；没有只出现一次的组合时（玩具语料）取常用的 0.75
    d = n1 / (n1 + 2 * n2) if n1 else 0.75
    c_v = np.bincount(pairs // V, weights=counts, minlength=V)
    n_v = np.bincount(pairs // V, minlength=V)
    p_cont = np.bincount(pairs % V, minlength=V) + 1.0
    p_cont /= p_cont.sum()
    # 在排好序的 pairs 里二分查找验证集的每一对：找到就是它在训练集里的次数，否则是 0
    at = np.searchsorted(pairs, prev * V + nxt).clip(max=len(pairs) - 1)
    c_vw = np.where(pairs[at] == prev * V + nxt, counts[at], 0)
    seen = c_v[prev] > 0  # 前一个词在训练集里从没出现过：只能退回 P_cont
    p = np.where(seen, (np.maximum(c_vw - d, 0) + d * n_v[prev] * p_cont[nxt])
                 / np.maximum(c_v[prev], 1), p_cont[nxt])
    return {"unigram": float(-np.log(unigram[nxt] / unigram.sum()).mean()),
            "bigram": float(-np.log(p).mean())}


def calc_loss_batch(model, x, y):
    # x、y: (batch, context_length)；logits: (batch, context_length, vocab_size)
    logits = model(x)
    # logits 转成 fp32 再算 softmax：bf16 下直接算交叉熵会丢精度
    # 摊平成 (batch·context_length, vocab_size) 与 (batch·context_length,)：每个位置都是一道"猜下一个词"的题
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


@torch.no_grad()
def evaluate(state, s):
    """在训练集和验证集上各取 eval_iters 个批次求平均损失。固定随机种子取批次：
    每次评估看的是同一批数据，曲线才可比；也不会扰动训练用的随机数。"""
    # eval()：关掉 dropout，评估结果才稳定；结束时再切回 train()
    state.model.eval()
    result = {}
    for name, tokens in state.splits.items():
        # 独立的随机数生成器：评估取哪些批次与训练进度无关，也不影响训练的随机序列
        gen = torch.Generator().manual_seed(1234)
        losses = []
        for _ in range(s.eval_iters):
            x, y = get_batch(tokens, s.batch_size, state.context_length, gen, state.device)
            with state.autocast():
                losses.append(calc_loss_batch(state.model, x, y).item())
        # 平均若干批次：单个批次的损失随抽到的文字波动很大
        result[name] = sum(losses) / len(losses)
    state.model.train()
    return result


def sample_text(state, s, prompt, max_new_tokens=40):
    """用固定提示词采样一段：每次评估都看同一个开头，读者能看到文字一点点变通顺。"""
    model, enc = state.model, state.tokenizer
    model.eval()
    # (1, 提示词长度)：生成函数按批处理，这里批大小为 1；空提示从 <|endoftext|>（新文档）开始
    ids = torch.tensor([enc.encode(prompt, allowed_special="all") or [enc.eot_token]],
                       device=state.device)
    # 补齐出来的词表行不能被采样，所以只看前 enc.n_vocab 个 logits
    real_vocab = lambda idx: model(idx)[..., :enc.n_vocab]
    with torch.random.fork_rng(devices=[]):  # 采样不消耗训练的随机数：续训才能逐位复现
        torch.manual_seed(s.seed)
        out = generate(real_vocab, ids, max_new_tokens, state.context_length, temperature=0.8,
                       top_k=40, eos_id=enc.eot_token, repetition_penalty=s.repetition_penalty)
    model.train()
    return enc.decode(out[0, ids.shape[1]:].tolist()).replace("\n", " ")


# ===== 4. 优化器与学习率 =====

def make_optimizer(model, lr, weight_decay, impl, embed_lr_mult=1.0):
    """AdamW，参数分三组，每组记下自己的学习率倍数 lr_mult（train_step 按它缩放当步的学习率）：
    - 嵌入（词、位置）和输出头：lr × embed_lr_mult。用块内矩阵那么小的学习率，模型要几百步才学会
      "看当前这个词"，这期间损失停在 unigram 附近：Adam 每步只把参数挪动约 lr，词表那一维的每一行
      又只在它的词出现时才有梯度。实测（宽 128 的 4 层模型，300 步后的验证损失）：都不放大 5.74，只放大嵌入 5.40，只放大输出头 5.48，
      两者都放大 10 倍 5.10；同样的放大用在所有参数上（整体 lr 1e-2）反而更差：6.15；
    - 其余矩阵（线性层权重）：做权重衰减；
    - 偏置和 LayerNorm 的 scale/shift（dim == 1）：数量少，衰减它们只会限制平移/缩放的自由，不起正则作用。"""
    vocab_side = {id(p) for part in (model.tok_emb, model.pos_emb, model.out_head)
                  for p in part.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in vocab_side], "lr_mult": embed_lr_mult,
               "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) not in vocab_side and p.dim() >= 2],
               "lr_mult": 1.0, "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "lr_mult": 1.0, "weight_decay": 0.0}]
    # fused：一个内核更新所有参数；foreach：按张量列表批量更新；loop：逐个参数更新（最慢）
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True},
             "loop": {"foreach": False}}[impl]
    # beta2 = 0.95（而非默认 0.999）：二阶矩更快跟上梯度尺度的变化，大模型训练里更稳（GPT-3 的设置）
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **flags)


def lr_at(step, max_lr, warmup_steps, total_steps, min_lr):
    """线性预热到 max_lr，再余弦退火到 min_lr。预热：刚初始化时梯度方向很乱，大步长容易把模型带偏；
    余弦退火：后期步子变小，让损失在谷底稳定下来。step 从 1 开始计。"""
    # 预热阶段：第 1 步是 max_lr/warmup_steps，第 warmup_steps 步正好到 max_lr
    if step <= warmup_steps:
        return max_lr * step / max(1, warmup_steps)
    # progress 从 0 走到 1，cos 从 1 降到 -1：学习率从 max_lr 平滑地降到 min_lr，超过总步数后停在 min_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    # progress = 0.5 时 cos = 0，学习率正好是 max_lr 与 min_lr 的中点（测试就检查这一点）
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


# ===== 5. 一次训练的状态，与检查点 =====
# 训练循环读写的一切都在 RunState 里；"设置"（学习率、批次……用户要的）另放在 s 里，训练中不变。
# 检查点 = RunState + 设置：把它存下来再读回，就能从中断处逐位相同地接着训练。

@dataclass
class RunState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: tiktoken.Encoding
    splits: dict                  # {"train": 训练 token, "val": 验证 token}，都是 np.memmap
    device: torch.device
    dtype: str                    # 实际用的精度 "fp32" / "bf16"（--dtype auto 已选定），续训沿用
    context_length: int           # 训练窗口：--context-length，没给就用满模型的上下文
    data_gen: torch.Generator     # 取批次专用的随机数生成器：续训时恢复它，批次序列才接得上
    step: int = 0
    tokens_seen: int = 0
    history: list = field(default_factory=list)  # 每步一个 dict，就是 history.csv 的一行
    train_seconds: float = 0.0    # 只算训练步（不含评估、采样、存盘）的耗时，用来算 token/s
    timed_steps: int = 0
    baselines: dict = field(default_factory=dict)  # {"unigram": …, "bigram": …}：验证集上的计数基线

    def autocast(self):
        # autocast 只把适合低精度的运算（矩阵乘法）换成 bf16；LayerNorm、softmax 等仍用 fp32
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16")


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


def checkpoint_state(state, s):
    return {
        "config": state.model.cfg, "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(), "tokenizer": tokenizer_record(state.tokenizer),
        "step": state.step, "tokens_seen": state.tokens_seen, "history": state.history,
        "dtype": state.dtype,
        # 随机数状态：dropout 用全局生成器，取批次用 data_gen；两者都还原，续训才能逐位相同
        "rng": {"torch": torch.get_rng_state(), "data": state.data_gen.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        # 只存简单类型：weights_only=True 的 torch.load 只认张量和基本类型
        "settings": {k: v for k, v in vars(s).items() if isinstance(v, (int, float, str, bool))},
    }


def restore(state, ckpt):
    """恢复优化器、步数、数据位置与随机数状态：接下来的每一步与不中断时逐位相同。"""
    # 优化器里存着每个参数的一阶/二阶矩：续训必须一并恢复，否则相当于重新开始预热
    try:
        state.optimizer.load_state_dict(ckpt["optimizer"])
        state.data_gen.set_state(ckpt["rng"]["data"])
        torch.set_rng_state(ckpt["rng"]["torch"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise UserError(f"检查点的优化器或随机数状态与模型不匹配（{type(err).__name__}）") from None
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    state.step, state.tokens_seen = ckpt["step"], ckpt["tokens_seen"]
    state.history = [dict(row) for row in ckpt["history"]]
    print(f"从第 {state.step} 步继续（已见 {state.tokens_seen:,} token）")


# ===== 6. 训练循环 =====

def train_step(state, s, forward):
    """一次参数更新：累积 grad_accum 个小批次的梯度（等效于大 batch，却只占小 batch 的内存）。
    forward 是做前向的模块：state.model 本身，或 torch.compile 编译过的它（两者共享参数）。"""
    lr = lr_at(state.step + 1, s.lr, s.warmup_steps, s.max_steps, s.lr * s.min_lr_ratio)
    for group in state.optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    total = 0.0
    for _ in range(s.grad_accum):
        x, y = get_batch(state.splits["train"], s.batch_size, state.context_length,
                         state.data_gen, state.device)
        with state.autocast():
            # 除以累积次数：几个小批次的梯度相加后，正好等于它们合成的大批次的平均梯度
            loss = calc_loss_batch(forward, x, y) / s.grad_accum
        loss.backward()
        total += loss.item()
    # 梯度裁剪：偶尔一个"坏批次"会给出巨大的梯度，把范数压到阈值以内，防止一步把模型带飞
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), s.grad_clip)
    state.optimizer.step()
    # set_to_none=True：直接丢掉梯度张量而不是逐元素清零，省一次写内存；下一次 backward 会新建
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens_seen += s.batch_size * state.context_length * s.grad_accum
    return total, lr


def report_eval(state, s):
    """评估 + 用固定开头采样一段，打印出来；返回要记进这一步历史的两个平均损失。"""
    losses = evaluate(state, s)
    base = state.baselines  # 最后一项是负数，模型才比"只看前一个词"的计数强
    print(f"  评估：训练 {losses['train']:.3f}  验证 {losses['val']:.3f}（困惑度 "
          f"{math.exp(losses['val']):.1f}）｜基线 bigram {base['bigram']:.3f}、unigram "
          f"{base['unigram']:.3f}｜验证 − bigram = {losses['val'] - base['bigram']:+.3f}")
    print(f"  样本：{shorten(s.prompt)}{sample_text(state, s, s.prompt)}")
    return {"eval_train_loss": losses["train"], "eval_val_loss": losses["val"]}


def train(state, s):
    """主循环：训练 → 定期评估、采样、存检查点。返回停下的原因：done、stop_at 或 interrupted。"""
    out_dir = Path(s.out_dir)
    # torch.compile 把模型编译成融合内核：第一次调用要编译几十秒，之后每步更快；参数与 model 共享
    forward = torch.compile(state.model) if s.compile else state.model
    first_step, t_start, reason = state.step, time.perf_counter(), "done"
    if state.step == 0:  # 训练前先评估一次：这就是"起点"，随机模型的损失约为 ln(词表大小)
        state.history.append({"step": 0, "tokens_seen": 0, "lr": 0.0, **report_eval(state, s)})
    # StopFlag（见进阶）：Ctrl-C 只记下"要停"，做完这一步、存好检查点再退出
    with StopFlag() as stop:
        while state.step < s.max_steps and reason == "done":
            t0 = time.perf_counter()
            loss, lr = train_step(state, s, forward)
            sync(state.device)
            if s.compile and state.step == first_step + 1:
                # 编译发生在第一次调用里：单独报出来，不算进速度，否则 token/s 会被严重低估
                print(f"  （第一步含 torch.compile 编译：{time.perf_counter() - t0:.1f} 秒，不计入速度）")
            else:
                state.train_seconds += time.perf_counter() - t0
                state.timed_steps += 1
            row = {"step": state.step, "tokens_seen": state.tokens_seen, "lr": lr,
                   "train_loss": loss}
            state.history.append(row)
            last = state.step == s.max_steps
            if state.timed_steps and (state.step % s.log_every == 0 or last):
                per_step = state.train_seconds / state.timed_steps
                tok_s = s.batch_size * state.context_length * s.grad_accum / per_step
                print(f"步 {state.step:>5}/{s.max_steps}  loss {loss:.3f}  lr {lr:.2e}  "
                      f"{tok_s:,.0f} tok/s  已用 {time.perf_counter() - t_start:.0f}s  "
                      f"剩余约 {(s.max_steps - state.step) * per_step:.0f}s", flush=True)
            if state.step % s.eval_every == 0 or last:
                row.update(report_eval(state, s))
            if stop.requested or state.step == s.stop_at:
                reason = "interrupted" if stop.requested else "stop_at"
            if "eval_val_loss" in row or reason != "done":
                save_checkpoint(out_dir / "ckpt.pt", checkpoint_state(state, s))
                write_history(out_dir, state.history)
    return reason


# ===== 7. 主程序：命令行 → 设置 → 搭好 RunState → 训练 =====
# 命令行里的设置默认是 None：分得清"用户给了"还是"没给"，没给的再由 --quick 或检查点决定。
# max_steps 默认也是 None：按 --time-budget 在本机实测换算（进阶 steps_for_budget），快机器多走几步
DEFAULTS = {"model": "mini", "batch_size": 32, "grad_accum": 1, "max_steps": None,
            "time_budget": 225.0, "lr": 1e-3, "embed_lr_mult": 10.0, "min_lr_ratio": 0.1,
            "warmup_steps": 30, "weight_decay": 0.1, "grad_clip": 1.0, "eval_every": 250,
            "eval_iters": 8, "log_every": 50, "prompt": "从前有一个", "repetition_penalty": 1.3,
            "optimizer": "fused", "dtype": "auto", "seed": 123, "sweep_steps": 60}
# --quick：tiny 模型、少量步数，用于测试和第一次试跑
QUICK = {"model": "tiny", "max_steps": 40, "eval_every": 20, "eval_iters": 2, "warmup_steps": 5,
         "lr": 3e-3, "log_every": 10, "batch_size": 8, "sweep_steps": 5, "sweep_trials": 2}
# 续训时沿用检查点里的这些设置（命令行显式给出的除外）：于是单独一个 --resume 也能原样接上
RESUMED = ("context_length", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_iters",
           "log_every", "grad_clip", "prompt", "repetition_penalty", "optimizer", "seed")
# 学习率计划总是沿用检查点的（只有总步数可以在续训时改大）：否则接上的曲线与不中断时不同
SCHEDULE = ("lr", "embed_lr_mult", "warmup_steps", "min_lr_ratio", "weight_decay")
SETTING_FLAGS = [  # (旗标, 类型, 说明)：说明后面自动补上 DEFAULTS / QUICK 里的取值
    ("--batch-size", int, "每个小批次的序列数"),
    ("--grad-accum", int, "梯度累积的小批次数：等效批次 = 它 × --batch-size"),
    ("--max-steps", int, "参数更新总步数（给了就不按时间预算换算）"),
    ("--time-budget", float, "没给 --max-steps 时：训练循环大约用多少秒，开训前实测每步耗时换算成步数"),
    ("--lr", float, "峰值学习率"),
    ("--embed-lr-mult", float, "嵌入和输出头的学习率是 --lr 的几倍（为什么见 make_optimizer；--init 权重时默认 1）"),
    ("--min-lr-ratio", float, "余弦退火的终点 = lr × 此比例"),
    ("--warmup-steps", int, "线性预热步数"),
    ("--weight-decay", float, "AdamW 权重衰减，只作用于矩阵"),
    ("--grad-clip", float, "梯度范数裁剪阈值"),
    ("--eval-every", int, "每多少步评估、采样、存检查点"),
    ("--eval-iters", int, "每次评估平均多少个批次"),
    ("--log-every", int, "每多少步打印一行进度"),
    ("--prompt", str, "评估时用来采样的固定开头，不能长于上下文"),
    ("--repetition-penalty", float, "采样时压低已出现过的词：1 = 不压；小模型不压容易陷进“““”循环"),
    ("--seed", int, "随机种子，CPU 上完全可复现"),
    ("--sweep-steps", int, "--sweep 时每组训练的步数"),
]


def build_parser():
    p = ArgParser(description="在无标注文本上预训练 GPT（默认：data/ 语料 + 项目分词器）")
    p.add_argument("--data", default=str(DATA_DIR / "corpus"),
                   help="语料：.txt/.jsonl 文件、含它们的目录（递归）或 gutenberg:编号（默认 data/corpus）")
    p.add_argument("--model", choices=list(MODEL_SIZES),
                   help="随机初始化时的模型尺寸：tiny/mini（CPU）或 GPT-2 的四个尺寸（默认 mini）")
    p.add_argument("--init", default="random",
                   help="起点：random=随机初始化（默认）；本章写出的检查点 *.pt（换新的优化器接着训练）；"
                        "gpt2/gpt2-medium/…=从真实 GPT-2 权重继续预训练（改用 GPT-2 分词器）；"
                        "或含 config.json 与 *.safetensors 的目录")
    for flag, text in (("--n-layers", "层数"), ("--n-heads", "注意力头数"),
                       ("--emb-dim", "嵌入维度（须能被头数整除）")):
        p.add_argument(flag, type=int, help=f"覆盖 --model 的{text}")
    p.add_argument("--context-length", type=int, help="上下文长度（训练窗口的 token 数，默认用满模型的）")
    p.add_argument("--drop-rate", type=float, default=0.0,
                   help="dropout 概率（默认 0：几分钟的短训练里它只拖慢速度，数据多、训练久时再开）")
    for flag, kind, text in SETTING_FLAGS:
        key = flag[2:].replace("-", "_")
        quick = f"，--quick 时 {QUICK[key]}" if key in QUICK else ""
        default = "按 --time-budget 换算" if DEFAULTS[key] is None else DEFAULTS[key]
        p.add_argument(flag, type=kind, help=f"{text}（默认 {default}{quick}）")
    p.add_argument("--out-dir", default="runs/pretrain", help="检查点、CSV、损失曲线的目录")
    p.add_argument("--resume", action="store_true",
                   help="从 out-dir/ckpt.pt 逐位相同地接着训练（没给的设置沿用检查点的）")
    p.add_argument("--stop-at", type=int, help="训练到第 N 步就存检查点并退出（模拟中断）")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"],
                   help="auto：实测 bf16 自动混合精度快 1.3 倍以上才用（默认；续训沿用检查点的选择）")
    p.add_argument("--compile", action="store_true", help="用 torch.compile 编译模型")
    p.add_argument("--optimizer", choices=["fused", "foreach", "loop"],
                   help="AdamW 的实现：fused 最快（默认）")
    p.add_argument("--no-sdpa", action="store_true", help="关掉 SDPA，用手写注意力（对比速度）")
    p.add_argument("--no-pad-vocab", action="store_true", help="不把词表补齐到 64 的倍数")
    p.add_argument("--sweep", action="store_true", help="超参数搜索：每组训练 --sweep-steps 步并排名")
    p.add_argument("--sweep-trials", type=int,
                   help=f"搜索多少组（默认全部 {len(SWEEP_GRID)} 组，--quick 时 {QUICK['sweep_trials']}）")
    p.add_argument("--interactive", action="store_true",
                   help="不训练：载入 out-dir 的检查点（或 --init 的权重）在终端里交互生成")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="计算设备，auto = cuda > mps > cpu")
    p.add_argument("--quick", action="store_true",
                   help=f"冒烟测试：tiny 模型、{QUICK['max_steps']} 步（2 核 CPU 约 10 秒）")
    return p


def make_settings(args, ckpt=None):
    """命令行 → 本次运行的设置：一个新的 Namespace，args 本身不改。从低到高层层覆盖：
    默认值 < --quick 的取值 < 检查点里的设置（续训时）< 命令行显式给出的值 < 检查点的学习率计划。"""
    layers = [DEFAULTS, QUICK if args.quick else {}]
    if args.init != "random":  # 已经训练过的嵌入不需要放大学习率，放大只会把它们冲乱
        layers.append({"embed_lr_mult": 1.0})
    if ckpt is not None:
        saved = ckpt["settings"]
        # 检查点记下的是当时实际用的精度（auto 已选定）：沿用它，续训才逐位相同
        layers.append({key: saved[key] for key in RESUMED if key in saved}
                      | {"dtype": ckpt["dtype"]})
    layers.append({key: value for key, value in vars(args).items() if value is not None})
    if ckpt is not None:
        layers.append({key: saved[key] for key in SCHEDULE if key in saved})
        ignored = [f"--{key.replace('_', '-')}" for key in SCHEDULE
                   if getattr(args, key) not in (None, saved.get(key))]
        if ignored:
            print(f"续训沿用检查点的学习率计划，忽略命令行的 {'、'.join(ignored)}")
    merged = dict(vars(args))  # 所有键先到齐（没给的是 None），再一层层盖上去
    for layer in layers:
        merged.update(layer)
    return argparse.Namespace(**merged)


def build_run(s, ckpt=None):
    """按设置搭好一次训练：模型与分词器（续训时来自检查点）、数据、精度、优化器。"""
    device = resolve_device(s.device)
    if ckpt is None:
        dims = ("emb_dim", "n_layers", "n_heads", "context_length")
        config = model_config(s.model, s.drop_rate, not s.no_sdpa,
                              **{key: getattr(s, key) for key in dims})
        if s.init == "random":  # 先按配置估内存：放不下就不必真的分配、初始化
            enc = load_project_tokenizer()
            check_fits(s, dict(config, vocab_size=enc.n_vocab), enc, device)
        torch.manual_seed(s.seed)  # 随机初始化也可复现
        model, enc, _ = load_init(s.init, device, config)
        if not s.no_pad_vocab:
            pad_vocab(model)
    else:
        model = model_from_checkpoint(ckpt).to(device)
        enc = tokenizer_from_record(ckpt["tokenizer"])
    cfg, window = model.cfg, window_for(s, model.cfg)
    # 续训或载入的权重：维度以起点模型为准，命令行若另有要求就说清楚，而不是悄悄忽略
    for key in ("n_layers", "n_heads", "emb_dim"):
        if getattr(s, key) not in (None, cfg[key]):
            raise UserError(f"起点模型的 {key} = {cfg[key]}，与命令行要求的 {getattr(s, key)} 不符")
    check_fits(s, cfg, enc, device)  # 提示词长度与内存：在读数据、分配优化器之前
    train_tokens, val_tokens = load_corpus(s.data, enc, window)
    # 一个探测批次：只用来给 --dtype auto 测速，取自独立的生成器，不影响训练取数
    probe = get_batch(train_tokens, s.batch_size, window, torch.Generator().manual_seed(0), device)
    with torch.random.fork_rng(devices=[]):  # 测速用的随机矩阵不能消耗训练的随机数
        dtype = choose_dtype(s.dtype, model, *probe)
    print(f"模型：{cfg['n_layers']} 层，宽 {cfg['emb_dim']}，{cfg['n_heads']} 头，上下文 {window}，"
          f"词表 {cfg['vocab_size']}（分词器 {enc.name}，{enc.n_vocab} 个 token），"
          f"参数 {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M；训练集 "
          f"{len(train_tokens):,} token，验证集 {len(val_tokens):,} token；设备 {device}，精度 {dtype}")
    base = count_baselines(train_tokens, val_tokens, enc.n_vocab)
    print(f"计数基线（验证集）：unigram {base['unigram']:.3f}，bigram {base['bigram']:.3f} nats/token；"
          f"随机猜 ln({enc.n_vocab}) = {math.log(enc.n_vocab):.3f}。模型要比 bigram 低才算学到了上下文")
    state = RunState(model, make_optimizer(model, s.lr, s.weight_decay, s.optimizer,
                                                    s.embed_lr_mult), enc,
                     {"train": train_tokens, "val": val_tokens}, device, dtype, window,
                     torch.Generator().manual_seed(s.seed), baselines=base)
    if ckpt is not None:
        restore(state, ckpt)  # 放在最后：之前的步骤（建模型、测速）都不能再动随机数
    return state


def run(args):
    ckpt = None
    if args.resume:  # 续训：先读检查点，它记下的设置要参与下面的合并
        ckpt = load_checkpoint(Path(args.out_dir) / "ckpt.pt")
        if not {"settings", "dtype", "optimizer", "rng", "step", "tokens_seen",
                "history"} <= ckpt.keys():
            raise UserError("检查点缺少续训所需的状态（可能是旧版本写出的）；可以用 --init 它，"
                            "从它的权重开始新的训练")
    s = make_settings(args, ckpt)
    check_args(s)
    if s.interactive:
        return interactive(s)
    state = build_run(s, ckpt)
    if s.sweep:  # 超参数搜索：它为每组超参数新建模型，不动上面这个
        return run_sweep(state, s)
    s.max_steps = s.max_steps or steps_for_budget(state, s)  # 没给步数：按时间预算换算
    try:
        Path(s.out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"无法创建 --out-dir {s.out_dir}（{type(err).__name__}）") from None
    finish(state, s, train(state, s))


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as err:
        print(f"错误：{err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # 训练循环之外（切词、评估、交互）按 Ctrl-C：安静退出，已存的文件不受影响
        print("\n已中断。", file=sys.stderr)
        sys.exit(130)


# ===== 进阶：速度、内存、输出细节、超参数搜索、交互生成（第一次读可以跳过）=====

# —— 词表补齐：矩阵维度是 64 的倍数时，矩阵乘法内核能整块处理 ——
def pad_vocab(model, multiple=64):
    """把词表补到 multiple 的倍数（GPT-2 的 50257 → 50304）：新增的行永远不是训练目标，也不会被采样。"""
    old = model.tok_emb.weight.shape[0]
    new = math.ceil(old / multiple) * multiple
    if new == old:
        return model
    weight = model.tok_emb.weight
    with torch.no_grad():
        # 新增的行填 0：它们对应的 id 从不出现在输入里，也被采样时的切片挡在外面
        emb = torch.zeros(new, weight.shape[1], dtype=weight.dtype, device=weight.device)
        emb[:old] = weight
        head = torch.zeros_like(emb)
        head[:old] = model.out_head.weight
    # GPT-2 的输出头与词嵌入是同一个矩阵（权重共享），补齐后也要保持共享
    tied = model.out_head.weight is weight
    model.tok_emb = nn.Embedding.from_pretrained(emb, freeze=False)
    model.out_head.weight = model.tok_emb.weight if tied else nn.Parameter(head)
    # cfg 跟着改：检查点里记下的是补齐后的词表大小，载入时才能建出同样形状的模型
    model.cfg["vocab_size"] = new
    return model


# —— 精度：bf16 只在实测明显更快时才用 ——
def time_train_steps(model, x, y, rounds):
    """fp32 与 bf16 交替各做 rounds 次前向 + 反向（不更新参数），各取最快的一次（秒）。交替、取最快：
    机器忙时单次计时会被别的进程拖慢几倍。反向约占训练的三分之二，只测前向会看错。"""
    best = {"fp32": float("inf"), "bf16": float("inf")}
    for _ in range(rounds):
        for dtype in best:
            sync(x.device)
            t0 = time.perf_counter()
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = calc_loss_batch(model, x, y)
            loss.backward()
            sync(x.device)
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
    # 测速时积累的梯度必须清掉，否则会混进第一步真正的训练
    model.zero_grad(set_to_none=True)
    return best


def choose_dtype(requested, model, x, y):
    """bf16 自动混合精度：矩阵乘法用 bf16（快、省内存），对精度敏感的运算仍是 fp32。
    auto：CUDA 上看显卡是否支持 bf16；CPU 上只有实测快 1.3 倍以上才用——没有原生 bf16 指令的 CPU
    反而慢几十倍；差不多快时选 fp32：结果更准，也不会随计时噪声这次选 bf16、下次选 fp32。"""
    device = x.device
    if requested != "auto" or device.type == "mps":
        return "fp32" if device.type == "mps" else requested
    # Ampere 及更新的显卡原生支持 bf16：吞吐约翻倍，且不像 fp16 那样需要损失缩放
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    # 先用一小段（1 条序列、至多 32 个 token）测 3 轮：便宜，又足以认出"没有原生 bf16"——
    # 那样的 CPU 上整批测一步 bf16 就要几十秒
    best, label = time_train_steps(model, x[:1, :32], y[:1, :32], rounds=3), "一小段"
    if best["bf16"] < 2 * best["fp32"]:  # 像是有原生 bf16（AVX512-BF16、AMX）：用整批再测 3 轮
        best, label = time_train_steps(model, x, y, rounds=3), "整批"
    choice = "bf16" if best["fp32"] >= 1.3 * best["bf16"] else "fp32"
    print(f"精度：实测{label}前向+反向 fp32 {best['fp32'] * 1000:.1f} ms，"
          f"bf16 {best['bf16'] * 1000:.1f} ms → 用 {choice}（bf16 要快 1.3 倍以上才用）")
    return choice


# —— 速度与算力利用率（MFU） ——
def flops_per_token(model, context_length):
    """训练每个 token 的浮点运算数 ≈ 6·(参与矩阵乘法的参数量) + 12·层数·宽度·上下文长度。
    前向每个参数一次乘加（2 次运算），反向约是前向的两倍，合计 6；第二项是注意力的 QKᵀ 与 加权求和。"""
    # 只数线性层：嵌入是查表，几乎不花算力；输出头是线性层，要算进去
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    cfg = model.cfg
    return 6 * matmul_params + 12 * cfg["n_layers"] * cfg["emb_dim"] * context_length


def report_speed(state, s):
    """速度只按训练步计时（不含评估、采样、存盘），所以与其他训练脚本的 token/s 可以直接比较。
    MFU = 实际完成的模型浮点运算 / 硬件峰值：衡量"算力用上了多少"，与模型大小无关，便于横向比较。"""
    if not state.timed_steps:
        return
    tok_s = state.timed_steps * s.batch_size * state.context_length * s.grad_accum
    tok_s /= state.train_seconds
    flops = tok_s * flops_per_token(state.model, state.context_length)
    # 峰值随机器负载起伏：训练刚结束时测三次、取最快，说的是"这台机器、此刻"
    peak_dtype = torch.bfloat16 if state.dtype == "bf16" else torch.float32
    peak, size = max(measure_matmul_peak(state.device, peak_dtype) for _ in range(3))
    print(f"速度：{tok_s:,.0f} token/s，模型算力 {flops / 1e9:.1f} GFLOP/s；本机此刻实测 "
          f"{state.dtype} 矩阵乘峰值 {peak / 1e9:.1f} GFLOP/s（{size}×{size}）→ MFU {flops / peak:.0%}")
    if flops > peak:
        print("（MFU 超过 100%：测峰值时别的进程正占着 CPU，这个比例不可信，机器空闲时再测）")


# —— 时间预算：同一条命令，在慢机器上不超时，在快机器上多学一些 ——
BUDGET_MAX_STEPS = 3000  # 语料只有 64 万个 token：再快的机器也不必走更多步（GPU 上几秒就到顶）


def steps_for_budget(state, s, probe_steps=6):
    """在模型与优化器的副本上实测几步完整的训练（前向、反向、更新），把 --time-budget 换算成步数：
    取 50 的倍数，至少 100、至多 BUDGET_MAX_STEPS。副本用完即弃，随机数先存后还：
    之后的训练与直接给 --max-steps 这个步数时逐位相同（打印出来，方便复现）。"""
    model = copy.deepcopy(state.model)
    trial = replace(state, model=model, data_gen=torch.Generator().manual_seed(s.seed),
                    optimizer=make_optimizer(model, s.lr, s.weight_decay, s.optimizer,
                                             s.embed_lr_mult))
    probe = argparse.Namespace(**{**vars(s), "max_steps": probe_steps})
    times = []
    with torch.random.fork_rng():
        for _ in range(probe_steps):
            t0 = time.perf_counter()
            train_step(trial, probe, model)
            sync(state.device)
            times.append(time.perf_counter() - t0)
    rest = sorted(times[1:])  # 第一步含内存分配等一次性开销，不算；其余取中位数，不怕偶尔一步被打断
    per_step = rest[len(rest) // 2]
    steps = int(min(BUDGET_MAX_STEPS, max(100, s.time_budget / per_step)) // 50 * 50)
    print(f"步数：实测每步 {per_step * 1000:.0f} ms，训练预算 {s.time_budget:g} 秒 → {steps} 步"
          f"（要逐位复现这次训练：--max-steps {steps}）")
    return steps


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


def training_bytes(cfg, batch_size, context_length):
    """训练一步大约要多少字节（按 fp32 粗估，宁多勿少）：参数、梯度、AdamW 的两份矩估计各一份，
    加上反向传播要存下的激活值和 logits。实测 tiny、mini（批次 16–256）的峰值是这个估算的 65%–95%。"""
    tokens = batch_size * context_length
    weights = 16 * param_count(cfg)
    # 每层为反向传播存下约 20 个 emb_dim 宽的向量（LayerNorm 的输入输出、Q/K/V、4 倍宽的前馈……）
    activations = 4 * 20 * tokens * cfg["n_layers"] * cfg["emb_dim"]
    if not cfg.get("use_sdpa", True):  # 手写注意力还要存每个头的 上下文 × 上下文 分数矩阵
        activations += 4 * 3 * tokens * cfg["n_heads"] * context_length * cfg["n_layers"]
    # logits、它的 fp32 副本、softmax、梯度……：每个位置约 5 份词表那么长的向量
    return weights + activations + 5 * 4 * tokens * cfg["vocab_size"]


# —— 开工前的检查：每个数值设置、上下文、提示词、内存 ——
def check_args(s):
    """开工之前检查每个数值设置：负数、零、NaN、无穷、大得离谱，都用一行中文拒绝。
    这里的上限只挡住明显的笔误；放不放得进内存，要等知道模型的大小后再估算（check_fits）。"""
    limits = {
        "n_layers": (1, 256), "n_heads": (1, 1024), "emb_dim": (1, 65536),
        # 每层的因果掩码是 上下文长度² 个布尔值：16384 时已占 256 MB
        "context_length": (2, 16384), "drop_rate": (0, 0.9), "batch_size": (1, 1 << 20),
        "grad_accum": (1, 1 << 16), "max_steps": (1, 10**9), "time_budget": (1, 10**6),
        "warmup_steps": (0, 10**9),
        "stop_at": (1, 10**9), "lr": (1e-8, 1), "embed_lr_mult": (0.01, 100),
        "min_lr_ratio": (0, 1), "weight_decay": (0, 1),
        "grad_clip": (1e-4, 1e4), "eval_every": (1, 10**9), "eval_iters": (1, 10_000),
        "log_every": (1, 10**9), "repetition_penalty": (1, 10), "sweep_steps": (1, 10**6),
        "sweep_trials": (1, len(SWEEP_GRID)), "seed": (0, 2**32 - 1),
    }
    for key, (low, high) in limits.items():
        if getattr(s, key) is not None:
            check_range(f"--{key.replace('_', '-')}", getattr(s, key), low, high)
    # 每个头分到 emb_dim / n_heads 维，除不尽就没法把向量平均切给各个头
    cfg = model_config(s.model, emb_dim=s.emb_dim, n_heads=s.n_heads)
    if cfg["emb_dim"] % cfg["n_heads"]:
        raise UserError(f"--emb-dim {cfg['emb_dim']} 必须能被 --n-heads {cfg['n_heads']} 整除")
    if Path(s.out_dir).exists() and not Path(s.out_dir).is_dir():
        raise UserError(f"--out-dir {s.out_dir} 已存在，但不是目录")


def window_for(s, cfg):
    """训练/生成窗口：--context-length，没给就用满模型的上下文；不能超过模型的位置嵌入。"""
    window = s.context_length or cfg["context_length"]
    if window > cfg["context_length"]:
        raise UserError(f"--context-length {window} 超过模型支持的 {cfg['context_length']}")
    return window


def check_fits(s, cfg, enc, device):
    """开始读数据、分配优化器之前（随机初始化时甚至在建模型之前）：提示词放得进上下文吗？
    训练放得进内存吗？只看模型的配置，不必真的分配。"""
    window = window_for(s, cfg)
    n_prompt = len(enc.encode(s.prompt, allowed_special="all"))
    if n_prompt > window:  # 生成时只看最后 window 个 token：更早的部分模型根本看不见
        raise UserError(f"--prompt 有 {n_prompt} 个 token，超过上下文长度 {window}：请缩短它")
    # 搜索时每组用 SWEEP_GRID 自己的批次大小：按其中最大的估
    batch = max(s.batch_size, *(trial[4] for trial in SWEEP_GRID)) if s.sweep else s.batch_size
    require_memory(training_bytes(cfg, batch, window), device,
                   f"按 --batch-size {batch}、上下文 {window} 训练这个模型")


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


# —— 输出细节 ——

HISTORY_FIELDS = ["step", "tokens_seen", "lr", "train_loss", "eval_train_loss", "eval_val_loss"]


def write_history(out_dir, history):
    """损失历史写成 CSV：每步一行；评估步额外填上训练集/验证集的平均损失，其余步留空。"""
    tmp = out_dir / "history.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, HISTORY_FIELDS, restval="")
        writer.writeheader()
        writer.writerows(history)
    # 与检查点一样先写临时文件再改名：CSV 永远是完整的，可以边训练边用别的程序读
    os.replace(tmp, out_dir / "history.csv")


def finish(state, s, reason):
    out_dir = Path(s.out_dir)
    if reason == "interrupted":
        print(f"已保存检查点 {out_dir / 'ckpt.pt'}；用 --resume 从第 {state.step} 步继续。")
        sys.exit(130)
    if reason == "stop_at":
        print(f"按 --stop-at 在第 {state.step} 步停下，检查点已保存；用 --resume 继续。")
        return
    plot_history(out_dir, state.history, state.baselines)
    report_speed(state, s)
    print(f"检查点：{out_dir / 'ckpt.pt'}   损失历史：{out_dir / 'history.csv'}")
    print("最终样本：")
    # 三个不同的开头：看看模型是不是只会接一种话；英文开头检验它从那 4 篇英文随笔里学到了多少
    for prompt in (s.prompt, "今天", "The"):
        print(f"  {shorten(prompt)}{sample_text(state, s, prompt, 60)}")


def shorten(text, limit=24):
    """长提示词在每行输出里只显示结尾（续写接的就是结尾），免得一行被几千个字淹没。"""
    return text if len(text) <= limit else f"…{text[-limit:]}"


def plot_history(out_dir, history, baselines=None):
    """画损失曲线（横轴：见过的 token 数），计数基线画成水平虚线。matplotlib 是可选依赖。"""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("（未安装 matplotlib，跳过画图；pip install matplotlib 后重跑即可得到 loss.png）")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    # 每步都有单个批次的损失，噪声大，画成淡色作背景；评估步才有平均损失
    for key, style, label in (("train_loss", "-", "train (batch)"),
                              ("eval_train_loss", "o-", "train (eval)"),
                              ("eval_val_loss", "o-", "val")):
        rows = [row for row in history if key in row]
        ax.plot([r["tokens_seen"] for r in rows], [r[key] for r in rows], style, label=label,
                alpha=0.3 if key == "train_loss" else 1.0)
    for name, value in (baselines or {}).items():  # 验证曲线要落到 bigram 这条线下面才算学到了东西
        ax.axhline(value, linestyle="--", color="gray", linewidth=1)
        ax.annotate(f"{name} baseline (val)", (0, value), fontsize=8, va="bottom")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=120)
    plt.close(fig)
    print(f"损失曲线：{out_dir / 'loss.png'}")


# —— 超参数搜索（--sweep） ——
SWEEP_GRID = [  # (学习率, 嵌入学习率倍数, 权重衰减, dropout, batch)：每次只改一个量，便于看出影响
    (1e-3, 10, 0.1, 0.0, 16), (1e-3, 1, 0.1, 0.0, 16), (1e-3, 30, 0.1, 0.0, 16),
    (3e-3, 10, 0.1, 0.0, 16), (3e-4, 10, 0.1, 0.0, 16), (1e-3, 10, 0.0, 0.0, 16),
    (1e-3, 10, 0.1, 0.1, 16), (1e-3, 10, 0.1, 0.0, 8),
]


def run_sweep(base, s):
    """每组超参数从同一个随机种子开始，训练同样多步，比较验证损失，打印排名。"""
    results = []
    for lr, mult, wd, drop, batch in SWEEP_GRID[:s.sweep_trials]:
        # 预热取总步数的 1/6：搜索只训练几十步，按默认的预热步数会一直在预热
        trial = argparse.Namespace(**{**vars(s), "lr": lr, "embed_lr_mult": mult,
                                      "weight_decay": wd, "batch_size": batch,
                                      "max_steps": s.sweep_steps,
                                      "warmup_steps": s.sweep_steps // 6})
        # 每组都从同一个初始化、同一串批次出发：差异只来自被改动的超参数
        torch.manual_seed(s.seed)
        model = GPTModel(dict(base.model.cfg, drop_rate=drop)).to(base.device)
        state = replace(base, model=model,
                        optimizer=make_optimizer(model, lr, wd, s.optimizer, mult),
                        data_gen=torch.Generator().manual_seed(s.seed), history=[])
        t0 = time.perf_counter()
        for _ in range(trial.max_steps):
            # 搜索只看最终验证损失：不存检查点、不采样，省下时间多试几组
            train_step(state, trial, model)
        # 用同一套评估设置（s 的批次大小）给每组打分，排名才公平
        val = evaluate(state, s)["val"]
        results.append((val, lr, mult, wd, drop, batch, time.perf_counter() - t0))
        print(f"  试验 {len(results)}: lr={lr:g} 嵌入倍数={mult} wd={wd} dropout={drop} "
              f"batch={batch} → 验证损失 {val:.3f}", flush=True)
    print(f"\n排名（验证损失越低越好；bigram 基线 {base.baselines['bigram']:.3f}）：")
    print(f"{'名次':>4} {'验证损失':>8} {'lr':>8} {'嵌入倍数':>6} {'衰减':>5} {'dropout':>7} "
          f"{'batch':>5} {'用时':>6}")
    for rank, (val, lr, mult, wd, drop, batch, secs) in enumerate(sorted(results), 1):
        print(f"{rank:>4} {val:>8.3f} {lr:>8g} {mult:>8} {wd:>5} {drop:>7} {batch:>5} "
              f"{secs:>5.0f}s")
    return sorted(results)


# —— 交互式生成（--interactive） ——
# 每个设置的合理范围：温度 0 = 贪心；none 表示关掉 top-k / top-p
CHAT_LIMITS = {"temp": (0, 10), "topk": (1, 10**6), "topp": (0.01, 1), "rep": (1, 10),
               "tokens": (1, 10_000)}


def change_setting(settings, line):
    """处理 ":topk 40" 这样的一行；返回要打印的提示（出错时），成功时返回 None。"""
    key, _, value = line[1:].partition(" ")
    if key not in CHAT_LIMITS:
        return f"未知设置 {key}，可用：{', '.join(CHAT_LIMITS)}"
    if value.strip() == "none" and key in ("topk", "topp"):
        settings[key] = None
        return None
    try:
        number = float(value)
        check_range(f":{key}", number, *CHAT_LIMITS[key])
    except ValueError:
        return f"{value!r} 不是数字"
    except UserError as err:
        return str(err)
    settings[key] = int(number) if key in ("topk", "tokens") else number
    return None


def interactive(s):
    """不训练：载入 out-dir 的检查点（或 --init 的权重），在终端里续写。
    以冒号开头的行是设置，比如 :temp 0.8、:topk 40、:topp 0.9、:rep 1.3、:tokens 80。"""
    device = resolve_device(s.device)
    init = str(Path(s.out_dir) / "ckpt.pt") if s.init == "random" else s.init
    model, enc, cfg = load_init(init, device)
    window = window_for(s, cfg)
    # 温度 0.8 + top-k 40：比贪心多样，又不至于抽到概率极低的怪词；rep（重复惩罚）压低已出现过的词，
    # 免得小模型在贪心（:temp 0）时陷进"““““"那样的循环；都可以随时改了再试
    settings = {"temp": 0.8, "topk": 40, "topp": None, "rep": s.repetition_penalty, "tokens": 80}
    print(f"输入开头文字，回车生成；:{'/:'.join(settings)} 数值 调整采样；:quit 退出。")
    model.eval()
    while True:
        try:
            line = input(" ".join(f"{k}={v}" for k, v in settings.items() if k != "tokens") + " > ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in (":quit", ":q"):
            return
        if line.startswith(":"):
            message = change_setting(settings, line)
            if message:
                print(message)
            continue
        ids = enc.encode(line or "\n", allowed_special="all")
        if len(ids) > window:  # 模型看不见更早的内容：只保留最后 window 个 token，并说一声
            print(f"（输入有 {len(ids)} 个 token，超过上下文 {window}，只用最后 {window} 个）")
            ids = ids[-window:]
        real_vocab = lambda x: model(x)[..., :enc.n_vocab]
        out = generate(real_vocab, torch.tensor([ids], device=device), settings["tokens"], window,
                       temperature=settings["temp"], top_k=settings["topk"], top_p=settings["topp"],
                       eos_id=enc.eot_token, repetition_penalty=settings["rep"])
        print(line + enc.decode(out[0, len(ids):].tolist()))



# —— --data 的来源：文本文件、目录、JSON Lines、Project Gutenberg ——
DATA_SUFFIXES = (".txt", ".jsonl")
# 纯文本版电子书的地址；设环境变量 GUTENBERG_URL 可换成镜像或本地服务器（{id} 处填编号）
GUTENBERG_URL = "https://www.gutenberg.org/cache/epub/{id}/pg{id}.txt"


def find_text_files(path):
    """--data → 文件列表：一个 .txt 或 .jsonl 文件；一个目录（递归查找 .txt 与 .jsonl，按路径排序，
    保证可复现：rglob 的顺序随文件系统而变）；或 gutenberg:编号[,编号…]（先下载到缓存）。"""
    if str(path).startswith("gutenberg:"):
        return fetch_gutenberg(str(path)[len("gutenberg:"):])
    path = Path(path)
    if not path.exists():
        raise UserError(f"找不到语料路径 {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"目录 {path} 里没有任何 .txt 或 .jsonl 文件")
    return files


def iter_jsonl(file):
    """逐行读 JSON Lines（minimind 的 pretrain_hq.jsonl 等中文预训练集的格式），产出每行的 "text"。
    一次只有一行在内存里：几十 GB 的文件也能切词。"""
    with open(file, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue  # 空行（常见于文件末尾）跳过
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{file} 第 {lineno} 行不是合法的 JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f'{file} 第 {lineno} 行没有字符串字段 "text"')
            yield record["text"]


def strip_gutenberg(text):
    """Gutenberg 在每本书前后加了英文页眉和许可证，正文在 "*** START OF …" 与 "*** END OF …"
    两行之间：不去掉的话，每本书都教模型背一遍同样的英文条款。"""
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    head = text.find("*** START OF")
    if head >= 0:
        text = text[text.find("\n", head) + 1:]
    tail = text.find("*** END OF")
    return (text[:tail] if tail >= 0 else text).strip() + "\n"


def fetch_gutenberg(ids):
    """下载 Project Gutenberg 的公有领域电子书到 cache/gutenberg/（断点续传、显示进度），
    去掉页眉页脚后返回正文文件的列表；下载过的直接复用。Gutenberg 有几百本中文古典作品。"""
    numbers = [number.strip() for number in ids.split(",")]
    if not all(number.isdigit() for number in numbers):
        raise UserError(f"gutenberg: 后面应是逗号分隔的电子书编号，例如 gutenberg:24264,23950，"
                        f"而不是 {ids!r}")
    template = os.environ.get("GUTENBERG_URL", GUTENBERG_URL)
    files = []
    for number in numbers:
        dest = CACHE_DIR / "gutenberg" / f"{number}.txt"
        if not dest.is_file():  # 正文文件只在下载完整、去掉页眉页脚后才改名出现：存在即完整
            url, part = template.format(id=number), dest.with_name(f"pg{number}.txt.part")
            try:
                total = _fetch_into(url, part)
            except urllib.error.HTTPError as err:
                hint = "：Gutenberg 上没有这个编号的纯文本电子书" if err.code == 404 else ""
                raise UserError(f"下载电子书 {number}（{url}）失败：HTTP {err.code}{hint}") from None
            except (OSError, http.client.HTTPException, ValueError) as err:
                raise UserError(f"无法下载电子书 {number}（{url}：{err}）。网络不通时可以设置镜像，"
                                "如 export GUTENBERG_URL='https://镜像地址/{id}.txt'，或在别处下载好"
                                " .txt 放进一个目录再用 --data 该目录；已下载的部分会续传") from None
            if total is not None and part.stat().st_size != total:
                raise UserError(f"电子书 {number} 只下载了 {part.stat().st_size}/{total} 字节，"
                                "连接中途断开；重新运行会从断点续传")
            try:
                text = strip_gutenberg(part.read_bytes().decode("utf-8"))
            except UnicodeDecodeError:
                raise UserError(f"电子书 {number} 不是 UTF-8 文本（{url}）") from None
            tmp = dest.with_name(dest.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, dest)
            part.unlink()
            print(f"  电子书 {number}：正文 {len(text):,} 个字符 → {dest}")
        files.append(dest)
    return files



# ===== 附录：前几章的部件（逐字复制，读过前几章可以跳过）=====
# 放在文件末尾，是为了让本章从第 1 节就开始讲预训练；Python 在调用时才查找这些名字，
# 所以定义写在后面也没关系。

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


def build_on_meta(cfg):
    """在 meta 设备上建模型：张量只有形状、没有数据，数 15 亿个参数也不占内存、不花时间。"""
    with torch.device("meta"):
        return GPTModel(cfg)


# 来自 03_gpt.py：下载并载入 Hugging Face 上的 GPT-2 权重
HF_REPOS = {name: f"openai-community/{name}"
            for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}

MODELS_DIR = Path(__file__).resolve().parent / "models"


# —— 从 Hugging Face 下载文件（只用标准库 urllib） ——
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


# —— 自己读 safetensors：8 字节头长度 + JSON 头 + 原始数据 ——
# safetensors 只存数据、不存代码，比 pickle 格式的 .bin 安全；格式简单到几十行就能读懂。
# JSON 头形如 {"wte.weight": {"dtype": "F32", "shape": [50257, 768], "data_offsets": [0, N]}, …}，
# data_offsets 是相对数据区开头（即 8 + 头长度 处）的字节范围 [起, 止)。

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


# —— 把 GPT-2 的参数名对应到我们的模型 ——
# HF 的 GPT-2 与我们的 GPTModel 是同一个网络，只是名字和存法不同：
#   wte/wpe → tok_emb/pos_emb；h.N → trf_blocks.N；ln_1/ln_2/ln_f 的 weight/bias → scale/shift；
#   HF 用的 Conv1D 把权重存成 (输入, 输出)，nn.Linear 是 (输出, 输入)，所以要转置；
#   c_attn 把 Q、K、V 三个投影拼成一个，要切成三份；输出头与 wte 共享同一个矩阵。

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
