"""07_lora.py — LoRA：冻住整个模型，只训练两个小矩阵

本章你会学到：
- 为什么低秩就够：全参数微调后的 ΔW 做奇异值分解，前几个奇异值就占了它大部分"能量"
- LoRALayer（A 用 Kaiming 均匀初始化、B 全零、输出乘 α/r）、包住冻结 nn.Linear 的 LinearWithLoRA；词嵌入也能套
- replace_linear_with_lora：把注意力 / MLP / 全部线性层换成 LoRA 版，可训练参数只剩几个百分点
- 用 LoRA 微调 05 的垃圾短信分类器，和全参数微调比准确率、参数量、时间、内存（--compare）
- 合并：把 B·A·α/r 加回 W，推理时零额外开销；只保存 LoRA 权重（小文件），再装回同一个底座
运行：python 07_lora.py                  # 默认：中文短信，2 核 CPU 约 1.5 分钟
      python 07_lora.py --quick          # 冒烟：tiny 模型，约 6 秒
      python 07_lora.py --compare        # LoRA 与全参数微调并排比
      python 07_lora.py --rank 1 4 16    # 秩的扫描：每个秩训练一次，打印一张表
      python 07_lora.py --predict "【XX银行】您的账户已冻结，请点击 t.cn/abc 解冻"
"""
import argparse
import base64
import copy
import hashlib
import http.client
import importlib.util
import json
import math
import mmap
import os
import random
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

# 本章用到的 UserError、GPTModel、load_init、GPTClassifier、build_classifier、train_epoch、
# evaluate_split、classify 等来自 01–05，见文末附录。


# ===== 1. 为什么低秩就够：看一看全参数微调改了 W 多少 =====
# 全参数微调把每个权重矩阵 W 改成 W + ΔW。LoRA 的赌注是：ΔW 虽然和 W 一样大（d_out × d_in），
# 但它的"信息"集中在少数几个方向上，也就是近似低秩。奇异值分解 ΔW = U·diag(s)·Vᵀ 给出这些方向，
# s² 的占比就是每个方向分到的能量。前 r 个占了大半，ΔW 就能用两个瘦矩阵 B（d_out × r）·A（r × d_in）近似。

def energy_in_top(matrix, ranks):
    """矩阵前 r 个奇异值的平方和占全部的比例，对 ranks 里的每个 r 各给一个数。"""
    s = torch.linalg.svdvals(matrix.float())
    share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    return [share[min(r, len(s)) - 1].item() for r in ranks]


def brief_full_finetune(model, examples, pad_id, s, steps):
    """在一个副本上做 steps 步全参数微调（本章的演示用），返回微调后的副本；原模型不动。"""
    tuned = copy.deepcopy(model).train()
    for param in tuned.parameters():
        param.requires_grad = True
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=s.full_lr, weight_decay=s.weight_decay)
    generator = torch.Generator().manual_seed(s.seed)
    device = next(tuned.parameters()).device
    done = 0
    while done < steps:
        for x, lengths, y in batches(examples, s.batch_size, pad_id, generator=generator):
            loss = F.cross_entropy(tuned(x.to(device), lengths.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    return tuned.eval()


def show_low_rank(model, examples, pad_id, s, ranks=(1, 2, 4, 8, 16)):
    """演示：短暂全参数微调，对每个线性层的 ΔW 看前 r 个奇异值的能量占比，和同形状的随机矩阵对照。"""
    t0 = time.perf_counter()
    tuned = brief_full_finetune(model, examples, pad_id, s, s.demo_steps)
    before, after = model.state_dict(), tuned.state_dict()
    names = [f"{name}.weight" for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.startswith("trf_blocks.")]
    shares = {name: energy_in_top(after[name] - before[name], ranks) for name in names}
    pick = names[0]  # 第一个块的 W_query：细看一个层
    rows, cols = before[pick].shape
    noise = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    noise = energy_in_top(noise, ranks)
    mean = [sum(v[i] for v in shares.values()) / len(shares) for i in range(len(ranks))]
    print(f"\n1. 全参数微调 {s.demo_steps} 步（{time.perf_counter() - t0:.0f} 秒）后，ΔW 的前 r 个奇异值占它能量的比例：")
    print("  " + "".join(f"{f'r={r}':>8}" for r in ranks))
    for values, what in ((shares[pick], f"{pick[:-7]} 的 ΔW（{rows}×{cols}）"),
                         (mean, f"{len(names)} 个线性层的 ΔW 平均"),
                         (noise, "同形状的随机矩阵：没有低秩结构时的样子")):
        print("  " + "".join(f"{v:8.1%}" for v in values) + f"   {what}")
    return shares


def lora_param_count(cfg, rank, targets):
    """按公式数：targets 选中的每个线性层（d_in → d_out）添 r·(d_in + d_out) 个参数。
    返回 (模型原有参数, LoRA 参数)。分类头等不在这里算。"""
    d, parts = cfg["emb_dim"], targets_parts(targets)
    shapes = {"attention": [(d, d)] * 4, "mlp": [(d, 4 * d), (4 * d, d)]}
    per_block = sum(rank * (i + o) for part in parts if part in shapes for i, o in shapes[part])
    # 词嵌入（词表 → 宽）和输出头（宽 → 词表）各是一个不在块里的"线性层"
    outside = sum(rank * (d + cfg["vocab_size"]) for part in ("embedding", "head") if part in parts)
    return param_count(cfg), cfg["n_layers"] * per_block + outside


def show_param_table(cfg, rank, targets):
    """GPT-2 四个尺寸和本章模型：LoRA 要训练多少参数。"""
    print(f"\n参数账（秩 r={rank}，{TARGET_NAMES[targets]}；都按语言模型算，输出头不与词嵌入共享）：")
    print("        全部参数      LoRA 参数     占比  模型")
    sizes = [(name, dict(MODEL_SIZES[name], vocab_size=50257, qkv_bias=True))
             for name in ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")]
    for name, conf in sizes + [("本章的底座", cfg)]:
        total, lora = lora_param_count(conf, rank, targets)
        print(f"  {total:>14,}  {lora:>12,}  {lora / total:7.2%}  {name}")


# ===== 2. LoRALayer 与 LinearWithLoRA：W·x 旁边并一条 B·A·x 的小路 =====
# 冻结的 W 不动；旁路先用 A 把 d_in 维压到 r 维，再用 B 升回 d_out 维。B 初始为 0：训练开始时旁路输出 0，
# 模型和底座一模一样，微调从"什么都没改"出发。A 不能也为 0（否则 B 的梯度 = 0·…，两个都学不动），
# 所以 A 像 nn.Linear 一样用 Kaiming 均匀初始化。α/r 的缩放让换秩时不必重调学习率：
# r 翻倍，B·A 里相加的项也多一倍，除以 r 大致抵消；α 是固定的"音量"——LoRA 论文把它设成第一次试的 r，
# 之后换 r 也不再调它（本章默认 r = α = 4）。

class LoRALayer(nn.Module):
    """低秩增量 ΔW = B·A：x ↦ (α/r)·x·Aᵀ·Bᵀ。A: (r, d_in)，B: (d_out, r)，和 nn.Linear 的权重同一种摆法。"""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_dim))
        # 和 nn.Linear 的默认初始化相同：均匀分布，界限 1/√d_in，输出的尺度不随 d_in 变
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(out_dim, rank))
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank  # 书的读者发现过漏掉它的 bug：测试专门检查

    def forward(self, x):
        return self.scale * (x @ self.A.T @ self.B.T)


class LinearWithLoRA(nn.Module):
    """冻结的 nn.Linear + 一个 LoRALayer：输出相加。merge_lora 可以把它折回一个普通 nn.Linear。"""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha).to(
            linear.weight.device, linear.weight.dtype)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


class EmbeddingWithLoRA(nn.Module):
    """词嵌入也是线性层：token i 的向量 = one-hot(i) 乘矩阵 E（03 演示过）。所以同样能并一条旁路：
    one-hot(i)·Aᵀ 就是 A 的第 i 列，不必真的做矩阵乘，按下标取出来即可。"""

    def __init__(self, embedding, rank, alpha):
        super().__init__()
        self.embedding = embedding
        self.lora = LoRALayer(embedding.num_embeddings, embedding.embedding_dim, rank, alpha).to(
            embedding.weight.device, embedding.weight.dtype)

    def forward(self, idx):
        return self.embedding(idx) + self.lora.scale * (self.lora.A.T[idx] @ self.lora.B.T)


TARGET_NAMES = {"attention": "只换注意力的 4 个线性层", "attention+mlp": "注意力 + MLP 的线性层",
                "all": "全部线性层（注意力、MLP，连词嵌入也算）"}


def targets_parts(targets):
    """"attention+mlp" → {"attention", "mlp"}；"all" 再加上词嵌入（语言模型还有输出头）。"""
    if targets == "all":
        return {"attention", "mlp", "embedding", "head"}
    return set(targets.split("+"))


def selected(name, module, targets):
    """module（名为 name）是否在 targets 里：注意力的在 .att. 下，MLP 的在 .ff. 下。"""
    parts = targets_parts(targets)
    if isinstance(module, nn.Embedding):
        return "embedding" in parts and name == "tok_emb"
    return isinstance(module, nn.Linear) and (
        ("attention" in parts and ".att." in f".{name}.")
        or ("mlp" in parts and ".ff." in f".{name}.")
        or ("head" in parts and name == "out_head"))


def replace_linear_with_lora(model, rank, alpha, targets="attention+mlp"):
    """先冻结 model 的全部参数，再把 targets 选中的每个 nn.Linear 原地换成 LinearWithLoRA；返回 model。
    之后只有新建的 A、B 需要梯度。"""
    if not (isinstance(rank, int) and rank >= 1):
        raise UserError(f"LoRA 的秩应是正整数，收到 {rank}")
    for param in model.parameters():
        param.requires_grad = False
    # 先列出再替换：一边遍历 named_modules 一边改模型，会把刚换上的 LoRA 层也遍历进去
    chosen = [(name, m) for name, m in model.named_modules() if selected(name, m, targets)]
    for name, layer in chosen:
        # "trf_blocks.0.att.W_query" → 在 trf_blocks.0.att 上把属性 W_query 换掉：原来的层被包进新层里
        parent, _, child = name.rpartition(".")
        wrap = EmbeddingWithLoRA if isinstance(layer, nn.Embedding) else LinearWithLoRA
        setattr(model.get_submodule(parent), child, wrap(layer, rank, alpha))
    return model


def trainable_summary(model):
    # 分类头、LoRA 的 A 和 B 都算可训练；冻结的底座计入总数，占比才是"改动了模型的百分之几"
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return n_train, sum(p.numel() for p in model.parameters())


# ===== 3. 用 LoRA 微调垃圾短信分类器 =====
# 分类器和 05 完全一样（GPTClassifier：最后一个真实 token → 新输出头）。新输出头是随机初始化的，
# 只有 emb_dim × 2 + 2 个参数，照常整个训练；底座的其余参数全部冻结，只学 LoRA 的 A、B。

def load_sms(s):
    """data/sms（或 --data 目录）的三个划分；--limit 时每个划分按种子抽前 N 条。"""
    folder = Path(s.data) if s.data else DATA_DIR / "sms"
    rows = {split: read_tsv(folder / f"{split}.tsv", LABELS["sms-zh"]) for split in SPLITS}
    if s.limit:
        rng = random.Random(s.seed)
        rows = {split: rng.sample(r, min(s.limit, len(r))) for split, r in rows.items()}
    return rows


def make_trainable(base_classifier, mode, rank, alpha, targets):
    """从同一个底座分类器复制一份：mode=lora 时换上 LoRA（输出头照常训练），mode=full 时全部参数都训练。"""
    model = copy.deepcopy(base_classifier)
    if mode == "full":
        for param in model.parameters():
            param.requires_grad = True
        return model
    replace_linear_with_lora(model, rank, alpha, classifier_targets(targets))
    for param in model.out_head.parameters():
        param.requires_grad = True
    return model


def classifier_targets(targets):
    """分类头是新的、随机初始化的：不套 LoRA，整个训练（只有 emb_dim × 2 + 2 个参数）。"""
    return "+".join(sorted(targets_parts(targets) - {"head"}))


def training_state_bytes(model, optimizer):
    """训练时常驻的张量：全部参数 + 可训练参数的梯度 + AdamW 的两份动量（从优化器里实际数）。
    冻结的参数没有后两样：LoRA 省下的内存主要在这里。"""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    states = sum(t.numel() * t.element_size() for st in optimizer.state.values()
                 for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    return params + grads + states


def fit(model, setup, s, mode, quiet=False):
    """训练 s.epochs 轮（05 的 train_epoch），每轮看验证集，最后退回验证集最好的那一轮。
    返回 {"model", "best", "seconds", "state_bytes", "tokens_per_s"}。Ctrl-C 时带着最好的一轮返回。"""
    # LoRA 的 B 从 0 出发、参数又少，要比全参数微调大几倍的学习率才走得动（两者各用各的，--compare 才公平）
    lr = s.lr if mode == "lora" else s.full_lr
    # 只把 requires_grad 的参数交给优化器：冻结的底座没有 AdamW 状态，内存就省在这里
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    other = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=lr)
    data, device = setup.data, setup.device
    state = ClsState(model, optimizer, setup.tokenizer, data, device,
                     torch.Generator().manual_seed(s.seed))
    # 05 的 train_epoch 从 s 里读学习率和填充长度：给它一份换了学习率的设置，函数本身原样复用
    run_s = argparse.Namespace(**{**vars(s), "lr": lr, "pad_length": None})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best, best_weights, interrupted = None, None, False
    with StopFlag() as stop:
        while state.epoch < s.epochs and not interrupted:
            interrupted = not train_epoch(state, run_s, stop)
            state.epoch += 1
            val = evaluate_split(model, data["val"], EVAL_BATCH, setup.tokenizer.eot_token, device)
            # 先比准确率、打平再比损失（和 05 一样）：几百条验证短信上准确率常常相同
            if best is None or (val["acc"], -val["loss"]) > (best["acc"], -best["loss"]):
                best = {"epoch": state.epoch, **val}
                # 只记下可训练的那部分：LoRA 时是几万个数，全参数微调时是整个模型
                best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()
                                if k in trainable_names(model)}
            if not quiet:
                print(f"  第 {state.epoch}/{s.epochs} 轮  验证 loss {val['loss']:.3f} "
                      f"准确率 {val['acc']:.1%}"
                      f"｜训练用时 {state.train_seconds:.0f}s  "
                      f"{state.tokens_seen / max(state.train_seconds, 1e-9):,.0f} token/s",
                      flush=True)
    # strict=False：best_weights 只有可训练的那部分，冻结的底座本来就没变
    model.load_state_dict(best_weights, strict=False)
    memory = training_state_bytes(model, optimizer)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device)
    return {"model": model.eval(), "best": best, "seconds": state.train_seconds,
            "state_bytes": memory,
            "tokens_per_s": state.tokens_seen / max(state.train_seconds, 1e-9),
            "interrupted": interrupted}


def trainable_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


# ===== 4. 合并与保存：折回普通 nn.Linear；只存 LoRA 的那一点点权重 =====
# (W + (α/r)·B·A)·x = W·x + (α/r)·B·(A·x)：训练完把括号里的矩阵算出来换掉 W，推理时就和原模型一样快。
# 不合并也有好处：底座只存一份，每个任务只存自己的 A、B（几百 KB），要哪个装哪个。

@torch.no_grad()
def merge_lora(model):
    """把每个 LinearWithLoRA 折回一个普通 nn.Linear（权重 W + α/r·B·A）；原地修改并返回 model。"""
    wrapped = [(name, m) for name, m in model.named_modules()
               if isinstance(m, (LinearWithLoRA, EmbeddingWithLoRA))]
    for name, m in wrapped:
        delta = m.lora.scale * (m.lora.B @ m.lora.A)  # (d_out, d_in)，和 nn.Linear 的权重同形状
        if isinstance(m, EmbeddingWithLoRA):  # 词嵌入表是 (词表, 宽)，正好是转置
            merged = copy.deepcopy(m.embedding)
            merged.weight.copy_(m.embedding.weight + delta.T)
        else:
            merged = copy.deepcopy(m.linear)
            merged.weight.copy_(m.linear.weight + delta)
        merged.requires_grad_(False)  # 合并后的模型只用来推理
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, merged)
    return model


def base_fingerprint(model):
    """底座权重的 SHA-256（不含分类头和 LoRA）：LoRA 文件只对训练它的那个底座有意义，载入时核对。"""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith("out_head.") or ".lora." in name:
            continue
        digest.update(name.encode())
        raw = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8)  # 按字节看：任何 dtype 都行
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def save_adapter(path, model, meta):
    """只存底座里没有的张量（LoRA 的 A、B + 新分类头）和重建所需的说明：底座是谁、秩、α、换了哪些层。"""
    weights = {k: v for k, v in model.state_dict().items()
               if ".lora." in k or k.startswith("out_head.")}
    # 和别的检查点同样有 config、model、tokenizer 三项（load_checkpoint 认这三项），只是 model 里只有这一小部分
    save_checkpoint(path, {"kind": "lora-adapter", **meta, "config": model.cfg, "model": weights})


def attach_adapter(model, ckpt, where):
    """把 LoRA 文件装到底座分类器 model 上：先核对底座指纹，再按记录换层、载入 A、B 和分类头。"""
    if base_fingerprint(model) != ckpt["base"]["fingerprint"]:
        raise UserError(f"{where} 是在另一个底座（{ckpt['base']['init']}）上训练的 LoRA 权重，"
                        "和现在的底座对不上；用 --init 指定训练时的底座，或重新训练")
    targets = classifier_targets(ckpt["targets"])
    replace_linear_with_lora(model, ckpt["rank"], ckpt["alpha"], targets)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    frozen = {name for name, _ in model.named_parameters()} - set(ckpt["model"])
    if unexpected or set(missing) != frozen:
        raise UserError(f"{where} 的 LoRA 权重和模型结构对不上（多 {unexpected[:3]}）")
    return model


def load_classifier(path, init=None, device="cpu"):
    """本章写出的 adapter.pt → (model, tokenizer, labels)：按记录重建底座（或用 init 指定的），装上 LoRA。"""
    ckpt = load_checkpoint(path)
    # 05 的 best.pt、04 的预训练检查点也有 config/model/tokenizer：靠 kind 认出本章的 LoRA 文件
    if ckpt.get("kind") != "lora-adapter":
        raise UserError(f"{path} 不是本章写出的 LoRA 文件；先运行 07_lora.py 训练一个")
    base_spec = ckpt["base"]
    torch.manual_seed(base_spec["seed"])  # 随机底座靠种子重建：同一个种子，同一组权重
    base, tokenizer, _ = load_init(init or base_spec["init"], resolve_device(device),
                                   base_spec["model"])
    model = build_classifier(base, ckpt["labels"])
    attach_adapter(model, ckpt, path)
    return model.eval(), tokenizer, model.labels


def file_size(path):
    size = Path(path).stat().st_size
    return f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 1024:.0f} KB"


# ===== 5. 主程序：底座 → 看 ΔW → 换上 LoRA → 训练 → 合并、保存、和基线比 =====
DEFAULTS = {"epochs": 5, "batch_size": 16, "lr": 2e-3, "full_lr": 5e-4, "weight_decay": 0.01,
            "drop_rate": 0.1, "seed": 123, "demo_steps": 100, "rank": [4], "alpha": [4.0],
            "targets": "all"}
QUICK = {"model": "tiny", "epochs": 2, "limit": 300, "demo_steps": 10}
PRETRAINED = Path("runs/pretrain/ckpt.pt")  # 04_pretrain.py 默认写出的检查点
EVAL_BATCH, EVAL_TRAIN = 64, 1000


@dataclass
class Setup:
    classifier: nn.Module         # 底座分类器：GPT 的全部参数 + 随机初始化的新输出头，还没换 LoRA
    tokenizer: tiktoken.Encoding
    data: dict                    # {"train": [(ids, 类别), ...], "val": …, "test": …}
    rows: dict                    # 原始的 (文本, 类别)
    device: torch.device
    meta: dict                    # 底座是谁（起点、种子、尺寸、指纹）、类别名、截断长度：写进 LoRA 文件


def make_settings(args):
    """默认值 < --quick 的取值 < 命令行显式给出的值。"""
    merged = dict(vars(args))
    for layer in (DEFAULTS, QUICK if args.quick else {},
                  {k: v for k, v in vars(args).items() if v is not None}):
        merged.update(layer)
    s = argparse.Namespace(**merged)
    if s.quick and s.init == "auto":
        s.init = "random"  # 冒烟测试要快、要可复现：不依赖有没有跑过 04
    s.model = s.model or "mini"
    return s


def build_base(s):
    """数据 + 底座分类器（05 的 GPTClassifier，新输出头随机初始化）+ 编码好的三个划分。"""
    device = resolve_device(s.device)
    init = resolve_init(s)
    rows = load_sms(s)
    torch.manual_seed(s.seed)
    base, tokenizer, cfg = load_init(init, device, s.model)
    max_length = s.max_length or cfg["context_length"]
    if max_length > cfg["context_length"]:
        raise UserError(f"--max-length {max_length} 超过模型的上下文长度 {cfg['context_length']}")
    s.max_length = max_length
    # 在改动任何东西之前记下底座是谁：LoRA 的 A、B 只有装回这组权重上才有意义
    fingerprint = base_fingerprint(base)
    base.cfg = dict(base.cfg, drop_rate=s.drop_rate)
    classifier = build_classifier(base, LABELS["sms-zh"])
    for module in classifier.modules():  # 预训练检查点里 dropout 是 0；微调时按 --drop-rate 重设
        if isinstance(module, nn.Dropout):
            module.p = s.drop_rate
    data = {split: encode_rows(tokenizer, r, max_length) for split, r in rows.items()}
    # 随机底座不存权重，只存"怎么重建它"（起点、种子、尺寸）；指纹负责核对重建得对不对
    meta = {"base": {"init": init, "seed": s.seed, "model": s.model, "fingerprint": fingerprint},
            "labels": classifier.labels, "max_length": max_length}
    return Setup(classifier, tokenizer, data, rows, device, meta)


def test_accuracy(model, setup):
    pad_id = setup.tokenizer.eot_token
    return evaluate_split(model, setup.data["test"], EVAL_BATCH, pad_id, setup.device)["acc"]


def run_default(s):
    t_start = time.perf_counter()
    setup = build_base(s)
    cfg, rows = setup.classifier.cfg, setup.rows
    print(f"数据：训练 {len(rows['train']):,} 条、验证 {len(rows['val']):,}、测试 {len(rows['test']):,}；"
          f"模型 {cfg['n_layers']} 层、宽 {cfg['emb_dim']}")
    show_low_rank(setup.classifier, setup.data["train"], setup.tokenizer.eot_token, s)
    rank, alpha = s.rank[0], s.alpha[0]
    show_param_table(cfg, rank, s.targets)
    model = make_trainable(setup.classifier, "lora", rank, alpha, s.targets)
    n_train, n_total = trainable_summary(model)
    print(f"\n2. 换上 LoRA（r={rank}，α={alpha:g}，缩放 α/r={alpha / rank:g}，{TARGET_NAMES[s.targets]}）："
          f"可训练 {n_train:,} / {n_total:,} 个参数（{n_train / n_total:.2%}，含分类头 "
          f"{sum(p.numel() for p in model.out_head.parameters()):,} 个）")
    # B = 0 时模型就是底座加一个没学过的分类头：这个数是"什么都没学"的基线
    before = test_accuracy(model, setup)
    print(f"\n3. 训练 LoRA {s.epochs} 轮（学习率 {s.lr:g}）：")
    result = fit(model, setup, s, "lora")
    after = test_accuracy(result["model"], setup)
    out_dir = Path(s.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"无法创建 --out-dir {s.out_dir}（{type(err).__name__}）") from None
    meta = {**setup.meta, "rank": rank, "alpha": alpha, "targets": s.targets,
            "tokenizer": tokenizer_record(setup.tokenizer), "val_acc": result["best"]["acc"],
            "epoch": result["best"]["epoch"]}
    adapter = out_dir / "adapter.pt"
    # Ctrl-C 时也先存好再退出：fit 已经退回到验证集最好的一轮
    save_adapter(adapter, result["model"], meta)
    if result["interrupted"]:
        print(f"收到 Ctrl-C：最好的一轮（第 {result['best']['epoch']} 轮）的 LoRA 权重已存到 {adapter}")
        sys.exit(130)
    report_merge(result["model"], setup, out_dir, meta, adapter)
    train_labels = [label for _, label in rows["train"]]
    majority = max(range(2), key=train_labels.count)
    test_labels = [label for _, label in rows["test"]]
    print(f"\n测试集准确率（{len(rows['test']):,} 条）：")
    for name, acc in (("随机猜（期望）", 0.5),
                      (f"总猜多数类（{LABEL_NAMES[LABELS['sms-zh'][majority]]}）",
                       test_labels.count(majority) / len(test_labels)),
                      ("LoRA 训练前（B=0，新分类头没学过）", before),
                      (f"LoRA 微调后（验证集最好的第 {result['best']['epoch']} 轮）", after)):
        print(f"  {acc:7.1%}  {name}")
    print(f"总用时 {time.perf_counter() - t_start:.0f} 秒；全参数微调对照：python 07_lora.py --compare；"
          f"试试 python 07_lora.py --predict \"你的短信\"")


def report_merge(model, setup, out_dir, meta, adapter):
    """合并前后在测试集上的 logits 对比；存合并后的完整分类器（05 的格式），和 LoRA 文件比大小。"""
    device = setup.device
    # 在副本上合并：原模型还要拿来对照；比的是测试集的 logits，训练时一条也没见过
    x, lengths, _ = collate(setup.data["test"][:EVAL_BATCH], setup.tokenizer.eot_token)
    with torch.no_grad():
        unmerged = model(x.to(device), lengths.to(device))
        merged_model = merge_lora(copy.deepcopy(model))
        merged = merged_model(x.to(device), lengths.to(device))
    gap = (merged - unmerged).abs().max().item()
    full = out_dir / "merged.pt"
    save_checkpoint(full, {"kind": "classifier", "config": merged_model.cfg,
                           "model": merged_model.state_dict(), "tokenizer": meta["tokenizer"],
                           "labels": merged_model.labels, "token_position": "last", "causal": True,
                           "max_length": meta["max_length"], "epoch": meta["epoch"],
                           "val_acc": meta["val_acc"], "history": []})
    print(f"\n4. 合并：W ← W + α/r·B·A 之后，{len(x)} 条测试短信的 logits 和合并前最多差 {gap:.1e}")
    print(f"   只存 LoRA：{adapter}（{file_size(adapter)}）；合并后的完整分类器：{full}"
          f"（{file_size(full)}，05 的格式，python 05_finetune_cls.py --predict 也能用它）")


def run(args):
    s = make_settings(args)
    check_args(s)
    if s.predict or s.interactive:
        return use_adapter(s)
    if s.compare:
        return compare_with_full(s)
    if len(s.rank) * len(s.alpha) > 1:
        return sweep(s)
    return run_default(s)


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


# ===== 进阶：并排对比（--compare）、秩与 α 的扫描、载入使用、命令行（第一次读可以跳过）=====

def trial(setup, s, mode, rank, alpha):
    """一次训练：返回表格的一行要用的数。"""
    model = make_trainable(setup.classifier, mode, rank, alpha, s.targets)
    n_train, n_total = trainable_summary(model)
    result = fit(model, setup, s, mode, quiet=True)
    return {"acc": test_accuracy(result["model"], setup), "n_train": n_train, "n_total": n_total,
            "seconds": result["seconds"], "memory": result["state_bytes"],
            "tokens_per_s": result["tokens_per_s"]}


def compare_with_full(s):
    """LoRA 与全参数微调：同一个底座、同一份数据、同样的轮数，各自的学习率。"""
    setup = build_base(s)
    what = "峰值显存" if setup.device.type == "cuda" else "训练状态（参数+梯度+AdamW）"
    print(f"对比：各训练 {s.epochs} 轮，测试集 {len(setup.data['test']):,} 条")
    print(f"  {'方式':<22}{'测试准确率':>8}{'可训练参数':>14}{'占比':>8}{'训练用时':>8}  {what}")
    rank, alpha = s.rank[0], s.alpha[0]
    for name, mode, lr in ((f"LoRA r={rank} α={alpha:g}", "lora", s.lr),
                           ("全参数微调", "full", s.full_lr)):
        r = trial(setup, s, mode, rank, alpha)
        print(f"  {name + f'（lr {lr:g}）':<22}{r['acc']:>10.1%}{r['n_train']:>14,}"
              f"{r['n_train'] / r['n_total']:>9.2%}{r['seconds']:>9.0f}s  "
              f"{r['memory'] / 2**20:.1f} MB",
              flush=True)


def sweep(s):
    """--rank / --alpha 给了多个值：每个组合训练一次，打印一张表。"""
    setup = build_base(s)
    print(f"扫描：各训练 {s.epochs} 轮，{TARGET_NAMES[s.targets]}，测试集 {len(setup.data['test']):,} 条")
    print("     r       α    α/r   可训练参数     占比  测试准确率  训练用时")
    for rank in s.rank:
        for alpha in s.alpha:
            r = trial(setup, s, "lora", rank, alpha)
            print(f"  {rank:>4}  {alpha:>6g}  {alpha / rank:>5.2g}  {r['n_train']:>10,}  "
                  f"{r['n_train'] / r['n_total']:>6.2%}  {r['acc']:>9.1%}  {r['seconds']:>6.0f}s",
                  flush=True)


def use_adapter(s):
    """--predict / --interactive：载入 out-dir 的 adapter.pt（底座按记录重建，或用 --init 指定）。"""
    init = None if s.init == "auto" else s.init
    model, tokenizer, _ = load_classifier(Path(s.out_dir) / "adapter.pt", init, s.device)
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


def positive_list(flag, values, kind):
    for value in values:
        check_range(flag, value, 1 if kind is int else 1e-6, 4096 if kind is int else 1e6)


def build_parser():
    p = ArgParser(description="LoRA：冻住 GPT，只训练低秩的 A、B 来微调垃圾短信分类器（默认：data/sms）")
    p.add_argument("--data", help="含 train.tsv、val.tsv、test.tsv（每行 ham|spam<TAB>文本）的目录")
    p.add_argument("--init", default="auto",
                   help=f"底座：auto=有 {PRETRAINED} 就用它，否则随机初始化（默认）；random；一个 *.pt 检查点；"
                        "gpt2/gpt2-medium/…=真实 GPT-2 权重")
    p.add_argument("--model", choices=["tiny", "mini"], help="随机底座的尺寸（默认 mini）")
    p.add_argument("--rank", type=int, nargs="+", help="LoRA 的秩 r（默认 4；给多个值就扫描）")
    p.add_argument("--alpha", type=float, nargs="+", help="LoRA 的 α，旁路输出乘 α/r（默认 4；给多个值就扫描）")
    p.add_argument("--targets", choices=list(TARGET_NAMES),
                   help="换哪些层：attention | attention+mlp | all（默认：注意力、MLP 和词嵌入）")
    for flag, kind, text in (("--epochs", int, "训练轮数"), ("--batch-size", int, "每批几条"),
                             ("--lr", float, "LoRA 的 AdamW 峰值学习率（线性降到 0）"),
                             ("--full-lr", float, "全参数微调（--compare 和第 1 节的演示）的学习率"),
                             ("--weight-decay", float, "AdamW 权重衰减"),
                             ("--drop-rate", float, "微调时的 dropout 概率"),
                             ("--demo-steps", int, "第 1 节看 ΔW 时全参数微调几步"),
                             ("--seed", int, "随机种子，CPU 上完全可复现")):
        key = flag[2:].replace("-", "_")
        quick = f"，--quick 时 {QUICK[key]}" if key in QUICK else ""
        p.add_argument(flag, type=kind, help=f"{text}（默认 {DEFAULTS[key]}{quick}）")
    p.add_argument("--max-length", type=int, help="每条短信最多保留几个 token（默认：模型的上下文长度）")
    p.add_argument("--limit", type=int, help="每个划分最多用几条（先打乱再取；--quick 时 300）")
    p.add_argument("--out-dir", default="runs/lora", help="adapter.pt（只有 LoRA 权重）和 merged.pt 的目录")
    p.add_argument("--predict", action="append", metavar="TEXT",
                   help="不训练：用 out-dir 的 adapter.pt 给这段文本分类（可给多次）")
    p.add_argument("--interactive", action="store_true", help="不训练：在终端里逐条输入、分类")
    p.add_argument("--compare", action="store_true", help="LoRA 与全参数微调并排比：准确率、参数、时间、内存")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="计算设备，auto = cuda > mps > cpu")
    p.add_argument("--quick", action="store_true", help="冒烟测试：tiny 随机模型、每个划分 300 条、2 轮")
    return p


def check_args(s):
    """开工之前检查每个数值设置（负数、零、NaN、大得离谱），以及目录。"""
    limits = {"epochs": (1, 10_000), "batch_size": (1, 4096), "lr": (1e-8, 1), "full_lr": (1e-8, 1),
              "weight_decay": (0, 1), "drop_rate": (0, 0.9), "seed": (0, 2**32 - 1),
              "demo_steps": (1, 10**6), "max_length": (1, 1 << 20), "limit": (1, 10**9)}
    for key, (low, high) in limits.items():
        if getattr(s, key) is not None:
            check_range(f"--{key.replace('_', '-')}", getattr(s, key), low, high)
    positive_list("--rank", s.rank, int)
    positive_list("--alpha", s.alpha, float)
    if len(s.rank) * len(s.alpha) > 64:
        raise UserError("--rank 与 --alpha 的组合超过 64 个，扫描太久了")
    if Path(s.out_dir).exists() and not Path(s.out_dir).is_dir():
        raise UserError(f"--out-dir {s.out_dir} 已存在，但不是目录")
    if s.predict and any(not text.strip() for text in s.predict):
        raise UserError("--predict 的文本是空的")


# ===== 附录：前几章的部件（逐字复制，读过前几章可以跳过）=====
# 放在文件末尾，是为了让本章从第 1 节就讲新东西；Python 在调用时才查找这些名字，
# 所以定义写在后面也没关系。

LABELS = {"sms-zh": ["ham", "spam"], "sms-spam": ["ham", "spam"], "imdb": ["neg", "pos"]}


LABEL_NAMES = {"ham": "正常短信", "spam": "垃圾短信", "neg": "差评", "pos": "好评"}


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


def clip_text(text, limit=24):
    """长文本在输出里只显示开头，免得一行被淹没。"""
    return text if len(text) <= limit else f"{text[:limit]}…"


SPLITS = ("train", "val", "test")


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
