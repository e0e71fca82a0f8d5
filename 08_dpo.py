"""08_dpo.py — 直接偏好优化（DPO）：不训练奖励模型，直接从"哪个回答更好"里学

本章你会学到：
- 偏好数据：同一个提示词、两个回答（chosen 更好、rejected 更差），以及 Bradley–Terry 模型
- DPO 的损失从哪里来：RLHF 的最优策略反过来就是奖励，代进 Bradley–Terry，奖励模型就消掉了
- 批处理：chosen 与 rejected 各自填充，只有回答的 token 计入对数概率（提示词和填充都遮掉）
- 策略 = 06 的 SFT 模型，参考 = 它的冻结副本；隐式奖励、奖励差（margin）和偏好准确率
- 训练前后对比：偏好准确率、可验证任务的完全匹配、"直接回答"的比例，和几条生成的回答
运行：python 08_dpo.py          # 默认：2 核 CPU 约 3.5 分钟（没有 06 的模型时先做一段短的 SFT 热身）
      python 08_dpo.py --quick  # 冒烟：tiny 模型，约 11 秒
      python 08_dpo.py --evaluate sample.json   # 用训练好的模型给另一份偏好数据算准确率
"""
import argparse
import base64
import copy
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
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

# 本章用到的 UserError、GPTModel、load_init、format_prompt、collate_instruct、batch_loss、respond、
# load_instruct_model 等来自 01–06，见文末附录。


# ===== 1. 偏好数据与 Bradley–Terry =====
# 指令微调（06）告诉模型"该怎么答"；偏好数据告诉它"两个回答里哪个更好"。每条是
# {instruction, input, chosen, rejected, kind, task}：kind 记下 rejected 差在哪里——
# wrong（结果错）、rude（不礼貌）、evasive（躲闪不答）、rambling（啰嗦）。
# data/preferences/ 的三个划分由 data/make_preferences.py 生成，外加手写的问答对；
# 测试集的问法和"坏回答"的说法训练时都没见过（见 data/README.md）。
#
# Bradley–Terry 模型：每个回答有一个分数（奖励）r，"c 比 r 好"的概率是 σ(r_c − r_r)。
# 只有分数之差有意义：两个回答差得越多，越确定哪个好。RLHF 先用偏好数据拟合一个奖励模型，
# 再用强化学习（PPO）让策略去追高奖励；DPO 证明这两步可以合成一步普通的监督学习（第 3 节）。

PREF_SPLITS = ("train", "val", "test")
KIND_NAMES = {"wrong": "结果错", "rude": "不礼貌", "evasive": "躲闪", "rambling": "啰嗦"}


def read_preferences(path):
    """读一个偏好数据 JSON 列表；每条检查字段，出错时指出是第几条。缺 input 当作空，缺 kind/task 当作 open。"""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"找不到偏好数据文件 {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} 不是 UTF-8 的 JSON 文件（{type(err).__name__}）") from None
    if not isinstance(data, list) or not data:
        raise UserError(f"{path} 应是一个非空的 JSON 列表，每项含 instruction、chosen、rejected")
    items = []
    for i, item in enumerate(data, 1):
        keys = ("instruction", "input", "chosen", "rejected", "kind", "task")
        values = [item.get(key, "") if isinstance(item, dict) else None for key in keys]
        if not all(isinstance(v, str) for v in values):
            raise UserError(f"{path} 第 {i} 条：应是含字符串字段 instruction、chosen、rejected 的对象")
        entry = dict(zip(keys, values))
        if not all(entry[key].strip() for key in ("instruction", "chosen", "rejected")):
            raise UserError(f"{path} 第 {i} 条：instruction、chosen 或 rejected 是空的")
        if entry["chosen"] == entry["rejected"]:
            raise UserError(f"{path} 第 {i} 条：chosen 和 rejected 一模一样，没有偏好可学")
        items.append({**entry, "kind": entry["kind"] or "open", "task": entry["task"] or "open"})
    return items


def load_preference_splits(s):
    """默认读 data/preferences 的三个划分；--data 给的单个文件按 85/5/10 打乱切分。"""
    if s.data is None:
        folder = DATA_DIR / "preferences"
        splits = {name: read_preferences(folder / f"{name}.json") for name in PREF_SPLITS}
    else:
        items = read_preferences(s.data)
        if len(items) < 20:
            raise UserError(f"{s.data} 只有 {len(items)} 条，至少要 20 条才能切出训练、验证、测试集")
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(s.seed)).tolist()
        items = [items[i] for i in order]
        n_train, n_test = int(len(items) * 0.85), int(len(items) * 0.10)
        splits = {"train": items[:n_train], "test": items[n_train:n_train + n_test],
                  "val": items[n_train + n_test:]}
    return {name: items[:s.limit] if s.limit else items for name, items in splits.items()}


# ===== 2. 批处理：只数回答的 token =====
# 一条偏好对变成两条序列：提示词 + chosen + 结束符，提示词 + rejected + 结束符。它们和 06 的训练样本
# 一模一样，所以直接用 06 的 collate_instruct（mask_instruction=True）：目标里提示词和填充都是 -100，
# 只剩回答和它的结束符。结束符也算：啰嗦的回答"该停不停"，差别正在这里。
# 一批 b 对拼成 2b 行：前 b 行是 chosen，后 b 行是 rejected，一次前向全算完。

def encode_pair(tokenizer, item, style):
    """一条偏好对 → (chosen 的 token, rejected 的 token, 提示词的 token 数)。两条共用同一个提示词。"""
    chosen, n_prompt = encode_entry(tokenizer, {**item, "output": item["chosen"]}, style)
    rejected, _ = encode_entry(tokenizer, {**item, "output": item["rejected"]}, style)
    return chosen, rejected, n_prompt


def collate_pairs(batch, pad_id, context):
    """[(chosen, rejected, 提示词长度), ...] → inputs、targets，形状 (2b, T)：前 b 行 chosen，后 b 行 rejected。"""
    rows = [(c, n) for c, _, n in batch] + [(r, n) for _, r, n in batch]
    return collate_instruct(rows, pad_id, context, mask_instruction=True)


def show_pair_mask(tokenizer, item, style):
    """打印一条偏好对：哪些位置计入对数概率（回答和结束符），哪些被遮掉（提示词、填充）。"""
    pair = encode_pair(tokenizer, item, style)
    _, y = collate_pairs([pair], tokenizer.eot_token, CONTEXT)
    kind = KIND_NAMES.get(item["kind"], item["kind"])
    print(f"一条偏好对（{kind}）：{item['instruction']} {item['input']}")
    for row, name in ((0, "chosen"), (1, "rejected")):
        kept = y[row][y[row] != IGNORE].tolist()
        text = tokenizer.decode([t for t in kept if t != tokenizer.eot_token])
        print(f"  {name:<8} 共 {len(pair[row])} 个 token：提示词的 {pair[2]} 个不计入（目标是 -100），"
              f"计入对数概率的 {len(kept)} 个 = 「{text}」+ 结束符")


def sequence_logprobs(model, x, y):
    """每一行回答部分的对数概率之和：Σ_t log π(y_t | 前文)，只在目标不是 -100 的位置上算。
    和 06 的 batch_loss 一样只把这些位置送进输出头；结果形状 (行数,)。"""
    positions = torch.arange(x.shape[1], device=x.device)
    hidden = model.drop_emb(model.tok_emb(x) + model.pos_emb(positions))
    hidden = model.final_norm(model.trf_blocks(hidden))
    keep = y != IGNORE
    logp = F.log_softmax(model.out_head(hidden[keep]).float(), dim=-1)
    token_logp = logp.gather(1, y[keep].unsqueeze(1)).squeeze(1)
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(y)[keep]
    return torch.zeros(x.shape[0], device=x.device).index_add(0, rows, token_logp)


# ===== 3. DPO 的损失：奖励模型藏在策略里 =====
# RLHF 的目标：max E[r(x, y)] − β·KL(π ‖ π_ref)——奖励要高，又不能离参考模型（SFT 模型）太远。
# 这个目标有解析解：π*(y|x) = π_ref(y|x)·exp(r(x, y)/β) / Z(x)，Z(x) 只和提示词有关。
# 反过来解出奖励：r(x, y) = β·log[π*(y|x) / π_ref(y|x)] + β·log Z(x)。
# 代进 Bradley–Terry 的 σ(r_c − r_r)：同一个提示词的 β·log Z(x) 相减抵消，奖励模型消失了，
# 只剩策略和参考模型的对数概率之比。对偏好数据做极大似然：
#   loss = −log σ(β·[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))])
# β·(log π − log π_ref) 就是"隐式奖励"：策略比参考模型更喜欢这个回答多少。β 越小，允许离参考越远。

def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """四个 (b,) 张量：回答的对数概率之和 → (平均损失, chosen 的隐式奖励, rejected 的隐式奖励)。"""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    # −log σ(z) 写成 softplus(−z)：z 很大或很小时都不会溢出
    loss = F.softplus(-(chosen_rewards - rejected_rewards)).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


# 纯 DPO 只管两个奖励之差：chosen 和 rejected 的概率可以一起往下掉，只要 rejected 掉得更多。
# 本章实测正是如此（chosen 的奖励变负、生成的完全匹配变差）。Llama 3 等的做法是在损失上再加一项
# chosen 的负对数似然（按 token 平均，权重 --nll-weight，默认 0.2）：偏好照学，写好回答的本事也别丢。
# --nll-weight 0 就是论文和书里的纯 DPO。


def show_loss_by_hand(beta):
    """手算一个例子：训练开始时策略 = 参考，损失是 log 2；策略更偏 chosen 时损失下降。"""
    t = torch.tensor
    start, _, _ = dpo_loss(t([-5.0]), t([-5.0]), t([-5.0]), t([-5.0]), beta)
    later, c, r = dpo_loss(t([-3.0]), t([-6.0]), t([-5.0]), t([-5.0]), beta)
    print(f"DPO 损失手算（β={beta:g}）：开始时策略 = 参考，损失 = log 2 = {start.item():.3f}；"
          f"策略给 chosen 多 2 nat、给 rejected 少 1 nat 后，奖励 {c.item():+.2f} / {r.item():+.2f}，"
          f"损失 = −log σ({c.item() - r.item():.2f}) = {later.item():.3f}")


# ===== 4. 策略与参考：SFT 模型和它的冻结副本 =====
# DPO 从一个已经会按指令回答的模型开始：有 06 写出的 runs/instruct/model.pt 就用它；
# 没有的话，先在 06 的数据上做一段短的 SFT 热身（和 06 同样的损失），本章就能单独运行。
# 参考模型是策略在 DPO 开始前的一份冻结副本：不求梯度、不更新，只用来算 log π_ref。

SFT_CHECKPOINT = Path("runs/instruct/model.pt")  # 06_finetune_instruct.py 默认写出的模型
PRETRAINED = Path("runs/pretrain/ckpt.pt")  # 04_pretrain.py 默认写出的检查点
CONTEXT = 128  # 本章的上下文长度：装得下数据里最长的"提示词 + 回答"


def sft_warmup(s, device):
    """没有 06 的模型时：从 04 的检查点（有就用）或随机初始化开始，在 06 的数据上训练 s.sft_steps 步。"""
    init = s.init if s.init != "auto" else (str(PRETRAINED) if PRETRAINED.is_file() else "random")
    print(f"没有 {SFT_CHECKPOINT}：先做 {s.sft_steps} 步 SFT 热身（06 的数据，起点 {init}）")
    torch.manual_seed(s.seed)
    model, tokenizer, _ = load_init(init, device, model_config(s.model, context_length=CONTEXT))
    extend_context(model, CONTEXT)
    model.cfg = dict(model.cfg, prompt_style="alpaca")
    entries = read_entries(DATA_DIR / "instruct" / "train.json")
    examples = [encode_entry(tokenizer, e, "alpaca") for e in entries]
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.sft_lr, weight_decay=0.1)
    # 热身默认 1500 步，约是 06 的一轮（06 走 4 轮）：够模型学会"看到 ### 回答： 就写个短答案并停下"，
    # DPO 要比较的正是这种模型对两个回答的概率；真要答得好，还是先跑完整的 06
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(s.seed)).tolist()
    model.train()
    t0 = time.perf_counter()
    for step in range(s.sft_steps):
        start = step * s.batch_size % len(order)  # 按打乱后的顺序循环取批
        batch = [examples[i] for i in order[start:start + s.batch_size]]
        x, y = collate_instruct(batch, tokenizer.eot_token, CONTEXT, mask_instruction=True)
        # 预热 50 步，然后线性降到 0：和 06 相同
        lr = s.sft_lr * min(1.0, (step + 1) / 50) * (1 - step / s.sft_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = batch_loss(model, x, y, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(1, s.sft_steps // 5) == 0:
            print(f"  SFT 步 {step + 1:>5}/{s.sft_steps}  loss {loss.item():.3f}  "
                  f"已用 {time.perf_counter() - t0:.0f}s", flush=True)
    return model.eval(), tokenizer


def build_policy(s, device):
    """策略：--sft 给的 06 检查点 > runs/instruct/model.pt > SFT 热身。参考：策略的冻结副本。"""
    path = Path(s.sft) if s.sft else SFT_CHECKPOINT
    # --quick 和显式的 --init 都不用 06 的模型：冒烟测试要可复现，--init 说明用的人想自己热身
    if s.sft or (SFT_CHECKPOINT.is_file() and s.init == "auto" and not s.quick):
        print(f"策略的起点：{path}（06_finetune_instruct.py 训练的 SFT 模型）")
        policy, tokenizer, _ = load_instruct_model(path)
        policy = policy.to(device)
    else:
        policy, tokenizer = sft_warmup(s, device)
        # 存成 06 的格式（kind = instruct）：06 的 load_instruct_model、--interactive 都能直接用它
        sft_path = Path(s.out_dir) / "sft.pt"
        save_checkpoint(sft_path, {"kind": "instruct", "config": policy.cfg,
                                   "model": policy.state_dict(),
                                   "tokenizer": tokenizer_record(tokenizer), "step": s.sft_steps,
                                   "mask_instruction": True})
        print(f"  热身后的 SFT 模型存到 {sft_path}（下次可用 --sft {sft_path} 跳过热身）")
    reference = freeze(copy.deepcopy(policy))
    return policy, reference, tokenizer


def freeze(model):
    """参考模型：eval 模式（没有 dropout），所有参数不求梯度。"""
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


# ===== 5. 训练与度量：损失、奖励、奖励差、偏好准确率 =====
# 每一步：策略算 chosen、rejected 的对数概率（要梯度），参考模型算同样的两个数（不要梯度），
# 代进 dpo_loss。度量都来自隐式奖励 β·(log π − log π_ref)：
#   奖励差（margin）= chosen 奖励 − rejected 奖励，训练开始时正好是 0；
#   偏好准确率 = chosen 奖励更高的偏好对所占比例（书里只报奖励差，这个数更直观）。

@dataclass
class DPOState:
    policy: nn.Module
    reference: nn.Module
    optimizer: torch.optim.Optimizer
    tokenizer: tiktoken.Encoding
    data: dict                    # {"train": [(chosen, rejected, 提示词长度), ...], "val": …}
    device: torch.device
    step: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)


def pair_logprobs(model, batch, pad_id, device):
    """一批偏好对 → (chosen 的对数概率和, rejected 的对数概率和)，各是 (b,)。"""
    x, y = collate_pairs(batch, pad_id, CONTEXT)
    logp = sequence_logprobs(model, x.to(device), y.to(device))
    return logp[:len(batch)], logp[len(batch):]


@torch.no_grad()
def pair_metrics(policy, reference, examples, beta, pad_id, device, batch_size=32):
    """在一组偏好对上算平均损失、chosen/rejected 的平均奖励、奖励差和偏好准确率；
    ref_acc 是参考模型自己的偏好：log π_ref(c) > log π_ref(r) 的比例（第 6 节的基线）。"""
    policy.eval()  # 评估时关掉 dropout：同一对每次算出的奖励才一样
    sums = {"loss": 0.0, "chosen": 0.0, "rejected": 0.0, "acc": 0.0, "ref_acc": 0.0}
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        pc, pr = pair_logprobs(policy, batch, pad_id, device)
        rc, rr = pair_logprobs(reference, batch, pad_id, device)
        loss, c, r = dpo_loss(pc, pr, rc, rr, beta)
        sums["loss"] += loss.item() * len(batch)
        sums["chosen"] += c.sum().item()
        sums["rejected"] += r.sum().item()
        # 严格大于：训练开始时两个奖励都是 0，不算"认对了"——准确率从 0 起步，看得出是学来的
        sums["acc"] += (c > r).sum().item()
        sums["ref_acc"] += (rc > rr).sum().item()
    policy.train()
    out = {k: v / len(examples) for k, v in sums.items()}
    return {**out, "margin": out["chosen"] - out["rejected"]}


def train_dpo(state, s):
    """DPO 训练 s.epochs 轮；每 s.eval_every 步在训练集、验证集的前 200 对上打印度量；Ctrl-C 时先存再退出。"""
    examples, pad_id = state.data["train"], state.tokenizer.eot_token
    total = s.epochs * math.ceil(len(examples) / s.batch_size)
    # 打乱用独立的生成器：换不换 --sft、热身走了几步，都不影响 DPO 看到偏好对的顺序
    generator = torch.Generator().manual_seed(s.seed)
    state.policy.train()
    with StopFlag() as stop:
        for epoch in range(s.epochs):
            order = torch.randperm(len(examples), generator=generator).tolist()
            for start in range(0, len(order), s.batch_size):
                t0 = time.perf_counter()
                batch = [examples[i] for i in order[start:start + s.batch_size]]
                # 小学习率、短预热、线性降到 0：DPO 只该把 SFT 模型往偏好的方向推一点
                lr = s.lr * min(1.0, (state.step + 1) / s.warmup_steps) * (1 - state.step / total)
                for group in state.optimizer.param_groups:
                    group["lr"] = lr
                pc, pr = pair_logprobs(state.policy, batch, pad_id, state.device)
                with torch.no_grad():  # 参考模型冻结：只算数，不建计算图
                    rc, rr = pair_logprobs(state.reference, batch, pad_id, state.device)
                loss, c, r = dpo_loss(pc, pr, rc, rr, s.beta)
                if s.nll_weight:  # 第 3 节末尾：再加一项 chosen 的负对数似然（每个 token 平均）
                    # chosen 计入的 token 数 = 回答 + 结束符 = 全长 − 提示词 + 1
                    n_chosen = torch.tensor([len(ids) - n + 1 for ids, _, n in batch],
                                            device=pc.device)
                    loss = loss + s.nll_weight * (-pc / n_chosen).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(state.policy.parameters(), 1.0)
                state.optimizer.step()
                state.optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.train_seconds += time.perf_counter() - t0
                row = {"step": state.step, "epoch": epoch + 1, "lr": lr, "loss": loss.item(),
                       "margin": (c - r).mean().item()}
                if state.step % s.eval_every == 0 or state.step == total:
                    log_metrics(state, s, row, total)
                state.history.append(row)
                if stop.requested:
                    path = save_dpo(state, s)
                    print(f"收到 Ctrl-C：第 {state.step} 步的策略（连同参考模型）已存到 {path}")
                    sys.exit(130)
    return save_dpo(state, s)


def log_metrics(state, s, row, total):
    # 只看前 200 对：评估不拖慢训练；划分文件本来就打乱过，前 200 对就是随机样本
    for split in ("train", "val"):
        m = pair_metrics(state.policy, state.reference, state.data[split][:200], s.beta,
                         state.tokenizer.eot_token, state.device)
        row.update({f"{split}_{k}": v for k, v in m.items() if k != "ref_acc"})
    eta = state.train_seconds / state.step * (total - state.step)
    print(f"步 {state.step:>4}/{total}  损失 训练 {row['train_loss']:.3f} 验证 {row['val_loss']:.3f}  "
          f"验证奖励 chosen {row['val_chosen']:+.2f} rejected {row['val_rejected']:+.2f} "
          f"差 {row['val_margin']:.2f}  偏好准确率 训练 {row['train_acc']:.1%} 验证 {row['val_acc']:.1%}  "
          f"已用 {state.train_seconds:.0f}s 还要约 {eta:.0f}s", flush=True)


def save_dpo(state, s):
    """检查点里同时存策略和参考模型：隐式奖励要两者一起才能算，载入的人不必再去找 SFT 模型。"""
    path = Path(s.out_dir) / "model.pt"
    save_checkpoint(path, {"kind": "dpo", "config": state.policy.cfg,
                           "model": state.policy.state_dict(),
                           "reference": state.reference.state_dict(), "beta": s.beta,
                           "tokenizer": tokenizer_record(state.tokenizer), "step": state.step,
                           "history": state.history})
    return path


def load_policy(path):
    """本章写出的 model.pt → (policy, reference, tokenizer)；两个都是 eval 模式，参考模型已冻结。"""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "dpo" or "reference" not in ckpt:
        raise UserError(f"{path} 不是本章写出的 DPO 检查点；先运行 08_dpo.py 训练一个")
    policy = model_from_checkpoint(ckpt)
    reference = model_from_checkpoint({**ckpt, "model": ckpt["reference"]})
    policy.beta = ckpt.get("beta", 0.1)  # 隐式奖励要用训练时的 β：--evaluate 时从这里取
    return policy.eval(), freeze(reference), tokenizer_from_record(ckpt["tokenizer"])


# ===== 6. 训练前后：偏好准确率、完全匹配、"直接回答"的比例 =====
# 基线：随机猜 50%；参考模型（SFT 模型）自己的偏好——比较 log π_ref(c) 和 log π_ref(r)。
# 偏好准确率只说明策略"认得"哪个好；还要看它自己生成的回答：可验证任务的完全匹配不该变差，
# "直接回答"（长度不超过参考答案 + 4 个字：没有客套、推脱和废话）的比例应该更高或不变。

def preference_accuracy(policy, reference, tokenizer, items, beta=0.1):
    """items 是数据文件里那样的偏好对；返回 chosen 的隐式奖励高于 rejected 的比例。"""
    device = next(policy.parameters()).device
    style = policy.cfg.get("prompt_style", "alpaca")
    examples = [encode_pair(tokenizer, item, style) for item in items]
    return pair_metrics(policy, reference, examples, beta, tokenizer.eot_token, device)["acc"]


def accuracy_by_kind(policy, reference, tokenizer, items, beta):
    """按 kind 分组的 (条数, 策略的偏好准确率, 参考模型自己的偏好准确率, 奖励差)；"手写"单独一组。"""
    device = next(policy.parameters()).device
    style = policy.cfg.get("prompt_style", "alpaca")
    groups = {name: [] for name in [*KIND_NAMES.values(), "手写"]}  # 固定的顺序，空的组最后去掉
    for item in items:
        name = "手写" if item["task"] == "open" else KIND_NAMES.get(item["kind"], item["kind"])
        groups.setdefault(name, []).append(item)
    groups = {name: group for name, group in groups.items() if group}
    groups["合计"] = items
    table = {}
    for name, group in groups.items():
        examples = [encode_pair(tokenizer, item, style) for item in group]
        m = pair_metrics(policy, reference, examples, beta, tokenizer.eot_token, device)
        table[name] = (len(group), m["acc"], m["ref_acc"], m["margin"])
    return table


def print_accuracy_table(table, title):
    # 中文字符在终端里占两格：按显示宽度补空格，列才对得齐
    shown = lambda text: sum(1 + (ord(ch) > 0x2E80) for ch in text)
    pad = lambda text, width: " " * (width - shown(text)) + text
    left = lambda text, width: text + " " * (width - shown(text))
    print(f"\n{title}")
    print(pad("", 8) + "".join(pad(h, w) for h, w in (("条数", 6), ("随机猜", 10), ("参考模型自己", 14),
                                                        ("DPO 之后", 10), ("奖励差", 10))))
    for name, (n, acc, ref_acc, margin) in table.items():
        print(left(name, 8) + f"{n:>6}{0.5:>10.1%}{ref_acc:>14.1%}{acc:>10.1%}{margin:>10.2f}")


def is_direct(answer, chosen):
    # 粗而可验证的"直接"：客套、推脱、废话都会让回答变长；+4 个字给"。"和一两个字的出入留余地
    return len(answer.strip()) <= len(chosen.strip()) + 4


def task_effect(policy, reference, tokenizer, items, s, where="测试集"):
    """可验证任务的提示词：参考模型（DPO 之前）和策略（之后）各贪心生成一次，比完全匹配和直接回答的比例。"""
    items = [item for item in items if item["task"] != "open"][:s.eval_prompts]
    entries = [{**item, "output": item["chosen"]} for item in items]
    rows = {}
    if not entries:  # 自带的数据里总有；--data 给的文件可能全是开放式的
        print("\n（数据里没有可验证的题目，跳过完全匹配的对比）")
        return rows
    for name, model in (("DPO 之前（参考模型）", reference), ("DPO 之后（策略）", policy)):
        answers = respond(model, tokenizer, entries, s.max_new_tokens)
        exact = sum(normalize(a) == normalize(e["output"]) for a, e in zip(answers, entries))
        direct = sum(is_direct(a, e["output"]) for a, e in zip(answers, entries))
        rows[name] = (exact / len(entries), direct / len(entries), answers)
    print(f"\n{where}里 {len(entries)} 条可验证任务的提示词，两个模型各自贪心作答：")
    for name, (exact, direct, _) in rows.items():
        print(f"  {name:<14} 完全匹配 {exact:6.1%}   直接回答 {direct:6.1%}")
    return rows


def show_generations(policy, reference, tokenizer, items, s, n=4):
    """每种 kind 取一条可验证的提示词：DPO 前后的回答并排（贪心生成），旁边是 chosen 和 rejected。"""
    verifiable = [i for i in items if i["task"] != "open"]
    picks = [next(i for i in verifiable if i["kind"] == kind)
             for kind in KIND_NAMES if any(i["kind"] == kind for i in verifiable)][:n]
    before = respond(reference, tokenizer, picks, s.max_new_tokens)
    after = respond(policy, tokenizer, picks, s.max_new_tokens)
    print("\n几条测试提示词，DPO 前后的回答：")
    for item, b, a in zip(picks, before, after):
        print(f"  {item['instruction']} {item['input']}\n    之前「{b[:40]}」  之后「{a[:40]}」  "
              f"chosen「{item['chosen']}」  "
              f"rejected（{KIND_NAMES[item['kind']]}）「{item['rejected'][:30]}」")


# ===== 7. 主程序：策略与参考 → 看一条偏好对 → 训练 → 训练前后对比 =====
DEFAULTS = {"epochs": 2, "batch_size": 16, "lr": 3e-4, "beta": 0.1, "warmup_steps": 20,
            "eval_every": 100, "sft_steps": 1500, "sft_lr": 1e-3, "eval_prompts": 200,
            "max_new_tokens": 40, "seed": 123, "nll_weight": 0.2}
QUICK = {"model": "tiny", "epochs": 1, "limit": 200, "sft_steps": 60, "eval_every": 5,
         "eval_prompts": 20, "max_new_tokens": 12}


def make_settings(args):
    """默认值 < --quick 的取值 < 命令行显式给出的值。"""
    merged = dict(vars(args))
    for layer in (DEFAULTS, QUICK if args.quick else {},
                  {k: v for k, v in vars(args).items() if v is not None}):
        merged.update(layer)
    s = argparse.Namespace(**merged)
    if s.quick and s.init == "auto":
        s.init = "random"  # 冒烟测试要快、要可复现：不依赖有没有跑过 04、06
    s.model = s.model or "mini"
    return s


def run_dpo(s):
    t_start = time.perf_counter()
    device = resolve_device(s.device)
    splits = load_preference_splits(s)
    try:  # 数据没问题了才建输出目录：出错时不留下空目录
        Path(s.out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"无法创建 --out-dir {s.out_dir}（{type(err).__name__}）") from None
    policy, reference, tokenizer = build_policy(s, device)
    style = policy.cfg.get("prompt_style", "alpaca")
    data = {name: [encode_pair(tokenizer, item, style) for item in items]
            for name, items in splits.items()}
    print(f"\n偏好数据：训练 {len(data['train']):,} 对、验证 {len(data['val']):,}、测试 {len(data['test']):,}；"
          f"策略 {policy.cfg['n_layers']} 层、宽 {policy.cfg['emb_dim']}，参考模型是它的冻结副本")
    show_pair_mask(tokenizer, splits["train"][0], style)
    show_loss_by_hand(s.beta)
    # 不加权重衰减：DPO 只想把 SFT 模型往偏好的方向推一点，衰减会把所有权重一起往 0 拉，离参考更远
    optimizer = torch.optim.AdamW(policy.parameters(), lr=s.lr, weight_decay=0.0)
    state = DPOState(policy, reference, optimizer, tokenizer, data, device)
    start = pair_metrics(policy, reference, data["val"], s.beta, tokenizer.eot_token, device)
    print(f"\n开始 DPO（β={s.beta:g}，学习率 {s.lr:g}，{s.epochs} 轮）：策略 = 参考，验证奖励差 "
          f"{start['margin']:.2f}，损失 {start['loss']:.3f}（= log 2）")
    path = train_dpo(state, s)
    print(f"训练完成：{state.step} 步，{state.train_seconds:.0f} 秒；策略和参考模型存在 {path}")
    table = accuracy_by_kind(policy, reference, tokenizer, splits["test"], s.beta)
    print_accuracy_table(table, "测试集的偏好准确率（问法和坏回答的说法训练时都没见过）：")
    task_effect(policy, reference, tokenizer, splits["test"], s)
    show_generations(policy, reference, tokenizer, splits["test"], s)
    print(f"\n测试集偏好准确率 {table['合计'][1]:.1%}，奖励差 {table['合计'][3]:.2f}；"
          f"总用时 {time.perf_counter() - t_start:.0f} 秒。"
          f"换一份数据试试：python data/make_preferences.py --seed 7 --out x.json && "
          f"python 08_dpo.py --evaluate x.json")


def run(args):
    s = make_settings(args)
    check_args(s)
    if s.evaluate:
        return evaluate_file(s)
    return run_dpo(s)


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


# ===== 进阶：评估另一份偏好数据、命令行细节（第一次读可以跳过）=====
def evaluate_file(s):
    """--evaluate FILE：载入 out-dir 的 model.pt，在 FILE 上按 kind 打印偏好准确率，并比较 DPO 前后的回答。"""
    items = read_preferences(s.evaluate)
    policy, reference, tokenizer = load_policy(Path(s.out_dir) / "model.pt")
    device = resolve_device(s.device)
    policy, reference = policy.to(device), reference.to(device)
    table = accuracy_by_kind(policy, reference, tokenizer, items, policy.beta)
    print_accuracy_table(table, f"{s.evaluate} 的偏好准确率（{len(items):,} 对）：")
    if any(item["task"] != "open" for item in items):
        task_effect(policy, reference, tokenizer, items, s, where=s.evaluate)
    return table


def build_parser():
    p = ArgParser(description="DPO：用偏好数据（chosen / rejected）直接微调 06 的 SFT 模型（默认：data/preferences）")
    p.add_argument("--data", help="一个偏好数据 JSON 列表（instruction、input、chosen、rejected），按 85/5/10 切分")
    p.add_argument("--sft", help=f"策略的起点：06 写出的 model.pt（默认：有 {SFT_CHECKPOINT} 就用它，否则先做 SFT 热身）")
    p.add_argument("--init", default="auto",
                   help=f"SFT 热身的起点：auto=有 {PRETRAINED} 就用它，否则随机初始化（默认）；random；"
                        "一个 *.pt 检查点；gpt2 等 GPT-2 权重。给了它就做热身、不用 06 的模型")
    p.add_argument("--model", choices=["tiny", "mini"], help="随机初始化时的模型尺寸（默认 mini）")
    for flag, kind, text in (("--beta", float, "DPO 的 β：隐式奖励 = β·(log π − log π_ref)"),
                             ("--epochs", int, "DPO 训练轮数"), ("--batch-size", int, "每批几对"),
                             ("--lr", float, "DPO 的 AdamW 峰值学习率（预热后线性降到 0）"),
                             ("--warmup-steps", int, "DPO 学习率预热步数"),
                             ("--eval-every", int, "每多少步打印一次度量"),
                             ("--sft-steps", int, "没有 06 的模型时，SFT 热身训练几步"),
                             ("--sft-lr", float, "SFT 热身的峰值学习率"),
                             ("--eval-prompts", int, "训练前后各生成多少条回答来比完全匹配"),
                             ("--max-new-tokens", int, "每条回答最多生成几个 token"),
                             ("--nll-weight", float, "chosen 的负对数似然（每个 token 平均）加进损失的权重"),
                             ("--seed", int, "随机种子，CPU 上完全可复现")):
        key = flag[2:].replace("-", "_")
        quick = f"，--quick 时 {QUICK[key]}" if key in QUICK else ""
        p.add_argument(flag, type=kind, help=f"{text}（默认 {DEFAULTS[key]}{quick}）")
    p.add_argument("--limit", type=int, help="每个划分最多用前几对（--quick 时 200）")
    p.add_argument("--out-dir", default="runs/dpo", help="model.pt（策略 + 参考模型）和 sft.pt 的目录")
    p.add_argument("--evaluate", metavar="FILE", help="不训练：用 out-dir 的 model.pt 评估另一份偏好数据")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="计算设备，auto = cuda > mps > cpu")
    p.add_argument("--quick", action="store_true", help="冒烟测试：tiny 随机模型、每个划分 200 对、1 轮")
    return p


def check_args(s):
    """开工之前检查每个数值设置（负数、零、NaN、大得离谱）和文件。"""
    limits = {"beta": (1e-4, 100), "epochs": (1, 10_000), "batch_size": (1, 4096), "lr": (1e-8, 1),
              "warmup_steps": (1, 10**7), "eval_every": (1, 10**7), "sft_steps": (1, 10**7),
              "sft_lr": (1e-8, 1), "eval_prompts": (1, 10**6), "max_new_tokens": (1, CONTEXT - 8),
              "seed": (0, 2**32 - 1), "limit": (1, 10**9), "nll_weight": (0, 100)}
    for key, (low, high) in limits.items():
        if getattr(s, key) is not None:
            check_range(f"--{key.replace('_', '-')}", getattr(s, key), low, high)
    if Path(s.out_dir).exists() and not Path(s.out_dir).is_dir():
        raise UserError(f"--out-dir {s.out_dir} 已存在，但不是目录")
    for flag in ("data", "sft", "evaluate"):
        if getattr(s, flag) and not Path(getattr(s, flag)).is_file():
            raise UserError(f"找不到 --{flag} 的文件 {getattr(s, flag)}")


# ===== 附录：前几章的部件（逐字复制，读过前几章可以跳过）=====
# 放在文件末尾，是为了让本章从第 1 节就讲新东西；Python 在调用时才查找这些名字，
# 所以定义写在后面也没关系。

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


def batch_loss(model, x, y, device):
    """只在要学的位置（目标不是 -100）上算输出头和交叉熵。和 model(x) 全算一遍再用 ignore_index 跳过，
    损失完全相同；但输出头（宽 × 词表）是这个小模型最贵的一层，而只学回答时要学的位置不到一成。"""
    x, y = x.to(device), y.to(device)
    positions = torch.arange(x.shape[1], device=device)
    hidden = model.drop_emb(model.tok_emb(x) + model.pos_emb(positions))
    hidden = model.final_norm(model.trf_blocks(hidden))
    keep = y != IGNORE
    return F.cross_entropy(model.out_head(hidden[keep]).float(), y[keep])


def load_instruct_model(path):
    """本章写出的 model.pt → (model, tokenizer, config)；config["prompt_style"] 是训练时的模板。"""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "instruct":
        raise UserError(f"{path} 不是本章写出的指令微调检查点；先运行 06_finetune_instruct.py 训练一个")
    model = model_from_checkpoint(ckpt)
    return model.eval(), tokenizer_from_record(ckpt["tokenizer"]), model.cfg


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
