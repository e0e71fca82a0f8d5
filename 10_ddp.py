"""10_ddp.py — 数据并行：用多个进程、多台机器训练 GPT（DDP 与 FSDP）

本章你会学到：
- 数据并行的想法：每个进程一份模型副本、看不同的数据分片，反向传播时用 all-reduce 把梯度取平均
- 进程组：world size、rank、local rank；gloo（CPU）与 NCCL（GPU）；torchrun 怎样把进程连起来
- DistributedSampler + set_epoch 分片、DDP 包装、no_sync 梯度累积、只在 rank 0 打印和存盘
- FSDP2（fully_shard）：参数、梯度、优化器状态都切成片，每个进程只存 1/N；存盘时拼回完整的一份
- 怎样证明没写错：同样的全局批次与种子，N 个进程与 1 个进程训练出同样的权重（测试逐个核对）
运行：torchrun --standalone --nproc_per_node=2 10_ddp.py           # 主要用法：本机 2 个进程，2 核 CPU 约 3 分钟
      torchrun --standalone --nproc_per_node=2 10_ddp.py --quick   # 冒烟：2 核 CPU 约 12 秒
      python 10_ddp.py                # 单进程（world size 1）；python 10_ddp.py --spawn 2：没有 torchrun 时
      两台机器、--strategy fsdp、一个进程出错时会怎样：见 README 与文末进阶
"""
import argparse
import base64
import contextlib
import copy
import hashlib
import http.client
import json
import math
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset, DistributedSampler

# 本章用到的 UserError、GPTModel、load_corpus、make_optimizer、count_baselines 等来自 01–04，见文末附录。


# ===== 1. 数据并行：每个进程一份副本，梯度取平均 =====
# 一个进程一步只能算 B 条序列。数据并行起 N 个进程，每个进程都有一份完整的模型副本，各自算 B/N 条，
# 反向传播后把 N 份梯度"all-reduce"成平均值——每个进程都拿到同一个平均梯度，做同样的一步更新，
# 于是 N 份副本始终一模一样。数学上，这一步与一个进程算完整的 B 条完全相同（梯度是样本的平均），
# 本章的测试就检查这一点：N 个进程训练出的权重与 1 个进程的相差不到 1e-5。
# 三个数字描述一个进程在哪里：
#   world_size：进程总数 = 机器数 × 每台机器的进程数
#   rank：全局编号 0..world_size-1；rank 0 负责打印、存盘
#   local_rank：本机上的编号，用来挑本机的第几块 GPU
# 进程之间的通信由"后端"完成：GPU 上用 NVIDIA 的 NCCL（走 NVLink/InfiniBand，快），
# CPU 上用 gloo（走 TCP）。本章在 CPU 上也能跑：笔记本上两个进程，就是两个"小集群节点"。
# 有效批次：--batch-size 是全局批次（所有进程合计），每个进程每步算 batch_size / world_size 条。

@dataclass
class Dist:
    """本进程在进程组里的位置，以及它用的设备和通信后端。"""
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def main(self):
        return self.rank == 0

    def log(self, *parts):
        # 只有 rank 0 打印：N 个进程各打一遍，屏幕上每行都会重复 N 次
        if self.main:
            print(*parts, flush=True)


def choose_device(requested, local_rank, local_world_size):
    """(设备, 后端)。NCCL 要求每个进程独占一块 GPU；没有 GPU 或要求 CPU 时，用 gloo 在 CPU 上跑。"""
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_world_size > count:
            raise UserError(f"这台机器要起 {local_world_size} 个进程，却只有 {count} 块 GPU（NCCL 要求"
                            f"每个进程一块）：把 --nproc_per_node 改成不超过 {count}，或加 --device cpu")
        # Windows 版 torch 没有 NCCL：退回 gloo，它也能在 CUDA 张量上做 all-reduce，只是慢一些
        return torch.device("cuda", local_rank), "nccl" if dist.is_nccl_available() else "gloo"
    if requested == "cuda":
        raise UserError("要求 --device cuda，但本机 torch 看不到 NVIDIA GPU；请改用 --device cpu")
    return torch.device("cpu"), "gloo"


def init_distributed(args, place):
    """加入进程组。place 是 (rank, local_rank, world_size, local_world_size, 地址)：
    torchrun 下地址是 "env://"——各进程连到 torchrun 代理开好的登记处（TCPStore），在那里互相认识；
    python / --spawn 启动时是 "tcp://127.0.0.1:端口"，rank 0 自己开登记处。"""
    rank, local_rank, world_size, local_world_size, address = place
    device, backend = choose_device(args.device, local_rank, local_world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # 同一台机器上的进程分摊 CPU 核：每个进程都开满线程，反而互相抢核（torchrun 默认每进程 1 个线程）
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
    # timeout：某个集体通信等超过这么久，就报错退出，而不是永远卡住
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=args.timeout))
    return Dist(rank, local_rank, world_size, local_world_size, device, backend)


# ===== 2. 热身：all-reduce，以及 DDP 怎样用它 =====

def allreduce_demo(d):
    """先看 all-reduce 本身，再看 DDP：每个进程只看全局批次里自己的 2 个样本，反向传播之后，
    每个进程上的梯度都等于"一个进程看全部样本"的梯度。"""
    n = d.world_size
    value = torch.tensor([float(d.rank + 1)], device=d.device)
    dist.all_reduce(value)  # 默认求和，结果留在每个进程上
    d.log(f"all-reduce：{n} 个进程各拿出 1..{n}，求和后每个进程都得到 {value.item():g}")
    torch.manual_seed(0)  # 同样的种子：每个进程的初值一样（DDP 构造时还会从 rank 0 广播一次）
    toy = nn.Linear(3, 1).to(d.device)
    gen = torch.Generator().manual_seed(1)
    x, y = (torch.randn(2 * n, k, generator=gen).to(d.device) for k in (3, 1))  # 全局批次
    whole, local = copy.deepcopy(toy), copy.deepcopy(toy)
    F.mse_loss(whole(x), y).backward()  # 参照：一个进程在整批上算的梯度
    mine = slice(2 * d.rank, 2 * d.rank + 2)
    F.mse_loss(local(x[mine]), y[mine]).backward()  # 只看自己 2 个样本、不通信的梯度
    model = DDP(toy, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    F.mse_loss(model(x[mine]), y[mine]).backward()  # 同样 2 个样本；backward 里 DDP 把梯度取平均
    report = torch.stack([local.weight.grad[0, 0], toy.weight.grad[0, 0],
                          (toy.weight.grad - whole.weight.grad).abs().max()])
    reports = [torch.zeros_like(report) for _ in range(n)]
    dist.all_gather(reports, report)  # 把每个进程的三个数收集到一起，由 rank 0 打印
    d.log(f"DDP：各进程只看自己的 2 个样本，本地梯度的第一个分量 "
          f"{[round(r[0].item(), 4) for r in reports]}，反向传播后每个进程都是 {reports[0][1]:.4f}"
          f"（整批 {2 * n} 个样本的梯度，最大差 {max(r[2].item() for r in reports):.1e}）")


# ===== 3. 数据分片：DistributedSampler 与 set_epoch =====
# 每个进程必须看不同的数据，否则 N 份梯度一模一样，平均了也白平均。DistributedSampler 每一轮（epoch）
# 用"种子 + 轮次"把全部窗口洗一次牌——每个进程洗出的顺序相同——然后 rank r 取第 r、r+N、r+2N… 个。
# 忘了 set_epoch，每一轮的顺序都与第一轮一样。

class TokenWindows(Dataset):
    """把 token 序列切成互不重叠的窗口，每个 context_length+1 个 token：前 n 个是输入，后 n 个是目标。"""

    def __init__(self, tokens, context_length):
        self.tokens, self.n = tokens, context_length

    def __len__(self):
        return (len(self.tokens) - 1) // self.n

    def __getitem__(self, i):
        # 互不重叠：一轮里每个 token 只被当作目标一次；相邻窗口共用一个边界 token（上一个的目标、这一个的输入）
        return torch.from_numpy(self.tokens[i * self.n:i * self.n + self.n + 1].astype(np.int64))


class Shard:
    """本进程每一步该算哪些窗口。rank r 在一轮里取洗好的第 r、r+N… 个，每步取其中连续 B/N 个：
    于是第 k 步 N 个进程分到的窗口合起来，正好是单进程第 k 步的那 B 个（测试核对过）。"""

    def __init__(self, windows, d, batch_size, grad_accum, seed):
        self.windows = windows
        # drop_last：窗口数除不尽 N 时丢掉尾巴，而不是像默认那样重复几个凑整
        self.sampler = DistributedSampler(windows, num_replicas=d.world_size, rank=d.rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self.per_rank = batch_size // d.world_size  # 每个进程每步的序列数（check_args 保证整除）
        self.micro = self.per_rank // grad_accum
        # 每轮的步数按全局批次算，与进程数无关：换个进程数续训，第 k 步仍落在同一轮的同一位置
        self.steps_per_epoch = len(windows) // batch_size
        self.epoch, self.order = None, []

    def micro_batches(self, step):
        """第 step 步（从 0 数）本进程的 grad_accum 个小批次，每个是一串窗口编号。"""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.sampler.set_epoch(epoch)  # 新的一轮换一种洗法；续训时跳到哪一轮都能算出来
            self.epoch, self.order = epoch, list(self.sampler)
        mine = self.order[k * self.per_rank:(k + 1) * self.per_rank]
        return [mine[i:i + self.micro] for i in range(0, self.per_rank, self.micro)]

    def fetch(self, indices, device):
        # 从 memmap 只读这几个窗口；窗口是 (n+1) 个 token，切成输入（前 n 个）与目标（后 n 个）
        batch = torch.stack([self.windows[i] for i in indices]).to(device)
        return batch[:, :-1], batch[:, 1:]


def load_corpus_in_turns(d, data, enc, context_length):
    """第一次运行要切词建缓存：同时建会互相覆盖临时文件，所以轮流来——先 rank 0，再各机器的
    local rank 0（机器之间不共享磁盘时各建一份），最后其余进程直接复用缓存。"""
    result, error = None, None
    for turn in (d.main, d.local_rank == 0 and not d.main, d.local_rank != 0):
        if turn:
            try:
                result = load_corpus(data, enc, context_length)
            except UserError as err:  # 先别抛：别的进程还在 barrier 等着，抛了它们就得等到超时
                error = err
        dist.barrier()
    failed = torch.tensor([float(error is not None)], device=d.device)
    dist.all_reduce(failed)  # 有一个进程读不到语料，所有进程一起停
    if error is not None:
        raise error
    if failed.item():
        raise UserError(f"有 {failed.item():g} 个进程读不到语料 {data}（见 rank 0 以外的报错）")
    return result


# ===== 4. 包装模型：DDP 或 FSDP =====
# DDP：每个进程存完整的参数、梯度和优化器状态；backward 时按"桶"把梯度 all-reduce，边算边传。
# FSDP（完全分片数据并行）：参数、梯度、AdamW 的两份矩都切成 N 片，每个进程只存自己那 1/N；
# 算某一层之前临时 all-gather 出完整的参数，用完即丢；梯度用 reduce-scatter 求平均并只留自己那片。
# 通信多了一些，但每个进程的显存约降到 1/N：单卡放不下的模型，靠它才训练得了。

def wrap_model(model, d, strategy):
    if strategy == "ddp":
        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    # FSDP2：先分片每个 Transformer 块（一块一块地 all-gather，峰值内存只多一块），再分片其余部分
    for block in model.trf_blocks:
        fully_shard(block)
    return fully_shard(model)  # 原地改造：还是同一个 GPTModel，参数变成了 DTensor（分布式张量）


# 优化器分组要按 tok_emb、out_head 这些名字找参数：DDP 包装后它们在 .module 里
def unwrap(model):
    """DDP 把模型包在 .module 里；FSDP 原地改造，模型还是它自己。"""
    return model.module if isinstance(model, DDP) else model


def gradient_sync(model, enabled):
    """梯度累积时，前几个小批次不必通信：梯度先在本地累加，最后一个小批次的 backward 才同步一次。"""
    if isinstance(model, DDP):
        return contextlib.nullcontext() if enabled else model.no_sync()
    model.set_requires_gradient_sync(enabled)  # FSDP2 里同样作用的开关
    return contextlib.nullcontext()


def state_bytes(model, optimizer):
    """(本进程实际持有的, 完整的一份) 模型状态字节数：参数 + 同样大小的梯度 + AdamW 的状态。
    FSDP 的参数是 DTensor：numel() 是完整张量的大小，to_local() 才是本进程那一片。"""
    local = full = 0
    params = list(model.parameters())
    states = [v for st in optimizer.state.values() for v in st.values() if v.dim() > 0]
    for tensor, copies in [(p, 2) for p in params] + [(v, 1) for v in states]:
        part = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        local += copies * part.numel() * tensor.element_size()
        full += copies * tensor.numel() * tensor.element_size()
    return local, full


# ===== 5. 训练一步 =====

@dataclass
class Run:
    model: nn.Module              # DDP 或 FSDP 包装过的模型
    optimizer: torch.optim.Optimizer
    shard: Shard
    val: TokenWindows
    d: Dist
    tokenizer: tiktoken.Encoding
    config: dict
    step: int = 0
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    timed_steps: int = 0

    def autocast(self):
        return torch.autocast(self.d.device.type, dtype=torch.bfloat16,
                              enabled=self.config["dtype"] == "bf16")


def ddp_train_step(run, s):
    """一次参数更新，返回本进程的平均损失。与 04 的 train_step 只差两处：数据来自本进程的分片，
    前几个小批次不同步梯度。梯度的平均由 DDP/FSDP 在 backward 里完成，这里看不到任何通信。"""
    lr = lr_at(run.step + 1, s.lr, s.warmup_steps, s.max_steps, s.lr * s.min_lr_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    # 每个进程只取自己那一份；合起来就是单进程这一步的全局批次
    micro_batches = run.shard.micro_batches(run.step)
    total = 0.0
    for i, indices in enumerate(micro_batches):
        with gradient_sync(run.model, i == len(micro_batches) - 1):
            x, y = run.shard.fetch(indices, run.d.device)
            with run.autocast():
                # 除以小批次数：累加起来正好是本进程这一份的平均；DDP 再在进程之间取平均
                loss = calc_loss_batch(run.model, x, y) / len(micro_batches)
            loss.backward()
        total += loss.item()
    # 所有进程的梯度此时已一样：裁剪的结果也一样。FSDP 下每片只是一部分，clip_grad_norm_ 会跨进程求总范数
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), s.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return total, lr


@torch.no_grad()
def evaluate_sharded(run, count):
    """验证集的前 count 个窗口分给各进程（每个进程一样多：FSDP 的每次前向都要所有进程一起参与），
    各算自己那份的损失总和，再 all-reduce 求和：N 个进程评估也快 N 倍。"""
    d = run.d
    run.model.eval()
    total = torch.zeros(2, device=d.device)  # [损失之和, token 数]
    mine = list(range(d.rank, count, d.world_size))
    for start in range(0, len(mine), 64):
        batch = torch.stack([run.val[i] for i in mine[start:start + 64]]).to(d.device)
        with run.autocast():
            logits = run.model(batch[:, :-1]).flatten(0, 1).float()
        total += torch.stack([F.cross_entropy(logits, batch[:, 1:].flatten(), reduction="sum"),
                              torch.tensor(float(batch[:, 1:].numel()), device=d.device)])
    dist.all_reduce(total)
    run.model.train()
    return (total[0] / total[1]).item()


# ===== 6. 训练循环：同一步停下，只有 rank 0 存盘 =====

def train_loop(run, s, eval_count, baselines):
    """主循环。每步末尾一次很小的 all-reduce：算各进程损失的平均（日志用），同时商量"要不要停"——
    Ctrl-C 到达各进程的时刻不同，若各自决定，有人多走一步，就会在 all-reduce 里等一个永远不来的同伴。"""
    d, t_start, reason = run.d, time.perf_counter(), "done"
    tokens_per_step = s.batch_size * run.config["context_length"]
    with StopSignals() as stop:
        while run.step < s.max_steps and reason == "done":
            t0 = time.perf_counter()
            loss, lr = ddp_train_step(run, s)
            if s.fail_rank == d.rank and run.step == 3:
                raise RankFailure(f"演示（--fail-rank {d.rank}）：本进程在第 3 步故意出错")
            # 两个数一次通信：损失求和（除以进程数得平均）、"要停"的票数（有一票就都停）
            flags = torch.tensor([loss, float(stop.requested)], device=d.device)
            dist.all_reduce(flags)
            sync(d.device)
            run.train_seconds += time.perf_counter() - t0
            run.timed_steps += 1
            row = {"step": run.step, "lr": lr, "train_loss": flags[0].item() / d.world_size}
            run.history.append(row)
            last = run.step == s.max_steps
            if run.step % s.log_every == 0 or last:
                per_step = run.train_seconds / run.timed_steps
                d.log(f"步 {run.step:>5}/{s.max_steps}  loss {row['train_loss']:.3f}  lr {lr:.2e}  "
                      f"{tokens_per_step / per_step:,.0f} tok/s（{d.world_size} 个进程合计）  "
                      f"已用 {time.perf_counter() - t_start:.0f}s  "
                      f"剩余约 {(s.max_steps - run.step) * per_step:.0f}s")
            if run.step % s.eval_every == 0 or last:
                row["val_loss"] = evaluate_sharded(run, eval_count)
                d.log(f"  评估：验证 {row['val_loss']:.3f}｜基线 bigram {baselines['bigram']:.3f}、"
                      f"unigram {baselines['unigram']:.3f}｜验证 − bigram = "
                      f"{row['val_loss'] - baselines['bigram']:+.3f}")
            if flags[1].item() > 0 or run.step == s.stop_at:
                reason = "interrupted" if flags[1].item() > 0 else "stop_at"
            # 存盘是集体操作：每个进程在同一步走到这里（评估步相同，停下的步也已商量好）
            if "val_loss" in row or reason != "done":
                save_run(run, s)
    return reason


def save_run(run, s):
    """get_state_dict 把模型和优化器拼回完整的一份（FSDP 要从各进程收集分片），只交到 rank 0 手里：
    所有进程都必须调用它（这是一次集体通信），但只有 rank 0 写文件。存的是普通 GPTModel 的
    state_dict：04–09 都能用 --init 载入它，不需要任何分布式的东西。"""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(run.model, run.optimizer, options=options)
    if run.d.main:
        settings = {k: v for k, v in vars(s).items() if isinstance(v, (int, float, str, bool))}
        save_checkpoint(Path(s.out_dir) / "ckpt.pt", {
            "config": run.config, "model": model_state, "optimizer": optim_state,
            "tokenizer": tokenizer_record(run.tokenizer), "step": run.step,
            "history": run.history, "settings": settings, "world_size": run.d.world_size})
    dist.barrier()  # 其他进程等 rank 0 写完：之后谁去读，读到的都是完整的检查点


def restore_run(run, ckpt):
    """续训：每个进程都读同一个完整的检查点，set_state_dict 按本进程的包装方式（DDP 的完整副本，
    或 FSDP 的那一片）装进去。进程数可以与上次不同：全局批次不变，第 k 步看的数据就不变。"""
    try:
        set_state_dict(run.model, run.optimizer, model_state_dict=ckpt["model"],
                       optim_state_dict=ckpt["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise UserError(f"检查点与模型或优化器不匹配（{type(err).__name__}）") from None
    run.step, run.history = ckpt["step"], [dict(row) for row in ckpt["history"]]
    run.d.log(f"从第 {run.step} 步继续（上次 {ckpt['world_size']} 个进程，这次 {run.d.world_size} 个）")


# ===== 7. 吞吐与扩展效率 =====

def time_alone(model, shard, s, d, steps):
    """扩展效率的分母：rank 0 单独训练一份副本几步（同样的每进程小批次、同样的线程数、不通信），
    其他进程在 barrier 等着。返回这个"单独一个进程"的 token/s（只在 rank 0 上有意义）。"""
    rate = 0.0
    if d.main:  # 只让 rank 0 测：几个进程同时测，测到的就是互相抢 CPU 时的速度了
        trial = copy.deepcopy(model)
        optimizer = make_optimizer(trial, s.lr, s.weight_decay, "foreach", s.embed_lr_mult)
        x, y = shard.fetch(shard.micro_batches(0)[0], d.device)
        times = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            calc_loss_batch(trial, x, y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(d.device)
            times.append(time.perf_counter() - t0)
        # 第一步含内存分配等一次性开销，不算；其余取中位数，不怕偶尔一步被别的进程打断
        rate = x.numel() / sorted(times[1:])[len(times[1:]) // 2]
    dist.barrier()
    return rate


def report_throughput(run, s, alone):
    """每个进程、合计的 token/s，扩展效率 = 合计 ÷ (N × 单独一个进程)，以及每个进程的模型状态内存。"""
    d = run.d
    tokens = run.timed_steps * s.batch_size // d.world_size * run.config["context_length"]
    rates = [None] * d.world_size
    # all_gather_object 能收集任意 Python 对象（先序列化）：适合这种一次性的小数字，不适合大张量
    dist.all_gather_object(rates, tokens / max(run.train_seconds, 1e-9))
    local, full = state_bytes(run.model, run.optimizer)
    held = [None] * d.world_size
    dist.all_gather_object(held, local)
    if not d.main:  # 上面两次收集每个进程都要参加；下面只是 rank 0 的打印
        return
    total = sum(rates)
    scaling = (f"→ 扩展效率 {total / (d.world_size * alone):.0%}（{d.world_size} 个进程）"
               if d.world_size > 1 else "（只有 1 个进程：用 torchrun 起 N 个再比）")
    print(f"吞吐：每个进程 {'、'.join(f'{r:,.0f}' for r in rates)} token/s，合计 {total:,.0f} "
          f"token/s；单独一个进程（同样的每进程批次与线程数、不通信）{alone:,.0f} token/s {scaling}")
    mb = [f"{h / 2**20:.2f}" for h in held]
    other = (f"DDP 下每个进程都要存完整的 {full / 2**20:.2f} MB" if s.strategy == "fsdp" else
             f"换 --strategy fsdp，每个进程约存 {full / d.world_size / 2**20:.2f} MB"
             if d.world_size > 1 else "FSDP 在 N 个进程上时，每个进程约存其中的 1/N")
    d.log(f"内存（参数 + 梯度 + AdamW 状态）：{s.strategy.upper()} 每个进程 {'、'.join(mb)} MB；{other}")
    if d.device.type == "cuda":
        d.log(f"rank 0 显存峰值 {torch.cuda.max_memory_allocated(d.device) / 2**20:.0f} MB")


def continue_text(model, enc, prompt, seed, max_new_tokens=60):
    """训练完，rank 0 用存下的完整权重建一个普通的 GPTModel 续写一段，看看学到了什么。"""
    ids = torch.tensor([enc.encode(prompt) or [enc.eot_token]])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = generate(lambda idx: model(idx)[..., :enc.n_vocab], ids, max_new_tokens,
                       model.cfg["context_length"], temperature=0.8, top_k=40,
                       eos_id=enc.eot_token, repetition_penalty=1.3)
    return enc.decode(out[0, ids.shape[1]:].tolist()).replace("\n", " ")


# ===== 8. 主程序：每个进程都从 worker 开始 =====
DEFAULTS = {"model": "mini", "strategy": "ddp", "batch_size": 32, "grad_accum": 1,
            "max_steps": 1200, "lr": 1e-3, "embed_lr_mult": 10.0, "min_lr_ratio": 0.1,
            "warmup_steps": 30, "weight_decay": 0.1, "grad_clip": 1.0, "eval_every": 400,
            "log_every": 100, "seed": 123, "timeout": 600.0, "prompt": "从前有一个"}
QUICK = {"model": "tiny", "max_steps": 30, "batch_size": 8, "warmup_steps": 5,
         "eval_every": 15, "log_every": 10}
# 续训时沿用检查点的这些设置（总步数、日志间隔等可以改）：全局批次、学习率计划都得与上次相同
RESUME_KEYS = ("model", "batch_size", "grad_accum", "lr", "embed_lr_mult", "min_lr_ratio",
           "warmup_steps", "weight_decay", "grad_clip", "seed", "max_steps", "dtype")
ADAM_EPS = 1e-5
EVAL_WINDOWS = 480  # 验证用的窗口数：能被 1–6、8、10、12 整除，常见的进程数下每个进程一样多


def build_replica(s, enc, d):
    """每个进程用同一个种子建模型：初值一样（FSDP 不会替你广播，必须靠同一个种子）。"""
    cfg = dict(model_config(s.model), vocab_size=enc.n_vocab)
    torch.manual_seed(s.seed)
    model = GPTModel(cfg).to(d.device)
    cfg["dtype"] = s.dtype if s.dtype != "auto" else (
        "bf16" if d.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
    return model, cfg


def train_ddp(s, d, ckpt):
    """一个进程的全部工作：热身 → 数据与分片 → 基线 → 包装模型 → 训练 → 吞吐与样本。
    每个进程都执行这同一个函数；谁打印、谁写文件，只看 d.main。"""
    d.log(f"进程组：{d.world_size} 个进程（每台机器 {d.local_world_size} 个），后端 {d.backend}，"
          f"设备 {d.device.type}，每个进程 {torch.get_num_threads()} 个线程；策略 {s.strategy}")
    allreduce_demo(d)
    enc = load_project_tokenizer()
    model, cfg = build_replica(s, enc, d)
    train_tokens, val_tokens = load_corpus_in_turns(d, s.data, enc, cfg["context_length"])
    windows, val = (TokenWindows(t, cfg["context_length"]) for t in (train_tokens, val_tokens))
    # 每个进程都建一个 Shard：洗牌的种子相同，所以不必通信就知道自己该取哪些窗口
    shard = Shard(windows, d, s.batch_size, s.grad_accum, s.seed)
    if shard.steps_per_epoch < 1:
        raise UserError(f"训练集只有 {len(windows)} 个窗口，凑不出一个 --batch-size {s.batch_size}")
    eval_count = min(EVAL_WINDOWS, len(val)) // d.world_size * d.world_size
    if eval_count == 0:
        raise UserError(f"验证集只有 {len(val)} 个窗口，不够分给 {d.world_size} 个进程")
    # 基线只在 rank 0 上数（只有它打印）；数的是与评估完全相同的那一段验证集，两个数才可比
    baselines = count_baselines(train_tokens, val_tokens[:eval_count * cfg["context_length"] + 1],
                                enc.n_vocab) if d.main else {}
    d.log(f"模型 {s.model}：{cfg['n_layers']} 层，宽 {cfg['emb_dim']}，参数 "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M，精度 {cfg['dtype']}；训练 "
          f"{len(windows):,} 个窗口（每轮 {shard.steps_per_epoch} 步），验证 {eval_count} 个窗口；"
          f"全局批次 {s.batch_size} = {d.world_size} 个进程 × {shard.per_rank}"
          + (f"（每个进程累积 {s.grad_accum} 个小批次）" if s.grad_accum > 1 else ""))
    # 包装之前测"单独一个进程"的速度：此时模型还是普通的 GPTModel，复制一份训练几步不涉及任何通信
    alone = time_alone(model, shard, s, d, steps=8 if s.quick else 20)
    model = wrap_model(model, d, s.strategy)
    # 优化器在包装之后建：FSDP 把参数换成了分片的 DTensor，优化器要拿到的是它们
    optimizer = make_optimizer(unwrap(model), s.lr, s.weight_decay, "foreach", s.embed_lr_mult)
    # Adam 的 eps 从 1e-8 提到 1e-5：某个梯度分量接近 0 时（比如只出现一次的词，上游梯度正负抵消），
    # g/(√v+eps) 会把求和顺序不同带来的 1e-10 级舍入差放大成 1e-4 级的权重差，1 个进程与 N 个进程
    # 就对不上了（实测 30 步后差 3.9e-4）；1e-5 时差约 5e-6，而 600 步后的验证损失几乎不变（4.595 对 4.592）
    for group in optimizer.param_groups:
        group["eps"] = ADAM_EPS
    run = Run(model, optimizer, shard, val, d, enc, cfg)
    if ckpt is not None:
        restore_run(run, ckpt)
    if d.main:
        Path(s.out_dir).mkdir(parents=True, exist_ok=True)
        if run.step == 0:
            d.log(f"计数基线（同一段验证集）：unigram {baselines['unigram']:.3f}，bigram "
                  f"{baselines['bigram']:.3f} nats/token；随机猜 ln({enc.n_vocab}) = "
                  f"{math.log(enc.n_vocab):.3f}")
    else:
        baselines = {"unigram": math.nan, "bigram": math.nan}
    reason = train_loop(run, s, eval_count, baselines)
    if reason != "done":  # Ctrl-C 或 --stop-at：检查点已在 train_loop 里存好
        d.log(f"检查点已保存到 {Path(s.out_dir) / 'ckpt.pt'}（第 {run.step} 步）；"
              f"加 --resume 接着训练（进程数可以不同）")
        return 130 if reason == "interrupted" else 0
    report_throughput(run, s, alone)
    if d.main:  # 从刚存的文件重建一个普通模型：顺便证明检查点是完整的、不依赖分布式环境
        final = GPTModel(cfg)
        final.load_state_dict(load_checkpoint(Path(s.out_dir) / "ckpt.pt")["model"])
        print(f"检查点：{Path(s.out_dir) / 'ckpt.pt'}（普通 GPTModel 的权重，04–09 可用 --init 载入）")
        print(f"样本：{shorten(s.prompt)}{continue_text(final.eval(), enc, s.prompt, s.seed)}")
    return 0


def worker(args, place):
    """每个进程的入口：加入进程组 → 训练 → 无论怎样结束都退出进程组。"""
    d, code = None, 0
    if place[0] != 0:  # 只有 rank 0 往屏幕上打印：其余进程的普通输出丢掉，报错（stderr）照常显示
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
    try:
        d = init_distributed(args, place)
        code = train_ddp(args, d, read_resume(args))
    except UserError as err:
        # 参数、文件的错每个进程都会遇到：只让 rank 0（多机时每台机器的第一个进程）说一遍
        if place[1] == 0:
            print(f"错误：{err}", file=sys.stderr)
        code = 2
    except RankFailure as err:
        print(f"[rank {place[0]}] 出错：{err}；其余进程会随之停止", file=sys.stderr, flush=True)
        code = 1
    except (dist.DistError, RuntimeError) as err:
        if d is None or not peer_lost(err):
            raise
        # 同伴进程退出后，正在等它的集体通信立刻报错（gloo 发现连接断了），而不是永远卡住
        print(f"[rank {place[0]}] 另一个进程已退出，通信中断（原因见它的报错）：本进程也停止",
              file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        code = 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


def launch(args):
    """三种启动方式殊途同归：每个进程都知道自己的 (rank, local_rank, world_size, ...)，再调用 worker。"""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun 替每个进程设好了这些环境变量
        env = {key: env_int(key) for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                               "LOCAL_WORLD_SIZE")}
        return worker(args, (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"],
                             env["LOCAL_WORLD_SIZE"], "env://"))
    if sys.platform == "win32":  # Windows 版 torch 没有 libuv：不关掉它，建登记处时会报错
        os.environ.setdefault("USE_LIBUV", "0")
    # 只在本机：所有进程都在这台机器上，rank 0 在这个地址开登记处，其余进程连过来
    address = f"tcp://127.0.0.1:{pick_port(args.master_port)}"
    if not args.spawn:  # python 10_ddp.py：只有一个进程的"进程组"，代码路径与多进程完全相同
        return worker(args, (0, 0, 1, 1, address))
    # mp.spawn：在本机起 N 个子进程，第 i 个调用 spawn_entry(i, ...)；任何一个出错，其余的都会被终止
    context = mp.spawn(spawn_entry, args=(args, address), nprocs=args.spawn, join=False)
    # Ctrl-C 同时到达父进程和子进程：父进程不理它，让子进程做完这一步、存好检查点再退出
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as err:
        return err.exit_code if err.exit_code and err.exit_code > 0 else 1
    except mp.ProcessRaisedException:
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


def spawn_entry(index, args, address):
    code = worker(args, (index, index, args.spawn, args.spawn, address))
    if code:
        sys.exit(code)


def build_parser():
    p = ArgParser(description="数据并行预训练 GPT：torchrun / python / --spawn 启动，DDP 或 FSDP")
    p.add_argument("--strategy", choices=["ddp", "fsdp"],
                   help="ddp：每个进程一份完整副本（默认）；fsdp：参数、梯度、优化器状态分片")
    p.add_argument("--model", choices=list(MODEL_SIZES),
                   help="模型尺寸（默认 mini，--quick 时 tiny；GPT-2 的尺寸需要 GPU）")
    p.add_argument("--data", default=str(DATA_DIR / "corpus"),
                   help="语料：.txt/.jsonl 文件、含它们的目录或 gutenberg:编号（默认 data/corpus）")
    for flag, kind, text in RUN_FLAGS:
        key = flag[2:].replace("-", "_")
        quick = f"，--quick 时 {QUICK[key]}" if key in QUICK else ""
        p.add_argument(flag, type=kind, help=f"{text}（默认 {DEFAULTS[key]}{quick}）")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"],
                   help="auto（默认）：支持 bf16 的 GPU 上用 bf16 自动混合精度，CPU 上 fp32")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto：有 GPU 用 cuda（NCCL），否则 cpu（gloo）")
    p.add_argument("--spawn", type=int, help="不用 torchrun：用 mp.spawn 在本机起 N 个进程")
    p.add_argument("--master-port", type=int,
                   help="python / --spawn 启动时 rank 0 监听的端口（默认让系统挑一个空闲的）")
    p.add_argument("--out-dir", default="runs/ddp", help="检查点目录（只有 rank 0 写）")
    p.add_argument("--resume", action="store_true", help="从 out-dir/ckpt.pt 接着训练（进程数可以不同）")
    p.add_argument("--stop-at", type=int, help="训练到第 N 步就存检查点并退出（模拟中断）")
    p.add_argument("--fail-rank", type=int,
                   help="演示：第 R 号进程在第 3 步故意出错，看其余进程怎样停下（不会卡住）")
    p.add_argument("--quick", action="store_true", help="冒烟测试：tiny 模型、30 步")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        s = make_settings(args)
        check_args(s, planned_world_size(s))
        code = launch(s)
    except UserError as err:  # torchrun 下每个进程都会查出同样的错：只让 rank 0 说
        if os.environ.get("RANK", "0") == "0":
            print(f"错误：{err}", file=sys.stderr)
        sys.exit(2)
    if code:
        sys.exit(code)



# ===== 进阶：设置与检查、端口、出错与 Ctrl-C（第一次读可以跳过）=====

RUN_FLAGS = [  # (旗标, 类型, 说明)：说明后面自动补上 DEFAULTS / QUICK 里的取值
    ("--batch-size", int, "全局批次：所有进程合计的序列数，须能被 进程数 × --grad-accum 整除"),
    ("--grad-accum", int, "每个进程每步累积几个小批次（用 no_sync 省掉前几次通信）"),
    ("--max-steps", int, "参数更新总步数"),
    ("--lr", float, "峰值学习率"),
    ("--embed-lr-mult", float, "嵌入和输出头的学习率是 --lr 的几倍（见 04）"),
    ("--min-lr-ratio", float, "余弦退火的终点 = lr × 此比例"),
    ("--warmup-steps", int, "线性预热步数"),
    ("--weight-decay", float, "AdamW 权重衰减，只作用于矩阵"),
    ("--grad-clip", float, "梯度范数裁剪阈值"),
    ("--eval-every", int, "每多少步评估并存检查点"),
    ("--log-every", int, "每多少步打印一行进度"),
    ("--seed", int, "随机种子：初始化与数据顺序，同一种子下进程数不影响结果"),
    ("--timeout", float, "集体通信最多等多少秒：某个进程卡住时报错退出，而不是永远等下去"),
    ("--prompt", str, "训练结束时续写的开头"),
]


def make_settings(args):
    """默认值 < --quick < 检查点里的设置（--resume 时）< 命令行显式给出的值；续训时学习率计划
    与全局批次总是沿用检查点的（否则接上的曲线与不中断时不同）。"""
    merged = {**vars(args), **DEFAULTS, **(QUICK if args.quick else {}), "dtype": "auto",
              **{k: v for k, v in vars(args).items() if v is not None}}
    if args.resume:
        saved = load_checkpoint(Path(args.out_dir) / "ckpt.pt").get("settings", {})
        keep = {k: saved[k] for k in RESUME_KEYS if k in saved}
        if args.max_steps is not None:  # 总步数可以在续训时改大
            keep.pop("max_steps", None)
        merged.update(keep)
    return argparse.Namespace(**merged)


def read_resume(s):
    """--resume：每个进程读同一个检查点（多机续训时，它要在每台机器的同一路径上都读得到）。"""
    return load_checkpoint(Path(s.out_dir) / "ckpt.pt") if s.resume else None


def planned_world_size(s):
    """还没加入进程组时就要知道进程数（检查批次能否均分）：torchrun 的环境变量、--spawn 或 1。"""
    return env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else (s.spawn or 1)


def env_int(name):
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"环境变量 {name}={value!r} 不是整数（torchrun 会替每个进程设好它）") from None


def check_args(s, world_size):
    """开工之前检查每个数值设置；负数、零、NaN、大得离谱，都用一行中文拒绝。"""
    limits = {"batch_size": (1, 1 << 20), "grad_accum": (1, 1 << 16), "max_steps": (1, 10**9),
              "lr": (1e-8, 1), "embed_lr_mult": (0.01, 100), "min_lr_ratio": (0, 1),
              "warmup_steps": (0, 10**9), "weight_decay": (0, 1), "grad_clip": (1e-4, 1e4),
              "eval_every": (1, 10**9), "log_every": (1, 10**9), "seed": (0, 2**32 - 1),
              "timeout": (1, 86400), "stop_at": (1, 10**9), "spawn": (1, 256),
              "master_port": (1, 65535), "fail_rank": (0, 1 << 16)}
    for key, (low, high) in limits.items():
        if getattr(s, key) is not None:
            check_range(f"--{key.replace('_', '-')}", getattr(s, key), low, high)
    if s.batch_size % (world_size * s.grad_accum):
        raise UserError(f"--batch-size {s.batch_size} 是全局批次，要能被 进程数 {world_size} × "
                        f"--grad-accum {s.grad_accum} 整除（每个进程分到同样多的序列）")
    if s.spawn and "WORLD_SIZE" in os.environ:
        raise UserError("已经在 torchrun 下运行，不要再加 --spawn")
    if len(load_project_tokenizer().encode(s.prompt)) > MODEL_SIZES[s.model]["context_length"]:
        raise UserError("--prompt 比模型的上下文还长：请缩短它")
    if not s.data.startswith("gutenberg:") and not Path(s.data).exists():
        raise UserError(f"找不到语料路径 {s.data}")  # 现在就说，不必等所有进程都连好
    if Path(s.out_dir).exists() and not Path(s.out_dir).is_dir():
        raise UserError(f"--out-dir {s.out_dir} 已存在，但不是目录")


def pick_port(requested):
    """python / --spawn 启动时 rank 0 要监听一个端口。给了 --master-port 就先试着占一下：
    被占用时现在就说清楚，而不是等 init_process_group 报一长串英文。没给就让系统挑一个空闲的。"""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", requested or 0))
        except OSError:
            raise UserError(f"端口 {requested} 已被占用（也许上一次训练还没退出）：换一个 "
                            f"--master-port，或者不给它，让系统挑一个空闲端口") from None
        return probe.getsockname()[1]


class RankFailure(Exception):
    """某一个进程自己出的错（--fail-rank 演示用）：它报告后退出，其余进程随之停止。"""


def peer_lost(err):
    """这个错误是不是"同伴进程不在了"：gloo 发现连接被关闭或重置，或者等待超时。"""
    text = str(err)
    return isinstance(err, dist.DistError) or any(
        key in text for key in ("Connection closed by peer", "Connection reset", "Broken pipe",
                                "Timed out", "timed out", "Socket Timeout"))


class StopSignals:
    """Ctrl-C（SIGINT）或 torchrun 转发来的 SIGTERM：只记下"要停"，这一步做完、各进程商量好、
    存好检查点再退出。再按一次 Ctrl-C 才强制退出；SIGTERM 重复到达也只是记下，不打断存盘。"""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle)
                         for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ===== 附录：前几章的部件（逐字复制，读过前几章可以跳过）=====
# 来自 01–04：错误类型、命令行工具、分词器、GPTModel、生成、语料缓存、优化器、检查点
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


def tokenizer_record(enc):
    """检查点里记下分词器本身（项目分词器连同 ranks 一起存），载入时用同一个。"""
    if enc.name == "gpt2":
        return {"kind": "gpt2", "name": enc.name}
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda item: item[1])
    # tiktoken 没有公开导出 ranks 的接口，这里读它的内部属性；按 rank 排序后存成 base64 列表
    return {"kind": "project", "name": enc.name, "pat_str": enc._pat_str,
            "special_tokens": enc._special_tokens,
            "mergeable_ranks": [base64.b64encode(tok).decode("ascii") for tok, _ in ranks]}


def shorten(text, limit=24):
    """长提示词在每行输出里只显示结尾（续写接的就是结尾），免得一行被几千个字淹没。"""
    return text if len(text) <= limit else f"…{text[-limit:]}"


DATA_SUFFIXES = (".txt", ".jsonl")


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


def sync(device):
    if device.type != "cpu":  # GPU 的运算是异步排队的：计时前后都要等它真正算完
        getattr(torch, device.type).synchronize()


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


if __name__ == "__main__":
    main()
