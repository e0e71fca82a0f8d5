"""测试共用的小工具：按文件名加载编号脚本、把单个脚本放进空目录独立运行、严格模式下的跳过。

脚本文件名以数字开头（01_tokenizer.py），不能直接 import，所以统一用 importlib 加载。
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_MODULES = {}

# .ci/run 设置 NFL_STRICT=1：此时"缺 GPT-2 词表 / 缺 transformers"不再是跳过，而是失败，
# 保证 CI 上每个参照测试都真正跑过。
STRICT = os.environ.get("NFL_STRICT") == "1"


def load_script(name):
    """按文件名（如 "01_tokenizer.py" 或 "01_tokenizer"）加载编号脚本，返回模块对象（带缓存）。"""
    stem = name[:-3] if name.endswith(".py") else name
    if stem not in _MODULES:
        path = ROOT / f"{stem}.py"
        spec = importlib.util.spec_from_file_location(f"nfl_{stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclass 等需要在 sys.modules 里找到模块
        spec.loader.exec_module(module)
        _MODULES[stem] = module
    return _MODULES[stem]


def copy_standalone(script, dest):
    """只把一个脚本和 data/ 复制进 dest：脚本若偷偷 import 了兄弟脚本，运行就会失败。"""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / script, dest / script)
    shutil.copytree(ROOT / "data", dest / "data", dirs_exist_ok=True)
    return dest / script


def run_standalone(script, args, workdir, timeout=180, env=None):
    """在只含该脚本与 data/ 的目录里以子进程运行它，返回 CompletedProcess（不抛异常）。"""
    path = copy_standalone(script, workdir)
    full_env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONIOENCODING="utf-8")
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, path.name, *args], cwd=workdir, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )


def skip_or_fail(reason):
    """缺少可选的参照（GPT-2 词表、transformers）时：平时跳过，CI 的严格模式下失败。"""
    if STRICT:
        pytest.fail(f"严格模式（NFL_STRICT=1）下不允许跳过：{reason}")
    pytest.skip(reason)


@pytest.fixture
def script_loader():
    return load_script


@pytest.fixture
def one_thread():
    """测试期间 torch 只用 1 个线程，结束后还原：小张量上多线程只添开销，测试之间的计时也更稳。"""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
