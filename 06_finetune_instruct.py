"""06_finetune_instruct.py — 指令微调：让 GPT 按指令回答

本章你会学到：
- Alpaca 格式的指令数据（instruction / input / output），以及两种提示词模板：Alpaca 与 Phi-3
- 批处理：用 <|endoftext|> 填充，目标里只留第一个结束符、其余换成 -100（交叉熵忽略它们）；
  --mask-instruction 把指令部分也遮掉，只学回答
- 从 04 的检查点（或随机初始化、或 GPT-2）开始全参数微调；位置不够长时给位置嵌入表添行
- 贪心生成回答，按任务类型算"完全匹配"，和两个平凡基线（照抄输入、总答最常见的答案）放在一起
- 进阶：用本地 Ollama 或 OpenAI 兼容接口当评审打分；数据工具：查近似重复、生成与改进数据
运行：python 06_finetune_instruct.py          # 默认：2 核 CPU 约 5 分钟
      python 06_finetune_instruct.py --quick  # 冒烟：tiny 模型，约 15 秒
      python 06_finetune_instruct.py --interactive   # 和训练好的模型对话
"""
import argparse
import base64
import collections
import csv
import http.client
import importlib.util
import json
import math
import mmap
import os
import random
import re
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

# 本章用到的 UserError、ArgParser、check_range、GPTModel、generate、load_init、save_checkpoint、
# StopFlag 等来自 01–04，见文末附录。


# ===== 1. 数据：Alpaca 格式与两种提示词模板 =====
# 每条数据是 {"instruction": 要做什么, "input": 可选的材料, "output": 期望的回答}，外加本项目的
# "task"（任务类型，评测时分类统计；手写的开放式指令是 "open"）。data/instruct/ 里是固定的三个划分，
# 由 data/make_instructions.py 生成：测试集用的问法训练时一次也没出现过（见 data/README.md）。

SPLITS = ("train", "val", "test")
# 书中 Alpaca 模板的开场白很长；小模型的上下文只有一百多个 token，这里用一句短的中文
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


def read_entries(path):
    """读一个 Alpaca 格式的 JSON 列表；每条检查字段，出错时指出是第几条。缺 input 当作空，缺 task 当作 open。"""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"找不到数据文件 {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} 不是 UTF-8 的 JSON 文件（{type(err).__name__}）") from None
    if not isinstance(data, list) or not data:
        raise UserError(f"{path} 应是一个非空的 JSON 列表，每项含 instruction 和 output")
    entries = []
    for i, item in enumerate(data, 1):
        fields = (item.get(key, "") if isinstance(item, dict) else None
                  for key in ("instruction", "input", "output", "task"))
        instruction, inp, output, task = fields
        if not all(isinstance(v, str) for v in (instruction, inp, output, task)):
            raise UserError(f"{path} 第 {i} 条：应是含字符串字段 instruction、output（input 可选）的对象")
        if not instruction.strip() or not output.strip():
            raise UserError(f"{path} 第 {i} 条：instruction 或 output 是空的")
        entries.append({"instruction": instruction, "input": inp, "output": output,
                        "task": task or "open"})
    return entries


def load_splits(data, seed):
    """默认读 data/instruct 的三个划分；--data 给的单个文件按 85/5/10 打乱切分（书中的比例）。"""
    if data is None:
        return {split: read_entries(DATA_DIR / "instruct" / f"{split}.json") for split in SPLITS}
    entries = read_entries(data)
    if len(entries) < 20:
        raise UserError(f"{data} 只有 {len(entries)} 条，至少要 20 条才能切出训练、验证、测试集")
    random.Random(seed).shuffle(entries)
    n_train, n_test = int(len(entries) * 0.85), int(len(entries) * 0.10)
    return {"train": entries[:n_train], "test": entries[n_train:n_train + n_test],
            "val": entries[n_train + n_test:]}


# ===== 2. 批处理：填充、-100，和"只学回答" =====
# 一条训练样本 = 提示词的 token + 回答的 token + 一个 <|endoftext|>。模型要学会在回答完时写出结束符，
# 生成时看到它就停。一批里长短不一：右边用 <|endoftext|> 填充到本批最长。
# 目标 = 输入右移一位。填充位置不该学：把它们的目标换成 -100，F.cross_entropy 默认忽略 -100——
# 但第一个结束符要留着，它正是"回答到此为止"。

IGNORE = -100  # F.cross_entropy 的 ignore_index 默认值


def encode_entry(tokenizer, entry, style):
    """一条数据 → (全部 token, 提示词的 token 数)。encode_ordinary：数据里的 "<|endoftext|>" 只当普通文字。"""
    prompt = tokenizer.encode_ordinary(format_prompt(entry, style))
    return prompt + tokenizer.encode_ordinary(entry["output"]), len(prompt)


def collate_instruct(batch, pad_id, allowed_max_length=None, mask_instruction=False):
    """[(ids, 提示词长度), ...] → inputs、targets，形状都是 (b, T)。
    每条后面至少补一个 pad_id（就是结束符）：inputs 去掉最后一个，targets 去掉第一个（右移一位）。
    targets 里只保留第一个结束符，之后的填充换成 -100；mask_instruction 时提示词部分也换成 -100。
    allowed_max_length：超过就截断（模型的上下文装不下更长的）。"""
    width = max(len(ids) for ids, _ in batch) + 1
    inputs, targets = [], []
    for ids, n_prompt in batch:
        seq = torch.tensor(ids + [pad_id] * (width - len(ids)))
        x, y = seq[:-1].clone(), seq[1:].clone()
        # y[j] 是 x[j] 之后的那个 token：y[len(ids)-1] 是第一个结束符（保留），再往后全是填充
        y[len(ids):] = IGNORE
        if mask_instruction:
            # y[j] = ids[j+1]；j ≤ n_prompt-2 时它还是提示词里的 token：不学"复述指令"
            y[:n_prompt - 1] = IGNORE
        inputs.append(x[:allowed_max_length])
        targets.append(y[:allowed_max_length])
    return torch.stack(inputs), torch.stack(targets)


def show_collate(tokenizer, entry, style, mask_instruction):
    """打印一条样本的 inputs / targets 末尾，让读者看见右移一位、保留的结束符和 -100。"""
    ids, n_prompt = encode_entry(tokenizer, entry, style)
    short, _ = encode_entry(tokenizer, {**entry, "output": entry["output"][:1]}, style)
    x, y = collate_instruct([(ids, n_prompt), (short, n_prompt)], tokenizer.eot_token,
                   mask_instruction=mask_instruction)
    print(f"提示词模板（{style}）：\n" + format_prompt(entry, style) + entry["output"] + "<|endoftext|>")
    print(f"这一条 {len(ids)} 个 token（提示词 {n_prompt} 个）；和一条更短的放进一批，"
          f"填充到 {x.shape[1]}。短的那条的最后 6 位：")
    print(f"  inputs  {x[1, -6:].tolist()}\n  targets {y[1, -6:].tolist()}"
          f"  ← 第一个 {tokenizer.eot_token} 是结束符，要学；之后的 -100 不参与损失")
    if mask_instruction:
        print(f"  --mask-instruction：targets 的前 {n_prompt - 1} 位也是 -100，只在回答上算损失")


# ===== 3. 起点：load_init，以及加长位置嵌入 =====
# 和 05 一样一行载入：04 的检查点（有就用，并说一声）、随机初始化、或 GPT-2。
# 04 的 mini 只学过 64 个位置，而"提示词 + 回答"常有七八十个 token：给位置嵌入表添上新行——
# 已学过的位置原样保留，新位置随机初始化、在微调中学。注意力本身不依赖长度，只有位置嵌入和掩码要跟着变。

PRETRAINED = Path("runs/pretrain/ckpt.pt")  # 04_pretrain.py 默认写出的检查点
CONTEXT = 128  # 本章的上下文长度：装得下数据里最长的"提示词 + 回答"


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


def extend_context(model, length):
    """位置嵌入表不足 length 行时添行（新行 N(0, 0.02)，和 GPTModel 的初始化相同），并重建因果掩码。"""
    old = model.pos_emb.weight.data
    if length <= old.shape[0]:
        return False
    table = nn.Embedding(length, old.shape[1]).to(old.device, old.dtype)
    nn.init.normal_(table.weight, mean=0.0, std=0.02)
    table.weight.data[:old.shape[0]] = old
    model.pos_emb = table
    model.cfg = dict(model.cfg, context_length=length)
    mask = torch.triu(torch.ones(length, length, dtype=torch.bool, device=old.device), diagonal=1)
    for block in model.trf_blocks:  # 不用 SDPA 时，注意力靠这个 buffer 做因果掩码
        block.att.register_buffer("mask", mask, persistent=False)
    return True


# ===== 4. 训练：只是换了数据的预训练 =====
# 损失还是"预测下一个 token"的交叉熵，只是 -100 的位置不算。全参数微调，AdamW，学习率先预热再线性降到 0。

@dataclass
class InstructState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: tiktoken.Encoding
    data: dict                    # {"train": [(ids, 提示词长度), ...], "val": …}
    entries: dict                 # 原始条目，生成与评测用
    device: torch.device
    generator: torch.Generator    # 打乱训练集专用
    step: int = 0
    tokens_seen: int = 0          # 读过的真实 token（提示词 + 回答，不含填充）
    train_seconds: float = 0.0
    history: list = field(default_factory=list)


def batch_loss(model, x, y, device):
    """只在要学的位置（目标不是 -100）上算输出头和交叉熵。和 model(x) 全算一遍再用 ignore_index 跳过，
    损失完全相同；但输出头（宽 × 词表）是这个小模型最贵的一层，而只学回答时要学的位置不到一成。"""
    x, y = x.to(device), y.to(device)
    positions = torch.arange(x.shape[1], device=device)
    hidden = model.drop_emb(model.tok_emb(x) + model.pos_emb(positions))
    hidden = model.final_norm(model.trf_blocks(hidden))
    keep = y != IGNORE
    return F.cross_entropy(model.out_head(hidden[keep]).float(), y[keep])


@torch.no_grad()
def evaluate_loss(state, s, split, limit=200):
    """一个划分前 limit 条上的平均损失（文件已打乱，前面的就是随机样本）：够看出走势，又不拖慢训练。"""
    state.model.eval()
    examples = state.data[split][:limit]
    pad_id = state.tokenizer.eot_token
    batches = [collate_instruct(examples[i:i + s.batch_size], pad_id, s.context, s.mask_instruction)
               for i in range(0, len(examples), s.batch_size)]
    losses = [batch_loss(state.model, x, y, state.device).item() for x, y in batches]
    state.model.train()
    return sum(losses) / len(losses)


def train_instruct(state, s):
    """训练 s.epochs 轮。每 s.eval_every 步在训练集、验证集上各评估一次；Ctrl-C 时存好模型再退出。"""
    examples = state.data["train"]
    steps_per_epoch = math.ceil(len(examples) / s.batch_size)
    total = s.epochs * steps_per_epoch
    pad_id = state.tokenizer.eot_token
    state.model.train()
    with StopFlag() as stop:
        for epoch in range(s.epochs):
            order = torch.randperm(len(examples), generator=state.generator).tolist()
            for start in range(0, len(order), s.batch_size):
                t0 = time.perf_counter()
                batch = [examples[i] for i in order[start:start + s.batch_size]]
                x, y = collate_instruct(batch, pad_id, s.context, s.mask_instruction)
                # 预热 warmup 步，然后线性降到 0：和 04、05 的做法一样
                lr = s.lr * min(1.0, (state.step + 1) / s.warmup_steps) * (1 - state.step / total)
                for group in state.optimizer.param_groups:
                    group["lr"] = lr
                loss = batch_loss(state.model, x, y, state.device)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(state.model.parameters(), 1.0)
                state.optimizer.step()
                state.optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.train_seconds += time.perf_counter() - t0
                # 和 04 同一口径：真实 token 都要前向、反向（填充不算）；-100 只是不进损失，计算一样要做
                state.tokens_seen += int((x != pad_id).sum())
                row = {"step": state.step, "epoch": epoch + 1, "tokens_seen": state.tokens_seen,
                       "lr": lr, "train_loss": loss.item()}
                if state.step % s.eval_every == 0 or state.step == total:
                    row["eval_train_loss"] = evaluate_loss(state, s, "train")
                    row["eval_val_loss"] = evaluate_loss(state, s, "val")
                    eta = state.train_seconds / state.step * (total - state.step)
                    print(f"步 {state.step:>5}/{total}（第 {epoch + 1} 轮）"
                          f"训练 loss {row['eval_train_loss']:.3f}"
                          f"  验证 loss {row['eval_val_loss']:.3f}  lr {lr:.1e}  "
                          f"{state.tokens_seen / state.train_seconds:,.0f} token/s  "
                          f"已用 {state.train_seconds:.0f}s  还要约 {eta:.0f}s", flush=True)
                state.history.append(row)
                if stop.requested:
                    path = save_instruct(state, s)
                    print(f"收到 Ctrl-C：模型已存到 {path}（第 {state.step} 步），可以直接用 --interactive 试")
                    sys.exit(130)
    return save_instruct(state, s)


def save_instruct(state, s):
    """检查点（原子写入）+ 损失历史 CSV（+ 有 matplotlib 时的 loss.png）。"""
    out_dir = Path(s.out_dir)
    # prompt_style 记进 config：载入模型的人不用再猜当初用的是哪种模板
    config = dict(state.model.cfg, prompt_style=s.prompt_style)
    path = out_dir / "model.pt"
    save_checkpoint(path, {"kind": "instruct", "config": config,
                           "model": state.model.state_dict(),
                           "tokenizer": tokenizer_record(state.tokenizer), "step": state.step,
                           "mask_instruction": s.mask_instruction})
    write_loss_csv(out_dir / "history.csv", state.history)
    plot_losses(out_dir / "loss.png", state.history)
    return path


def load_instruct_model(path):
    """本章写出的 model.pt → (model, tokenizer, config)；config["prompt_style"] 是训练时的模板。"""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "instruct":
        raise UserError(f"{path} 不是本章写出的指令微调检查点；先运行 06_finetune_instruct.py 训练一个")
    model = model_from_checkpoint(ckpt)
    return model.eval(), tokenizer_from_record(ckpt["tokenizer"]), model.cfg


# ===== 5. 生成与评测：完全匹配，按任务类型 =====
# 生成用 03 的 generate：贪心（每步取概率最大的 token），写出 <|endoftext|> 就停。
# 可验证的任务只有一个正确答案，"完全匹配"就能打分（去掉首尾空白和句末的句号）；
# 开放式的指令没有唯一答案，要靠评审模型（进阶：--judge）。

@torch.no_grad()
def respond(model, tokenizer, entries, max_new_tokens=48):
    """每条 Alpaca 条目 → 模型的回答（字符串）。提示词用训练时的模板（记在 model.cfg 里）。"""
    model.eval()
    style = model.cfg.get("prompt_style", "alpaca")
    context = model.cfg["context_length"]
    device = next(model.parameters()).device
    answers = []
    for entry in entries:
        prompt = tokenizer.encode_ordinary(format_prompt(entry, style))
        # 提示词太长时只留结尾：回答紧跟在"### 回答："后面，开头的说明丢掉影响最小
        room = context - max_new_tokens
        prompt = prompt[-room:] if len(prompt) > room else prompt
        idx = torch.tensor([prompt], device=device)
        out = generate(model, idx, max_new_tokens, context, eos_id=tokenizer.eot_token)
        # 只留 vocab 里真实存在的 id：词表补齐到 64 的倍数时，多出来的几个 id 没有对应的字节
        new = [t for t in out[0, len(prompt):].tolist() if t < tokenizer.n_vocab]
        answers.append(tokenizer.decode(new).strip())
    return answers


def normalize(text):
    return text.strip().rstrip("。.").strip()


def score_exact(entries, answers):
    """按任务类型统计完全匹配：{task: (对的条数, 总条数)}。"""
    table = {}
    for entry, answer in zip(entries, answers):
        right, total = table.get(entry["task"], (0, 0))
        correct = normalize(answer) == normalize(entry["output"])
        table[entry["task"]] = (right + correct, total + 1)
    return table


def baseline_answers(train_entries, entries):
    """两个平凡基线：照抄输入（没有输入就抄指令）；按任务类型总答训练集里最常见的答案。"""
    counts = {}
    for e in train_entries:
        counts.setdefault(e["task"], collections.Counter())[e["output"]] += 1
    common = {task: c.most_common(1)[0][0] for task, c in counts.items()}
    copy = [e["input"] or e["instruction"] for e in entries]
    most = [common.get(e["task"], "") for e in entries]
    return {"照抄输入": copy, "最常见答案": most}


def print_exact_table(entries, answers, baselines):
    """一张表：每种任务的条数、模型、两个基线的完全匹配率；最后一行是所有可验证任务合计。"""
    tables = {"模型": score_exact(entries, answers),
              **{name: score_exact(entries, b) for name, b in baselines.items()}}
    tasks = sorted(t for t in tables["模型"] if t != "open")
    print(f"\n{'任务':<10}{'条数':>6}" + "".join(f"{name:>10}" for name in tables))
    for task in tasks + ["合计"]:
        cells = []
        for table in tables.values():
            right, total = (table[task] if task != "合计" else
                            [sum(table[t][i] for t in tasks) for i in (0, 1)])
            cells.append(f"{right / max(total, 1):>11.1%}")
        n = tables["模型"][task][1] if task != "合计" else sum(tables["模型"][t][1] for t in tasks)
        print(f"{TASK_NAMES.get(task, task):<10}{n:>6}" + "".join(cells))
    right = sum(tables["模型"][t][0] for t in tasks)
    return right / max(sum(tables["模型"][t][1] for t in tasks), 1)


TASK_NAMES = {"add": "加法", "sub": "减法", "compare": "比大小", "reverse": "反转列表", "sort": "排序",
              "count": "数字母", "case": "大小写", "numeral": "数字↔汉字", "unit": "单位换算",
              "weekday": "星期几", "lookup": "查表", "合计": "合计（可验证）"}


def evaluate_test(model, tokenizer, splits, s):
    """给测试集逐条生成回答，存成 JSON，打印完全匹配表，返回可验证任务的合计完全匹配率。"""
    entries = splits["test"]
    t0 = time.perf_counter()
    answers = respond(model, tokenizer, entries, s.max_new_tokens)
    print(f"\n为测试集的 {len(entries)} 条生成回答用时 {time.perf_counter() - t0:.0f} 秒（贪心，遇到结束符就停）")
    path = Path(s.out_dir) / "test_responses.json"
    records = [{**entry, "model_response": answer} for entry, answer in zip(entries, answers)]
    write_json(path, records)
    for record in records[:4]:  # 几条样例：读者先用眼睛看看回答像不像样
        print(f"  {record['instruction']} {record['input']} → 「{record['model_response']}」"
              f"（参考：{record['output']}）")
    acc = print_exact_table(entries, answers, baseline_answers(splits["train"], entries))
    print(f"回答已存到 {path}")
    return records, acc


# ===== 6. 主程序：命令行 → 数据与模型 → 训练 → 生成与评测 =====
DEFAULTS = {"epochs": 4, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.1, "warmup_steps": 50,
            "eval_every": 500, "max_new_tokens": 48, "seed": 123, "drop_rate": 0.0,
            "mask_instruction": True}
QUICK = {"model": "tiny", "epochs": 2, "batch_size": 16, "warmup_steps": 5, "limit": 300,
         "eval_every": 10, "max_new_tokens": 12}


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


def build_state(s):
    """数据 → 起点模型（需要时加长位置）→ 编码 → 优化器。"""
    device = resolve_device(s.device)
    splits = load_splits(s.data, s.seed)
    if s.limit:
        splits = {k: v[:s.limit] for k, v in splits.items()}
    init = resolve_init(s)
    torch.manual_seed(s.seed)
    # 随机起点直接建一个上下文为 CONTEXT 的模型；预训练起点的上下文不够时，下面再加长
    model, tokenizer, cfg = load_init(init, device, model_config(s.model, context_length=CONTEXT))
    if extend_context(model, CONTEXT):
        print(f"位置嵌入：{init} 只学过 {cfg['context_length']} 个位置，加长到 {CONTEXT}（新位置随机初始化）")
    model.cfg = dict(model.cfg, drop_rate=s.drop_rate)
    # 截断长度跟着模型走：mini 是 128；GPT-2 有 1024 个位置，书中的长回答也放得下
    s.context = model.cfg["context_length"]
    for module in model.modules():  # 预训练检查点里 dropout 是 0；微调时按 --drop-rate 重设
        if isinstance(module, nn.Dropout):
            module.p = s.drop_rate
    data = {split: [encode_entry(tokenizer, e, s.prompt_style) for e in entries]
            for split, entries in splits.items()}
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=s.lr)
    state = InstructState(model, optimizer, tokenizer, data, splits, device,
                          torch.Generator().manual_seed(s.seed))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"数据：训练 {len(data['train']):,} 条、验证 {len(data['val']):,}、测试 {len(data['test']):,}；"
          f"模型 {model.cfg['n_layers']} 层、宽 {model.cfg['emb_dim']}、上下文 {s.context}，"
          f"{n_params:,} 个参数，全部训练")
    return state, splits


def run(args):
    s = make_settings(args)
    check_args(s)
    if s.find_duplicates:
        return report_duplicates(read_entries(s.find_duplicates), s.threshold)
    if s.generate_data:
        return generate_data(s)
    if s.improve_data:
        return improve_data(s)
    if s.interactive:
        return chat(s)
    t_start = time.perf_counter()
    state, splits = build_state(s)
    try:  # 数据和模型都没问题了才建输出目录：出错时不留下空目录
        Path(s.out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"无法创建 --out-dir {s.out_dir}（{type(err).__name__}）") from None
    show_collate(state.tokenizer, splits["train"][0], s.prompt_style, s.mask_instruction)
    path = train_instruct(state, s)
    print(f"训练完成：{state.step} 步，{state.train_seconds:.0f} 秒；模型存在 {path}")
    model, tokenizer, _ = load_instruct_model(path)
    records, acc = evaluate_test(model.to(state.device), tokenizer, splits, s)
    if s.judge != "none":
        judge_records(records, make_judge(s), Path(s.out_dir) / "test_scores.json")
    print(f"\n可验证任务的完全匹配：{acc:.1%}；总用时 {time.perf_counter() - t_start:.0f} 秒。"
          f"试试 python 06_finetune_instruct.py --interactive")


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


# ===== 进阶：评审模型、数据工具、对话、命令行细节（第一次读可以跳过）=====

# —— 评审模型：本地 Ollama，或任何 OpenAI 兼容的 chat/completions 接口 ——
# 开放式回答没有唯一答案：请一个大模型对照参考答案打 0–100 分（书里用 Llama 3 8B / GPT-4）。
# 两种协议都只是一次 HTTP POST，用 urllib 就够了。
JUDGE_PROMPT = ("你是严格的阅卷老师。根据指令和参考答案，给模型的回答打分：0 到 100 的整数，"
                "100 表示完全正确且切题。只回答这个整数。\n\n指令：{instruction}\n输入：{input}\n"
                "参考答案：{output}\n模型的回答：{response}\n分数：")


def post_json(url, payload, timeout, service, headers=None):
    """POST 一个 JSON、读回一个 JSON；连不上、超时、HTTP 错误都变成一行中文（不打印请求头：里面可能有 key）。"""
    request = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as err:
        body = err.read().decode("utf-8", "replace")[:200]
        raise UserError(f"{service}（{url}）返回 HTTP {err.code}：{body}") from None
    except (socket.timeout, TimeoutError):
        raise UserError(f"{service}（{url}）在 {timeout} 秒内没有回答：模型可能还在加载，"
                        "用 --judge-timeout 调长") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, (socket.timeout, TimeoutError)):
            raise UserError(f"{service}（{url}）在 {timeout} 秒内没有回答：模型可能还在加载，"
                            "用 --judge-timeout 调长") from None
        hint = ("Ollama 没有在运行：在另一个终端运行 ollama serve（并先 ollama pull 模型）"
                if service == "Ollama" else "检查 --api-base 和网络")
        raise UserError(f"连不上 {service}（{url}，{type(err.reason).__name__}）：{hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{service}（{url}）的回答不是 JSON") from None


def ask_ollama(prompt, model, url, timeout):
    """Ollama 的 /api/chat：stream=False 一次拿回整段；temperature 0 + 固定种子，同样的问题同样的分。"""
    reply = post_json(url.rstrip("/") + "/api/chat",
                      {"model": model, "messages": [{"role": "user", "content": prompt}],
                       "stream": False, "options": {"temperature": 0, "seed": 123}},
                      timeout, "Ollama")
    try:
        return reply["message"]["content"]
    except (KeyError, TypeError):
        raise UserError(f"Ollama 的回答里没有 message.content：{str(reply)[:200]}") from None


def ask_openai(prompt, model, api_base, timeout):
    """OpenAI 兼容的 /chat/completions（OpenAI、DeepSeek、通义千问的兼容模式都是这个协议）。
    key 只从环境变量 OPENAI_API_KEY 读，只放进请求头，不打印、不保存。"""
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        raise UserError("--judge openai 需要环境变量 OPENAI_API_KEY（key 不会被打印或保存）")
    reply = post_json(api_base.rstrip("/") + "/chat/completions",
                      {"model": model, "messages": [{"role": "user", "content": prompt}],
                       "temperature": 0},
                      timeout, "OpenAI 兼容接口", headers={"Authorization": f"Bearer {key}"})
    try:
        return reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise UserError(f"接口的回答里没有 choices[0].message.content：{str(reply)[:200]}") from None


def make_judge(s):
    """按 --judge 返回一个函数：提示词 → 评审模型的回答文本。"""
    if s.judge == "ollama":
        return lambda prompt: ask_ollama(prompt, s.judge_model or "llama3", s.ollama_url,
                                         s.judge_timeout)
    return lambda prompt: ask_openai(prompt, s.judge_model or "gpt-4o-mini", s.api_base,
                                     s.judge_timeout)


def parse_score(text):
    """评审的回答里第一个 0–100 的整数；没有就是 None（这条不计入平均分）。"""
    for match in re.finditer(r"\d+", text):
        if 0 <= int(match.group()) <= 100:
            return int(match.group())
    return None


def judge_records(records, ask, path):
    """每条回答打一次分，打印平均分（可验证任务与开放式分开），分数存进 JSON。"""
    scores = []
    for i, record in enumerate(records, 1):
        prompt = JUDGE_PROMPT.format(response=record["model_response"], **record)
        scores.append(parse_score(ask(prompt)))
        if i % 20 == 0 or i == len(records):
            print(f"  评审：{i}/{len(records)}", flush=True)
    write_json(path, [{**r, "score": sc} for r, sc in zip(records, scores)])
    for name, keep in (("可验证任务", lambda r: r["task"] != "open"),
                       ("开放式", lambda r: r["task"] == "open")):
        got = [sc for r, sc in zip(records, scores) if keep(r) and sc is not None]
        if got:
            print(f"评审平均分（{name}，{len(got)} 条）：{sum(got) / len(got):.1f} / 100")
    print(f"没能解析出分数的：{sum(sc is None for sc in scores)} 条；分数存在 {path}")
    return scores


# —— 数据工具 1：近似重复（字符 n-gram 的 MinHash + 分段哈希） ——
# 两条指令的相似度用 Jaccard：字符 3-gram 集合的交集 / 并集。两两比较是 O(n²)；MinHash 把每条压成
# 64 个数，两条签名相同位置相等的比例 ≈ Jaccard；再把签名分成 16 段，任一段完全相同才成为候选，最后精确核对。

def shingles(text, n=3):
    text = re.sub(r"\s+", "", text)
    return {text[i:i + n] for i in range(max(len(text) - n + 1, 1))}


def minhash_signatures(sets, num_perm=64, seed=1):
    """每个集合 → num_perm 个最小哈希值（numpy 向量化）：h(x) = (a·x + b) mod p，x 是 crc32 mod p。
    p = 2³¹−1 要比 a·x 小得多：取模"绕圈"很多次，各个 h 才像互不相关的随机排列。"""
    rng = np.random.default_rng(seed)
    prime = np.uint64((1 << 31) - 1)
    a = rng.integers(1, int(prime), num_perm, dtype=np.uint64)
    b = rng.integers(0, int(prime), num_perm, dtype=np.uint64)
    sigs = np.empty((len(sets), num_perm), dtype=np.uint64)
    for row, items in enumerate(sets):
        x = np.array([zlib.crc32(s.encode("utf-8")) for s in items], dtype=np.uint64) % prime
        # a、x 都小于 2^31：乘积小于 2^62，不会溢出 uint64
        sigs[row] = ((x[:, None] * a[None, :] + b) % prime).min(axis=0)
    return sigs


def find_duplicates(entries, threshold=0.7, num_perm=64, bands=16):
    """返回 [(i, j, jaccard), ...]：指令 + 输入的字符 3-gram Jaccard ≥ threshold 的条目对。
    候选都精确核对，所以没有误报；分段哈希是近似的：刚过阈值的一对可能漏掉，越像越不会漏
    （16 段 × 4 行：Jaccard 0.75 的一对被漏掉的概率约 0.3%）。"""
    sets = [shingles(e["instruction"] + e["input"]) for e in entries]
    sigs = minhash_signatures(sets, num_perm)
    rows = num_perm // bands
    candidates = set()
    for band in range(bands):
        buckets = {}
        for i, key in enumerate(map(bytes, sigs[:, band * rows:(band + 1) * rows])):
            buckets.setdefault(key, []).append(i)
        candidates |= {(i, j) for ids in buckets.values()
                       for k, i in enumerate(ids) for j in ids[k + 1:]}
    pairs = [(i, j, len(sets[i] & sets[j]) / len(sets[i] | sets[j])) for i, j in sorted(candidates)]
    return [p for p in pairs if p[2] >= threshold]


def report_duplicates(entries, threshold):
    t0 = time.perf_counter()
    pairs = find_duplicates(entries, threshold)
    print(f"{len(entries):,} 条里找到 {len(pairs)} 对近似重复（字符 3-gram Jaccard ≥ {threshold}，"
          f"用时 {time.perf_counter() - t0:.1f} 秒）")
    for i, j, sim in sorted(pairs, key=lambda p: -p[2])[:20]:
        print(f"  {sim:.2f}  第 {i + 1} 条「{entries[i]['instruction'][:30]}」 ≈ 第 {j + 1} 条「"
              f"{entries[j]['instruction'][:30]}」")
    return pairs


# —— 数据工具 2：用本地模型生成新数据、改进已有回答 ——
GENERATE_PROMPT = ("请写一条新的中文指令微调数据：一个具体、有明确答案的小任务。只输出一个 JSON 对象，"
                   '格式为 {"instruction": "...", "input": "...", "output": "..."}，input 可以是空字符串。'
                   "这是第 {n} 条，请和常见的例子不同。")
IMPROVE_PROMPT = ("下面是一条指令和它的回答。请写出一个更准确、更完整但简洁的回答，只输出新的回答本身。\n\n"
                  "指令：{instruction}\n输入：{input}\n原来的回答：{output}\n新的回答：")
RATE_PROMPT = ("给下面这条回答打分：0 到 100 的整数，100 表示完全正确、切题、简洁。只回答这个整数。\n\n"
               "指令：{instruction}\n输入：{input}\n回答：{output}\n分数：")


def parse_entry(text):
    """模型的回答里找第一个 {...}，解析成一条 Alpaca 条目；不合格就返回 None。"""
    match = re.search(r"\{.*\}", text, re.S)
    try:
        item = json.loads(match.group()) if match else None
    except json.JSONDecodeError:
        return None
    fields = ("instruction", "output")
    if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in fields):
        return None
    if not item["instruction"].strip() or not item["output"].strip():
        return None
    return {"instruction": item["instruction"], "input": str(item.get("input", "")),
            "output": item["output"]}


def generate_data(s):
    """--generate-data N：让评审模型逐条写新数据，解析失败的丢掉，写成 Alpaca 格式的 JSON。"""
    ask, out = make_judge(s), Path(s.out_dir) / "generated.json"
    items, tries = [], 0
    while len(items) < s.generate_data and tries < 3 * s.generate_data:
        tries += 1
        item = parse_entry(ask(GENERATE_PROMPT.replace("{n}", str(len(items) + 1))))
        if item and all(item["instruction"] != old["instruction"] for old in items):
            items.append(item)
            print(f"  {len(items)}/{s.generate_data}：{item['instruction'][:40]}", flush=True)
    Path(s.out_dir).mkdir(parents=True, exist_ok=True)
    write_json(out, items)
    print(f"生成了 {len(items)} 条（请求 {tries} 次），存到 {out}；可以用 --data {out} 训练")
    return items


def improve_data(s):
    """--improve-data FILE：每条先给原回答打分，再请模型重写、给新回答打分，留下分高的那个。"""
    entries, ask = read_entries(s.improve_data), make_judge(s)
    out, kept, changed = Path(s.out_dir) / "improved.json", [], 0
    for i, entry in enumerate(entries, 1):
        old = parse_score(ask(RATE_PROMPT.format(**entry))) or 0
        new_output = ask(IMPROVE_PROMPT.format(**entry)).strip()
        new = 0
        if new_output:
            new = parse_score(ask(RATE_PROMPT.format(**{**entry, "output": new_output}))) or 0
        better = new > old
        changed += better
        kept.append({**entry, "output": new_output if better else entry["output"]})
        print(f"  {i}/{len(entries)}：原 {old} 分，新 {new} 分 → {'换成新回答' if better else '保留原回答'}",
              flush=True)
    Path(s.out_dir).mkdir(parents=True, exist_ok=True)
    write_json(out, kept)
    print(f"{changed}/{len(entries)} 条换成了新回答，存到 {out}")
    return kept


# —— 对话、文件与画图 ——
def chat(s):
    """--interactive：载入 out-dir 的 model.pt，在终端里一问一答（每次一条指令，不记上下文）。"""
    model, tokenizer, cfg = load_instruct_model(Path(s.out_dir) / "model.pt")
    model.to(resolve_device(s.device))
    print(f"已载入 {Path(s.out_dir) / 'model.pt'}（模板 {cfg.get('prompt_style', 'alpaca')}）。"
          "输入一条指令，回车得到回答；空行或 Ctrl-D 退出。")
    while True:
        try:
            line = input("指令> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line.strip():
            return
        print(respond(model, tokenizer, [{"instruction": line, "input": ""}], s.max_new_tokens)[0])


def write_json(path, data):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # 先写临时文件再改名：中途出错也不会留下半个 JSON


LOSS_FIELDS = ["step", "epoch", "tokens_seen", "lr", "train_loss",
               "eval_train_loss", "eval_val_loss"]


def write_loss_csv(path, history):
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, LOSS_FIELDS, restval="")
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def plot_losses(path, history):
    """训练集 / 验证集的损失曲线；matplotlib 是可选依赖，没装就只留 CSV。"""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("eval_train_loss", "train"), ("eval_val_loss", "val")):
        rows = [r for r in history if key in r]
        ax.plot([r["tokens_seen"] for r in rows], [r[key] for r in rows], "o-", label=label)
    ax.set_xlabel("tokens seen (prompt + answer, no padding)")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# —— 命令行 ——
def build_parser():
    p = ArgParser(description="指令微调：让 GPT 按指令回答（默认：data/instruct 的中文指令数据）")
    p.add_argument("--data", help="一个 Alpaca 格式的 JSON 列表（如书中的 instruction-data.json），按 85/5/10 切分")
    p.add_argument("--init", default="auto",
                   help=f"起点：auto=有 {PRETRAINED} 就用它，否则随机初始化（默认）；random；一个 *.pt 检查点；"
                        "gpt2/gpt2-medium/…=真实 GPT-2 权重（书中的设定）")
    p.add_argument("--model", choices=["tiny", "mini"], help="随机初始化时的模型尺寸（默认 mini）")
    p.add_argument("--prompt-style", choices=["alpaca", "phi3"], default="alpaca",
                   help="提示词模板（默认 alpaca）")
    p.add_argument("--mask-instruction", action=argparse.BooleanOptionalAction,
                   help="提示词部分的目标也换成 -100，只在回答上算损失（默认开：本章的小模型这样学得快一倍；"
                        "--no-mask-instruction 是书中的默认做法，提示词也算损失）")
    for flag, kind, text in (("--epochs", int, "训练轮数"), ("--batch-size", int, "每批几条"),
                             ("--lr", float, "AdamW 峰值学习率（预热后线性降到 0）"),
                             ("--weight-decay", float, "AdamW 权重衰减"),
                             ("--warmup-steps", int, "学习率预热步数"),
                             ("--drop-rate", float, "微调时的 dropout 概率"),
                             ("--eval-every", int, "每多少步评估一次损失"),
                             ("--max-new-tokens", int, "每条回答最多生成几个 token"),
                             ("--seed", int, "随机种子，CPU 上完全可复现")):
        key = flag[2:].replace("-", "_")
        quick = f"，--quick 时 {QUICK[key]}" if key in QUICK else ""
        p.add_argument(flag, type=kind, help=f"{text}（默认 {DEFAULTS[key]}{quick}）")
    p.add_argument("--limit", type=int, help="每个划分最多用前几条（--quick 时 300）")
    p.add_argument("--out-dir", default="runs/instruct", help="model.pt、history.csv、回答与分数的目录")
    p.add_argument("--interactive", action="store_true", help="不训练：载入 out-dir 的 model.pt，在终端里对话")
    p.add_argument("--judge", choices=["none", "ollama", "openai"], default="none",
                   help="训练评测后再请评审模型给每条回答打分（默认 none：只算完全匹配，完全离线）")
    p.add_argument("--judge-model", help="评审模型名（默认 ollama: llama3，openai: gpt-4o-mini）")
    p.add_argument("--ollama-url", default=os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434"),
                   help="Ollama 服务地址（默认 $OLLAMA_HOST 或 http://127.0.0.1:11434）")
    p.add_argument("--api-base", default="https://api.openai.com/v1",
                   help="OpenAI 兼容接口的地址（如 https://api.deepseek.com/v1）；key 读环境变量 OPENAI_API_KEY")
    p.add_argument("--judge-timeout", type=float, default=120, help="评审模型每次回答最多等几秒（默认 120）")
    p.add_argument("--find-duplicates", metavar="FILE", help="不训练：报告 FILE 里近似重复的指令")
    p.add_argument("--threshold", type=float, default=0.7, help="近似重复的 Jaccard 阈值（默认 0.7）")
    p.add_argument("--generate-data", type=int, metavar="N", help="不训练：让评审模型写 N 条新数据")
    p.add_argument("--improve-data", metavar="FILE", help="不训练：让评审模型改进 FILE 里的回答，留下分高的")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="计算设备，auto = cuda > mps > cpu")
    p.add_argument("--quick", action="store_true", help="冒烟测试：tiny 随机模型、每个划分 300 条、2 轮")
    return p


def check_args(s):
    """开工之前检查每个数值设置（负数、零、NaN、大得离谱）和文件。"""
    limits = {"epochs": (1, 10_000), "batch_size": (1, 4096), "lr": (1e-8, 1),
              "weight_decay": (0, 1), "warmup_steps": (1, 10**7), "drop_rate": (0, 0.9),
              "eval_every": (1, 10**7), "max_new_tokens": (1, CONTEXT - 8), "seed": (0, 2**32 - 1),
              "limit": (1, 10**9), "judge_timeout": (0.1, 3600), "threshold": (0.01, 1),
              "generate_data": (1, 100_000)}
    for key, (low, high) in limits.items():
        if getattr(s, key) is not None:
            check_range(f"--{key.replace('_', '-')}", getattr(s, key), low, high)
    if Path(s.out_dir).exists() and not Path(s.out_dir).is_dir():
        raise UserError(f"--out-dir {s.out_dir} 已存在，但不是目录")
    for flag in ("data", "find_duplicates", "improve_data"):
        if getattr(s, flag) and not Path(getattr(s, flag)).is_file():
            raise UserError(f"找不到 --{flag.replace('_', '-')} 的文件 {getattr(s, flag)}")
    if s.improve_data or s.generate_data:
        if s.judge == "none":
            raise UserError("--generate-data / --improve-data 需要一个模型来写："
                            "加上 --judge ollama 或 --judge openai")


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
