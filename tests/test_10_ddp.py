"""10_ddp.py：torchrun 下 2 个 CPU 进程的运行只在 rank 0 打印；等价性——同样的全局批次与种子，
2 个进程（DDP；两台"机器"上的 FSDP；mp.spawn 后中途换成 1 个进程续训）与 1 个进程训练出同样的权重；
分片的并集就是单进程的批次；坏输入、端口占用、GPU 不够、一个进程出错时不卡住。"""
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, load_script

pytestmark = pytest.mark.usefixtures("one_thread")

# 一份开发者没有特意挑过的配置：全局批次 12、每个进程累积 2 个小批次、种子 5、6 步
CONFIG = ["--quick", "--batch-size", "12", "--grad-accum", "2", "--seed", "5", "--max-steps", "6",
          "--eval-every", "3"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8", PYTHONDONTWRITEBYTECODE="1")


def run(cmd, timeout=120):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def python(*args, **kw):
    return run([sys.executable, "10_ddp.py", *args], **kw)


def torchrun(*args, **kw):
    """torchrun --standalone --nproc_per_node=2 10_ddp.py CONFIG args。
    python -m torch.distributed.run 就是 torchrun 命令本身：PATH 里没有 torchrun 时也能用。"""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return run([*launcher, "10_ddp.py", *CONFIG, *args], **kw)


def weights(out_dir):
    return torch.load(out_dir / "ckpt.pt", weights_only=True)["model"]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def in_process(*args):
    """在测试进程里直接调用 main()（world size 1 的进程组开在 127.0.0.1 的空闲端口上），省掉一次启动。"""
    threads = torch.get_num_threads()
    try:
        load_script("10_ddp").main([*args])
    finally:
        torch.set_num_threads(threads)  # 单进程模式会按 CPU 核数设线程数：还原，免得影响别的测试


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """参照：1 个进程（python 10_ddp.py）按 CONFIG 训练出的权重。"""
    out = tmp_path_factory.mktemp("single")
    in_process(*CONFIG, "--out-dir", str(out))
    return weights(out)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    result = torchrun("--out-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return result, out


def test_torchrun_two_ranks_prints_only_on_rank0(ddp_run):
    result, _ = ddp_run
    out = result.stdout
    assert out.count("进程组：2 个进程") == 1
    assert out.count("复用 token 缓存") + out.count("切词：") == 1  # 建缓存的消息也只有一条
    assert out.count("步     6/6") == 1 and out.count("样本：") == 1
    assert "Traceback" not in result.stderr


def test_ddp_two_ranks_match_one_process(single, ddp_run):
    assert max_diff(single, weights(ddp_run[1])) <= 1e-5


def test_toy_ddp_gradient_equals_whole_batch_gradient(ddp_run):
    line = next(x for x in ddp_run[0].stdout.splitlines() if x.startswith("DDP："))
    # 两个进程各自的本地梯度不同，DDP 之后每个进程都等于整批的梯度
    local = line.split("第一个分量 [")[1].split("]")[0].split(", ")
    assert len(set(local)) == 2
    assert float(line.split("最大差 ")[1].rstrip("）")) <= 1e-6


def test_two_nodes_rendezvous_with_fsdp_match_one_process(single, tmp_path):
    """两台"机器"（127.0.0.1 上的两个 torchrun，每台 1 个进程）、FSDP 分片：权重与 1 个进程相同，
    每个进程只持有一半的模型状态。"""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    common = ["--nnodes=2", "--nproc_per_node=1", "--master_addr=127.0.0.1",
              f"--master_port={port}"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *common,
                               f"--node_rank={rank}", "10_ddp.py", *CONFIG,
                               "--strategy", "fsdp", "--out-dir", str(tmp_path)],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:]
    assert "进程组：2 个进程（每台机器 1 个）" in outputs[0][0]
    assert "进程组" not in outputs[1][0]  # 第二台机器上只有 rank 1：什么也不打印
    assert max_diff(single, weights(tmp_path)) <= 1e-5
    line = next(x for x in outputs[0][0].splitlines() if x.startswith("内存"))
    held = [float(v) for v in line.split("每个进程 ")[1].split(" MB")[0].split("、")]
    full = float(line.split("完整的 ")[1].split(" MB")[0])
    # 两片合起来正好是一份完整的（逐个张量切片，按 0.01 MB 的打印精度比较）
    assert len(held) == 2 and math.isclose(sum(held), full, abs_tol=0.02)
    assert max(held) < 0.6 * full


def test_spawn_then_resume_with_one_process_matches_uninterrupted(single, tmp_path, capsys):
    first = python(*CONFIG, "--spawn", "2", "--stop-at", "3", "--out-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3
    in_process(*CONFIG, "--resume", "--out-dir", str(tmp_path))
    assert "上次 2 个进程，这次 1 个" in capsys.readouterr().out
    assert max_diff(single, weights(tmp_path)) <= 1e-5


def test_checkpoint_loads_as_a_plain_gpt_in_04(single, ddp_run):
    model, _, cfg = load_script("04_pretrain").load_init(str(ddp_run[1] / "ckpt.pt"), "cpu")
    saved = weights(ddp_run[1])
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert cfg["n_layers"] == 2


def test_one_rank_failing_stops_everyone_without_hanging(tmp_path):
    result = torchrun("--fail-rank", "1",
                      "--out-dir", str(tmp_path), timeout=120)
    assert result.returncode != 0
    assert "[rank 1] 出错：演示（--fail-rank 1）" in result.stderr


def test_shards_together_are_the_single_process_batch():
    ddp = load_script("10_ddp")
    windows = ddp.TokenWindows(np.arange(10_000, dtype=np.uint16), 8)

    def batches(world, step):
        shards = [ddp.Shard(windows, ddp.Dist(r, r, world, world, torch.device("cpu"), "gloo"),
                            12, 2, seed=3) for r in range(world)]
        # 每个小批次：各进程的部分合起来
        return [sorted(i for shard in shards for i in shard.micro_batches(step)[a])
                for a in range(2)]

    steps_per_epoch = len(windows) // 12
    for step in (0, 1, steps_per_epoch - 1, steps_per_epoch, steps_per_epoch + 5):
        assert batches(1, step) == batches(2, step) == batches(3, step)
    one = ddp.Shard(windows, ddp.Dist(0, 0, 1, 1, torch.device("cpu"), "gloo"), 12, 1, seed=3)
    # set_epoch 起作用：新的一轮换一种顺序
    assert one.micro_batches(0) != one.micro_batches(steps_per_epoch)


def test_device_choice_refuses_more_ranks_than_gpus(monkeypatch):
    ddp = load_script("10_ddp")
    assert ddp.choose_device("cpu", 0, 4) == (torch.device("cpu"), "gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ddp.UserError, match="只有 1 块 GPU"):
        ddp.choose_device("auto", 1, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ddp.UserError, match="看不到 NVIDIA GPU"):
        ddp.choose_device("cuda", 0, 1)


def test_port_in_use_is_one_clear_message(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SystemExit) as exit_info:
            in_process("--quick", "--master-port", str(busy.getsockname()[1]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "已被占用" in err and err.count("\n") == 1


BAD = [("--batch-size", "0"), ("--batch-size", "-4"), ("--grad-accum", "0"),
       ("--max-steps", "0"), ("--max-steps", "1e30"), ("--lr", "nan"), ("--lr", "-1"),
       ("--lr", "inf"), ("--embed-lr-mult", "0"), ("--min-lr-ratio", "2"),
       ("--warmup-steps", "-1"), ("--weight-decay", "nan"), ("--grad-clip", "0"),
       ("--eval-every", "0"), ("--log-every", "-5"), ("--seed", "-1"), ("--timeout", "0"),
       ("--timeout", "nan"), ("--stop-at", "0"), ("--spawn", "0"), ("--spawn", "100000"),
       ("--master-port", "70000"), ("--fail-rank", "-1"), ("--prompt", "字" * 200),
       ("--data", "/no/such/corpus")]


@pytest.mark.parametrize("flag,value", BAD, ids=[f"{f}={v[:6]}" for f, v in BAD])
def test_bad_values_exit_2_with_one_line(flag, value, capsys):
    ddp = load_script("10_ddp")
    with pytest.raises(SystemExit) as exit_info:
        ddp.main(["--quick", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("错误：") and err.count("\n") == 1


def test_global_batch_must_split_evenly(capsys):
    ddp = load_script("10_ddp")
    with pytest.raises(SystemExit) as exit_info:
        ddp.main(["--quick", "--spawn", "3", "--batch-size", "8"])
    assert exit_info.value.code == 2
    assert "整除" in capsys.readouterr().err


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    ddp = load_script("10_ddp")
    with pytest.raises(SystemExit) as exit_info:
        ddp.main(["--quick", "--resume", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "找不到检查点" in capsys.readouterr().err
