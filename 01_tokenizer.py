"""01_tokenizer.py — 处理文本数据：从文字到词元（token），再到向量
本章你会学到：
  1. 最朴素的分词：正则切词 + 查词表，以及它遇到生词时的毛病（<|unk|>）
  2. 字节级 BPE：预分词；训练（先写直白的"每次重数"，再写增量更新）；编码、解码、特殊词元
  3. 同一个从零写的编码器装上 GPT-2 的词表，与 tiktoken 逐 id 一致
  4. 项目自己的中文友好分词器：训练后写进 data/tokenizer.json，之后各章用 tiktoken 读取它
  5. 给 GPT 喂数据：滑动窗口数据集、词元嵌入 + 位置嵌入、"查表 = one-hot 乘矩阵"
  进阶（可跳过）：FastBPETokenizer，让纯 Python 编码接近 tiktoken（Rust）的速度
运行：python 01_tokenizer.py          # 全部演示：2 核 CPU 约 18 秒
      python 01_tokenizer.py --quick  # 冒烟：约 7 秒
      python 01_tokenizer.py --train  # 重新训练 data/tokenizer.json：约 37 秒（2.2 MB 语料，训练本身约 26 秒）
"""
import argparse
import ast
import base64
import heapq
import importlib.util
import json
import math
import operator
import os
import random
import sys
import time
from array import array
from collections import Counter, defaultdict
from itertools import chain, compress, repeat
from pathlib import Path

import numpy as np
import regex
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

# 命令行解析、读语料、找 GPT-2 词表、读项目分词器、选设备等管道活在文末"进阶：公共工具的细节"，第一遍可跳过
# ===== 1. 公共工具（其他脚本从这里逐字复制） =====
DATA_DIR = Path(__file__).resolve().parent / "data"


class UserError(Exception):
    """用户输入有误（文件缺失、格式不对……）：main() 捕获后打印一行中文说明，以状态码 2 退出。"""


# GPT-2 的预分词正则（公开事实，来自 GPT-2 论文的实现）：缩写、字母串、数字串、其他符号、空白
GPT2_PAT = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

ENDOFTEXT = "<|endoftext|>"  # 文档之间的分隔符：训练时绝不跨过它合并
UNK = "<|unk|>"
DEMO_CHARS = 100_000         # 演示用的语料字符数（汉字约 3 字节：约 300 KB）
# 含 <|endoftext|>；64 的倍数，嵌入矩阵更规整。2048 是实测选的（README 有表）：2.2 MB 的语料上，
# 4096、6144 时词元多半只出现几次，04 的小模型 5 分钟里学不会、输出头也更慢；1024 时"模型"
# "朋友"这样的常用词也被拆成字节。2048 下 93% 的汉字出现是一个词元
DEFAULT_VOCAB_SIZE = 2048


# ===== 2. 最朴素的分词：正则切词 + 查词表 =====
# 英文按单词切，数字串整体，汉字没有空格分词，只好一个字一个词；空白直接丢掉
SIMPLE_PAT = regex.compile(r"<\|endoftext\|>|[A-Za-z]+(?:'[a-z]+)?|\d+|\p{Han}|\S")


class SimpleTokenizer:
    """按正则切词、查词表的分词器：词表之外的词一律变成 <|unk|>。"""

    def __init__(self, vocab):
        self.str_to_int = vocab
        # 编码查 str_to_int，解码查 int_to_str：两张表互为逆映射
        self.int_to_str = {i: s for s, i in vocab.items()}

    @classmethod
    def from_text(cls, text):
        """词表 = 语料里出现过的所有词（排序后编号），再加两个特殊词。"""
        # 先去掉 <|endoftext|>，再和 <|unk|> 一起放到末尾：特殊词的 id 固定在最后
        words = sorted(set(SIMPLE_PAT.findall(text)) - {ENDOFTEXT})
        return cls({word: i for i, word in enumerate(words + [ENDOFTEXT, UNK])})

    def encode(self, text):
        unk = self.str_to_int[UNK]
        # 词表里查不到的词一律变成 <|unk|>：不报错，但原词从此丢失，解码也找不回来
        return [self.str_to_int.get(word, unk) for word in SIMPLE_PAT.findall(text)]

    def decode(self, ids):
        out = ""
        for word in (self.int_to_str[i] for i in ids):
            # 已拼好文本的最后一个字符 + 新词的第一个字符；out 为空时 pair 只有 1 个字符
            pair = out[-1:] + word[0]
            # 只在两边都是英文字母或数字时补空格：汉字之间、标点前后本来就不需要
            if len(pair) == 2 and pair.isascii() and pair.isalnum():
                out += " "  # 空白在切词时丢了，只能猜：两个英文词之间补一个空格
            out += word
        return out


# ===== 3. 字节级 BPE 的预分词 =====
# BPE 从 256 个单字节出发，任何文本（生僻字、emoji、乱码）都能编码，不存在"生词"。
# 合并前先用正则把文本切成片段，合并只在片段内部发生，避免"句号+下一个词"这种词元。
# 项目的切分规则：汉字串单独成段（可学出"模型""神经网络"这样的多字词元），其他字母串可带
# 一个前导空格；数字每 3 位一段（"12345" -> "123" "45"），算术题里的数才有规律可学。
PROJECT_PAT = (r"""'(?:[sdmt]|ll|ve|re)|\p{Han}+| ?[^\P{L}\p{Han}]+|\p{N}{1,3}"""
               r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# 注意：\p{L} 这类类别查的是 Unicode 表，regex 与 tiktoken（Rust）各带一份、版本可能不同——对 Python
# 的 unicodedata 已收录的字符两者切分一致，比 tiktoken 的表更新的字符（如 U+0558）可能切得不同。
_CACHE_LIMIT = 1 << 18  # 片段缓存最多这么多条，超了就清空，防止内存无限涨


def _special_regex(tokens):
    """匹配任一特殊词元的正则；长的排前面，避免被它的前缀抢先匹配。"""
    # escape 必不可少：<|endoftext|> 里的 | 在正则里表示“或”，不转义就会匹配错
    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)))


# ===== 4. BPE 训练：数出最常见的相邻对，合并，再数 =====
# 训练的想法（minbpe 就是这样写的）：数出所有相邻的两个词元，把出现最多的一对合并成一个新词元，
# 再数、再合并……直到词表够大。合并的先后就是编码时的优先级（rank）。
# 两个训练器都只处理"不同的片段"：相同的预分词片段只存一份，带上出现次数（"的"出现一万次也只算一个）。
def merge_word(word, pair, new_id):
    """把 word 里所有（从左到右、不重叠的）pair 换成 new_id；返回新词和合并点在新词里的下标。"""
    # 例：word=[a, b, a, b, c]、pair=(a, b) -> 新词 [X, X, c]，spots=[0, 1]
    out, spots, i = [], [], 0
    while i < len(word):
        if word[i] == pair[0] and i + 1 < len(word) and word[i + 1] == pair[1]:
            spots.append(len(out))
            out.append(new_id)
            i += 2  # 一次跳过两个元素：合并不会重叠（aaa 合并 aa 得到 [X, a]）
        else:
            out.append(word[i])
            i += 1
    return out, spots


def add_token(vocab, index_of, token):
    """把新词元加进词表，返回它的 id。"""
    # 极少数情况下不同拆法拼出同一串字节（如 a+bc 与 ab+c）：沿用已有的 id，词表里不出现重复
    if token not in index_of:
        index_of[token] = len(vocab)
        vocab.append(token)
    return index_of[token]


def learn_merges_naive(words, freqs, num_tokens, verbose=False):
    """words：每个不同片段的字节 id 列表（会被原地改写）；freqs：它们的出现次数。一直合并到
    词表有 num_tokens 个普通词元。返回（词元字节串列表，[((左id, 右id), 新id), ...]）。"""
    # 起点：256 个单字节就是最初的词表，id 0..255 恰好等于字节值
    vocab = [bytes([i]) for i in range(256)]
    index_of = {tok: i for i, tok in enumerate(vocab)}
    merges = []
    while len(vocab) < num_tokens:
        # 每合并一次，都把所有片段的相邻对从头数一遍：O(合并次数 × 语料长度)，慢就慢在这里
        counts = Counter()
        for word, freq in zip(words, freqs):
            for pair in zip(word, word[1:]):
                counts[pair] += freq
        if not counts:  # 每个片段都已合并成单个词元：语料太小，提前停下
            break
        # 出现最多的对；次数相同取 (左id, 右id) 最小的，保证结果确定、可复现
        pair = min(counts, key=lambda p: (-counts[p], p))
        new_id = add_token(vocab, index_of, vocab[pair[0]] + vocab[pair[1]])
        merges.append((pair, new_id))
        words[:] = [merge_word(word, pair, new_id)[0] for word in words]
    return vocab, merges


# 上面每一轮都重数全部语料，可一次合并只改动含这个对的少数片段。增量版只数一次，之后：
#   1) 记住每个相邻对出现在哪些片段里，合并时只改动这些片段，计数按差值增减；
#   2) 用堆取出现次数最多的对；计数变了就压入新条目，旧条目弹出时发现对不上就丢弃（惰性删除）。
# 两者学到的合并逐条相同（测试里验证），演示打印两者在同一段语料上的速度比。
def _apply_merge(pair, new_id, words, freqs, pair_counts, where):
    """在含 pair 的词里执行合并，只更新受影响的相邻对计数；返回计数变了的对。"""
    # delta 汇总这次合并带来的计数变化：同一个对可能在很多词里增减，最后一次性写回
    delta = defaultdict(int)
    # pop：这个对此刻会被全部合并，旧索引没用了；以后若再出现，会在下面重新登记
    for wi in where.pop(pair):
        word = words[wi]
        merged, spots = merge_word(word, pair, new_id)
        if not spots:  # 索引里的旧记录：这个词早已不含该对
            continue
        # 第 k 个合并点在旧词里的下标是 j + k；它左、中、右三个旧对消失，左右两个新对出现
        # 例：旧词 [a, b, c, d] 合并 (b, c)，spots=[1]：旧对 (a,b)(b,c)(c,d) 消失，
        # 新词 [a, X, d] 里的 (a,X)(X,d) 出现
        # 用集合去重：合并点相邻时（如 aaaa 合并 aa），两个合并点共享的旧对只能减一次
        old = {j + k + d for k, j in enumerate(spots) for d in (-1, 0, 1)}
        new = {j + d for j in spots for d in (-1, 0)}
        for j in old:
            if 0 <= j < len(word) - 1:
                delta[word[j], word[j + 1]] -= freqs[wi]
        for j in new:
            if 0 <= j < len(merged) - 1:
                delta[merged[j], merged[j + 1]] += freqs[wi]
                where[merged[j], merged[j + 1]].add(wi)
        words[wi] = merged
    # 统一写回全局计数；d 可能为 0（同一个对在一个词里减少、在另一个词里增加）
    for p, d in delta.items():
        pair_counts[p] += d
        if not pair_counts[p]:  # 计数归零就删掉；堆里它的旧条目弹出时自然作废
            del pair_counts[p]
    # 只返回计数真的变了、且仍存在的对：调用方只需为它们往堆里压入新条目
    return [p for p, d in delta.items() if d and p in pair_counts]


def learn_merges(words, freqs, num_tokens, verbose=False):
    """增量版：参数、返回值和学到的合并都与 learn_merges_naive 相同，只是快得多。"""
    vocab = [bytes([i]) for i in range(256)]
    index_of = {tok: i for i, tok in enumerate(vocab)}
    # 唯一一次全量计数：pair_counts[对] = 总出现次数，where[对] = 含这个对的词的下标集合
    pair_counts, where = defaultdict(int), defaultdict(set)
    for wi, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[wi]
            where[pair].add(wi)
    # 堆顶 = 次数最多的对；次数相同取 (左id, 右id) 最小的，保证结果确定、可复现
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges, start = [], time.perf_counter()
    # 堆空了说明每个片段都已合并成单个词元、不再有相邻对：语料太小时会提前停下
    while len(vocab) < num_tokens and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -neg_count:  # 过期条目
            continue
        new_id = add_token(vocab, index_of, vocab[pair[0]] + vocab[pair[1]])
        # 记下合并的先后：先学到的 id 小，编码时 rank 越小越先合并，正是这个顺序
        merges.append((pair, new_id))
        # heapq 是最小堆，所以存负的次数：堆顶就是出现次数最多的对
        for p in _apply_merge(pair, new_id, words, freqs, pair_counts, where):
            heapq.heappush(heap, (-pair_counts[p], p))
        if verbose and len(merges) % 1000 == 0:
            print(f"  合并 {len(merges)} 次，词表 {len(vocab)}/{num_tokens}，"
                  f"已用 {time.perf_counter() - start:.1f}s")
    return vocab, merges


# ===== 5. BPE 分词器：编码、解码、保存 =====
class BPETokenizer:
    """字节级 BPE，编码规则与 tiktoken 相同。ranks：词元字节串 -> id（越小越早学到、越优先合并）；
    BPETokenizer() 是只有 256 个单字节词元的未训练分词器，from_tiktoken 可装上 GPT-2 的词表。"""

    def __init__(self, ranks=None, pat_str=PROJECT_PAT, special_tokens=None, name="nfl-bpe"):
        self.name, self.pat_str = name, pat_str
        # 复制一份 dict：调用方（如 tiktoken 的内部词表）之后改动原 dict，也影响不到这里
        self.ranks = dict(ranks) if ranks is not None else {bytes([i]): i for i in range(256)}
        self.special_tokens = dict(special_tokens or {})
        # merges 只在训练后有内容（供演示学习顺序）；从文件加载的词表只靠 ranks 就能编码
        self.merges = []
        # 用第三方 regex 而不是标准库 re：\p{L}、\p{Han} 这类 Unicode 类别只有 regex 支持
        self.pattern = regex.compile(pat_str)
        self._rebuild()

    def _rebuild(self):
        """词表变了以后：重建解码表，清空缓存。"""
        self.decoder = {i: tok for tok, i in self.ranks.items()}
        # 特殊词元不参与合并、不在 ranks 里，但解码时也要能还原成它的文字
        self.decoder.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        self.clear_cache()

    def clear_cache(self):
        # 片段 -> ids：同一个片段（"的"、" the"）只合并一次。缓存只为提速，清空不影响结果
        self.cache = {}

    @property
    def n_vocab(self):
        # 取最大 id + 1 而不是个数：嵌入矩阵的行数必须装得下最大的 id
        return max([*self.ranks.values(), *self.special_tokens.values()]) + 1

    def train(self, text, vocab_size, verbose=False, learn=learn_merges):
        """在 text 上学合并规则，使词表（含 <|endoftext|>）共 vocab_size 个；返回 self。
        learn 是训练算法：learn_merges（增量，快）或 learn_merges_naive（每次重数，直白）。"""
        if vocab_size < 258:
            raise UserError(f"词表大小 {vocab_size} 太小：至少 258（256 个字节 + 1 次合并 + 结束符）")
        # 按 <|endoftext|> 切开再预分词：结束符两侧属于不同文档，不能合并到一起
        counts = Counter()
        for doc in text.split(ENDOFTEXT):
            counts.update(self.pattern.findall(doc))
        pieces = sorted(counts)  # 排序：与 Counter 的插入顺序无关，结果可复现
        # 每个片段变成字节值列表（0..255），正好就是初始词表里的 id
        words = [list(piece.encode("utf-8")) for piece in pieces]
        # vocab_size - 1：留一个 id 给 <|endoftext|>
        vocab, self.merges = learn(words, [counts[p] for p in pieces], vocab_size - 1, verbose)
        self.ranks = {tok: i for i, tok in enumerate(vocab)}
        self.special_tokens = {ENDOFTEXT: len(vocab)}
        self._rebuild()
        return self

    # ---- 编码：每个片段里，反复合并 rank 最小的相邻对 ----
    def merge_piece(self, data):
        """tiktoken 的规则：片段 data（字节串）本身是词元就直接用；否则从单字节出发，反复合并
        "拼起来 rank 最小"的相邻两段（并列取最左），直到任何相邻两段都拼不成词元。"""
        if data in self.ranks:
            return [self.ranks[data]]
        parts = [bytes([b]) for b in data]
        # pair_ranks[i]：parts[i] 与 parts[i+1] 拼起来的 rank；拼不成词元的记作无穷大，永远轮不到
        pair_ranks = [self.ranks.get(a + b, math.inf) for a, b in zip(parts, parts[1:])]
        while pair_ranks and min(pair_ranks) < math.inf:
            i = pair_ranks.index(min(pair_ranks))  # 第一个最小值：rank 并列时取最左的对
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]
            # 只有新段与左右邻居组成的两个对变了，其余的 rank 原样保留
            if i > 0:
                pair_ranks[i - 1] = self.ranks.get(parts[i - 1] + parts[i], math.inf)
            if i < len(pair_ranks):
                pair_ranks[i] = self.ranks.get(parts[i] + parts[i + 1], math.inf)
        # 停下时每一段都是词元（单字节本来就是词元），所以查表一定查得到
        return [self.ranks[part] for part in parts]

    def _encode_text(self, text):
        # 缓存太大就整个清空：比 LRU 简单，常见片段很快又会被缓存回来
        if len(self.cache) > _CACHE_LIMIT:
            self.clear_cache()
        ids = []
        for piece in self.pattern.findall(text):
            if piece not in self.cache:
                self.cache[piece] = self.merge_piece(piece.encode("utf-8"))
            ids += self.cache[piece]
        return ids

    def encode_ordinary(self, text):
        """编码，特殊词元的文字当普通文本处理。"""
        try:
            return self._encode_text(text)
        except UnicodeEncodeError:  # 落单的代理字符：与 tiktoken 一样先替换成 U+FFFD 再编码
            # surrogatepass 让落单的代理字符也能编进 UTF-16，解码时 replace 再把它换成 U+FFFD
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self._encode_text(text)

    def encode(self, text, allowed_special=frozenset(), disallowed_special="all"):
        """语义与 tiktoken 相同：allowed_special 里的特殊词元编成一个 id；文本里出现了
        disallowed_special（默认 = 其余所有特殊词元）就报 ValueError，防止用户输入冒充控制符号。"""
        if allowed_special == "all":
            allowed_special = set(self.special_tokens)
        if disallowed_special == "all":
            disallowed_special = set(self.special_tokens) - set(allowed_special)
        if disallowed_special:
            found = _special_regex(disallowed_special).search(text)
            if found:
                raise ValueError(f"文本里出现了未被允许的特殊词元 {found.group()!r}：要编成特殊词元请放进 "
                                 f"allowed_special；要当普通文字请传 disallowed_special=()")
        allowed_special = set(allowed_special) & set(self.special_tokens)
        if not allowed_special:
            return self.encode_ordinary(text)
        # 按允许的特殊词元切开：正则带括号，split 把切点也留下，落在奇数位置；偶数位置是普通文本
        parts = regex.split(f"({_special_regex(allowed_special).pattern})", text)
        ids = []
        for k, part in enumerate(parts):
            ids += [self.special_tokens[part]] if k % 2 else self.encode_ordinary(part)
        return ids

    def decode(self, ids):
        """拼回字节再按 UTF-8 解码；一个汉字可能被切在两个词元里，单独解码时不完整的字节显示为 �。"""
        # 先拼好全部字节再解码：分在两个词元里的半个汉字，拼接后又是完整的字符
        return b"".join(self.decoder[i] for i in ids).decode("utf-8", errors="replace")

    def token_str(self, token_id):
        """给人看的词元：完整的字符照常显示，半个字符的字节显示成 \\xe7 这样。"""
        return self.decoder[token_id].decode("utf-8", errors="backslashreplace")

    # ---- 保存与加载：tiktoken 也能直接读的格式 ----
    def save(self, path, **info):
        """写成 JSON：名字、切分正则、特殊词元、按 rank 排好的 base64 词元；info 是附加说明。"""
        tokens = sorted(self.ranks, key=self.ranks.get)
        if [self.ranks[t] for t in tokens] != list(range(len(tokens))):
            raise UserError("词表的 rank 不是 0..n-1 连续编号，无法保存")
        # 按 rank 顺序存成列表：rank 就是列表下标，不必为每个词元再写一个数字
        spec = {"name": self.name, "pat_str": self.pat_str, "special_tokens": self.special_tokens,
                "vocab_size": self.n_vocab, **info,
                "mergeable_ranks": [base64.b64encode(t).decode("ascii") for t in tokens]}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")  # 先写临时文件再改名：中途出错也不会留下半个文件
        # ensure_ascii=False：中文等字符按原样写出，文件人眼可读
        try:
            tmp.write_text(json.dumps(spec, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except OSError as err:  # 磁盘满、没有权限……：原来的文件还在，不会只剩半个
            raise UserError(f"无法写入 {path}：{err.strerror}") from None

    @classmethod
    def load(cls, path):
        # 同一份文件先让 tiktoken 读一遍（load_project_tokenizer），也就顺便校验了格式
        return cls.from_tiktoken(load_project_tokenizer(path))

    @classmethod
    def from_tiktoken(cls, enc):
        """用 tiktoken 词表（如 GPT-2 的）构造从零实现的编码器。"""
        # 用到 tiktoken 的下划线属性：它没有公开接口取回完整的 ranks 和切分正则
        return cls(enc._mergeable_ranks, enc._pat_str, enc._special_tokens, enc.name)

    def to_tiktoken(self):
        # 反方向：同一份词表交给 Rust 实现，编码结果相同，速度快得多
        return tiktoken.Encoding(name=self.name, pat_str=self.pat_str, mergeable_ranks=self.ranks,
                                 special_tokens=self.special_tokens)


# ===== 6. 项目分词器：在 data/ 的语料上训练并保存 =====
def train_and_save(docs, vocab_size, out):
    """文档之间插入 <|endoftext|>，训练、保存，并报告压缩率（平均每个词元代表几个字节）。"""
    text, start = ENDOFTEXT.join(docs), time.perf_counter()
    tok = BPETokenizer(name=f"nfl-bpe-{vocab_size}").train(text, vocab_size, verbose=True)
    elapsed, num_bytes = time.perf_counter() - start, len(text.encode("utf-8"))
    tok.save(out, trained_on={"documents": len(docs), "bytes": num_bytes})
    # 压缩率 = 字节数 / 词元数：越大，同样长的上下文窗口装下的文字越多
    ids = tok.encode(text, allowed_special="all")
    short = "" if tok.n_vocab == vocab_size else f"；语料太小，合并不出要求的 {vocab_size} 个"
    print(f"训练用时 {elapsed:.1f}s，词表 {tok.n_vocab}（{len(tok.ranks)} 个普通词元 + 结束符{short}），"
          f"语料 {num_bytes / 1e3:.0f} KB -> {len(ids)} 个词元，压缩率 {num_bytes / len(ids):.2f} 字节/词元")
    print(f"已保存 {out}")


# ===== 7. 给 GPT 喂数据：滑动窗口 =====
class GPTDataset(Dataset):
    """把一长串词元切成许多 (输入, 目标) 对：目标就是输入整体右移一位——
    模型在每个位置都练习"根据前面的词元预测下一个"。窗口起点 0, stride, 2·stride, …"""

    def __init__(self, txt_or_ids, tokenizer, max_length, stride):
        if max_length < 1 or stride < 1:
            raise UserError(f"max_length 和 stride 必须是正整数（现在是 {max_length}、{stride}）")
        if isinstance(txt_or_ids, str):
            # 文档之间的 <|endoftext|> 要编成一个特殊 id，而不是当成十几个普通字符
            txt_or_ids = tokenizer.encode(txt_or_ids, allowed_special={ENDOFTEXT})
        # 整段存成一维 long 张量 (总词元数,)：nn.Embedding 要求索引是整数 long
        self.ids = torch.as_tensor(txt_or_ids, dtype=torch.long)
        if len(self.ids) < max_length + 1:
            raise UserError(f"文本只有 {len(self.ids)} 个词元，不够一个长度 {max_length} 的窗口（还要多 1 个当目标）")
        self.max_length, self.stride = max_length, stride

    def __len__(self):
        # 最后一个窗口的起点 s 必须满足 s + max_length + 1 <= 总长度
        return (len(self.ids) - self.max_length - 1) // self.stride + 1

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.stride  # 按需切片，不预先复制出所有窗口，省内存
        # 多取 1 个：长 max_length+1 的一段错开一位，就同时得到输入和目标
        chunk = self.ids[start:start + self.max_length + 1]
        # 两个都是 (max_length,)；DataLoader 堆成一批后是 (batch_size, max_length)
        return chunk[:-1], chunk[1:]


def create_dataloader(txt_or_ids, tokenizer=None, batch_size=4, max_length=256, stride=128,
                      shuffle=True, drop_last=True, num_workers=0, seed=None):
    """tokenizer 缺省时用项目分词器；stride < max_length 时窗口互相重叠。"""
    # 传进来的已经是 id 时用不到分词器，也就不去读文件
    if tokenizer is None and isinstance(txt_or_ids, str):
        tokenizer = load_project_tokenizer()
    dataset = GPTDataset(txt_or_ids, tokenizer, max_length, stride)
    # 给打乱单独一个随机数生成器：指定 seed 时每次顺序都相同，不受全局随机状态影响
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    # drop_last=True 会丢掉凑不满的最后一批：训练时每批形状都一样
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


# ===== 8. 演示 =====
def demo_simple_tokenizer(text):
    tok = SimpleTokenizer.from_text(text)
    # 𰻞（biáng）是极生僻的字，语料里不会有，正好用来演示生词
    sample = "Hello, 你好！我爱吃𰻞𰻞面。"
    ids = tok.encode(sample)
    unknown = [w for w in SIMPLE_PAT.findall(sample) if w not in tok.str_to_int]
    print(f"\n[简单分词] 词表 {len(tok.str_to_int)} 个词；{sample!r} -> {ids}")
    print(f"  解码：{tok.decode(ids)!r}。生词 {unknown} 都成了 {UNK}，空白也丢了，信息一去不回")


def demo_bpe_training(text, quick):
    # 维基百科 BPE 词条的经典例子；词表 = 256 个字节 + 合并 5 次 + 结束符；直白的训练器就够用
    toy = BPETokenizer().train("aaabdaaabac", 256 + 5 + 1, learn=learn_merges_naive)
    steps = [f"{toy.token_str(a)}+{toy.token_str(b)}" for (a, b), _ in toy.merges]
    print(f"\n[玩具 BPE] 'aaabdaaabac' 依次合并：{steps}；编码结果 {toy.encode('aaabdaaabac')}")
    # 两个训练器在同一小段语料上比速度：学到的合并逐条相同。增量版只要几十毫秒、易受打扰，取 3 次里最快的
    sample, vocab_size = text[:2_000 if quick else 4_000], 256 + 100 + 1
    slow, naive = _best_time(
        lambda: BPETokenizer().train(sample, vocab_size, learn=learn_merges_naive), 1)
    fast, tok = _best_time(lambda: BPETokenizer().train(sample, vocab_size), 3)
    print(f"[两个训练器] {len(sample.encode('utf-8')) / 1e3:.0f} KB 语料、合并 {len(tok.merges)} 次："
          f"每次重数 {slow:.2f}s，增量更新 {fast:.3f}s，快 {slow / fast:.0f} 倍；"
          f"合并逐条相同：{naive.merges == tok.merges}")
    text, vocab_size = text[:6_000] if quick else text, 512 if quick else 1024
    start = time.perf_counter()
    tok = BPETokenizer().train(text, vocab_size)
    learned = [tok.token_str(new) for _, new in tok.merges]
    # 挑出由多个汉字组成的词元：看 BPE 自己从语料里学到了哪些“词”
    words = [w for w in learned if len(w) > 1 and regex.fullmatch(r"\p{Han}+", w)]
    print(f"[BPE 训练] {len(text.encode('utf-8')) / 1e3:.0f} KB 语料，词表 {vocab_size}，"
          f"用时 {time.perf_counter() - start:.2f}s")
    print(f"  最早的合并（半个汉字的字节先凑成整字）：{learned[:8]}\n  最早学到的多字词元：{words[:12]}")


def demo_project_tokenizer(tok, text):
    ids = tok.encode(text, allowed_special="all")
    # 同一词表交给 tiktoken 再编一遍、逐 id 对比：验证从零实现的编码规则没写错
    same = ids == tok.to_tiktoken().encode(text, allowed_special="all")
    num_bytes = len(text.encode("utf-8"))
    print(f"\n[项目分词器] {tok.name}：语料 {num_bytes / 1e3:.0f} KB -> {len(ids)} 个词元，"
          f"{num_bytes / len(ids):.2f} 字节/词元；与 tiktoken 逐 id 一致：{same}")
    # 三个样例分别看：汉字串成段、数字每 3 位一段、英文词带着前导空格
    for sample in ("神经网络通过梯度下降学习参数。", "12345+678=13023", "Hello world!"):
        print(f"  {sample!r}：预分词 {tok.pattern.findall(sample)} -> "
              f"词元 {[tok.token_str(i) for i in tok.encode(sample)]}")


def demo_gpt2(text):
    try:
        gpt2 = get_gpt2_tokenizer()
    except UserError as err:
        print(f"\n[GPT-2 词表] 跳过：{err}")
        return
    ours, sample = BPETokenizer.from_tiktoken(gpt2), text[:20_000]  # 同一个类，只换了词表和切分正则
    same = ours.encode(sample, allowed_special="all") == gpt2.encode(sample, allowed_special="all")
    print(f"\n[GPT-2 词表] 从零实现装上 GPT-2 的 {gpt2.n_vocab} 个词元，{len(sample)} 个字符与 tiktoken "
          f"逐 id 一致：{same}；'Hello world' -> {ours.encode('Hello world')}")


def demo_data_and_embeddings(tok, text, args):
    max_length, batch_size, emb_dim = (8, 2, 16) if args.quick else (16, 4, 32)
    # stride = max_length：窗口首尾相接、互不重叠，每个词元只当一次输入
    loader = create_dataloader(text, tok, batch_size, max_length, stride=max_length, seed=args.seed)
    # inputs、targets 都是 (batch_size, max_length)
    inputs, targets = next(iter(loader))
    print(f"\n[滑动窗口] 窗口 {max_length}、步长 {max_length}：{len(loader.dataset)} 个样本，"
          f"一批输入 {tuple(inputs.shape)}\n  输入：{tok.decode(inputs[0].tolist())!r}"
          f"\n  目标：{tok.decode(targets[0].tolist())!r}（右移一位）")
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    inputs = inputs.to(device)
    tok_emb = nn.Embedding(tok.n_vocab, emb_dim).to(device)  # 每个词元 id 对应一行可学习的向量
    pos_emb = nn.Embedding(max_length, emb_dim).to(device)   # 每个位置也有一行：注意力不知道先后
    # 位置嵌入 (max_length, emb_dim) 加到 (batch, max_length, emb_dim) 上，自动广播到每个样本
    x = tok_emb(inputs) + pos_emb(torch.arange(max_length, device=device))  # (batch, 长度, emb_dim)
    print(f"[嵌入] 词元嵌入 {tuple(tok_emb(inputs).shape)} + 位置嵌入 "
          f"{tuple(pos_emb.weight.shape)}（按位置广播）= {tuple(x.shape)}")
    # 查表就是 one-hot 乘权重矩阵：one-hot 只有一个 1，相乘恰好取出那一行；查表省掉了大量乘零
    one_hot = F.one_hot(inputs, tok.n_vocab).float()  # (batch, max_length, vocab)
    # (batch, max_length, vocab) @ (vocab, emb_dim) -> (batch, max_length, emb_dim)
    same = torch.equal(one_hot @ tok_emb.weight, tok_emb(inputs))
    print(f"  one-hot {tuple(one_hot.shape)} @ 权重 {tuple(tok_emb.weight.shape)} 与查表完全相等：{same}")


# ===== 9. 主程序 =====
def build_parser():
    parser = ArgParser(description="01：文本 -> 词元 -> 向量；从零实现并训练字节级 BPE")
    parser.add_argument("--quick", action="store_true", help="冒烟模式：小规模演示，几秒跑完")
    parser.add_argument("--train", action="store_true",
                        help="只做一件事：在语料上重新训练项目分词器并写入 --out")
    parser.add_argument("--corpus", default=str(DATA_DIR / "corpus"),
                        help="语料：一个 .txt 文件，或递归读取其中 .txt 的目录（默认 data/corpus）")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help=f"--train 的词表大小，含结束符（默认 {DEFAULT_VOCAB_SIZE}，建议取 64 的倍数）")
    parser.add_argument("--out", default=str(DATA_DIR / "tokenizer.json"),
                        help="项目分词器文件：--train 写入它，演示读取它（默认 data/tokenizer.json）")
    parser.add_argument("--seed", type=int, default=123, help="随机种子：测速文本、数据打乱、嵌入初始化")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="嵌入演示用的设备：auto 按 cuda > mps > cpu 选（默认 auto）")
    return parser


def check_args(args):
    # 词表至少要装下 256 个单字节和结束符；上限是 tiktoken 与 uint32 token 缓存都能放下的量级
    check_range("--vocab-size", args.vocab_size, 258, 1_000_000)
    check_range("--seed", args.seed, 0, 2**32 - 1)


def run(args):
    check_args(args)
    docs = read_corpus(args.corpus)
    if args.train:
        prepare_output(args.out)  # 开工之前：输出目录不存在就建，建不了就现在报错
        train_and_save(docs, args.vocab_size, args.out)
        return
    # 演示按章节顺序：简单分词 -> BPE 训练 -> 项目分词器 -> GPT-2 词表 -> 数据与嵌入 -> 速度（进阶）
    # 演示只用语料开头约 30 万字节：道理完全一样，几秒跑完；完整的 2 MB 语料留给 --train
    text = ENDOFTEXT.join(docs)[:DEMO_CHARS]
    demo_simple_tokenizer(text)
    demo_bpe_training(text, args.quick)
    project = get_project_tokenizer(args.out, docs, args.quick)
    demo_project_tokenizer(project, text)
    demo_gpt2(text)
    demo_data_and_embeddings(project, text, args)
    demo_speed(project, docs, args)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as err:
        print(f"错误：{err}", file=sys.stderr)
        sys.exit(2)


# ===== 进阶：公共工具的细节（读语料、找 GPT-2 词表、读项目分词器、选设备、检查输出） =====
# 这几件是管道活，与分词的道理无关；ArgParser、check_range、get_gpt2_tokenizer、
# load_project_tokenizer、resolve_device 被后面各章逐字复制。


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


def read_corpus(path):
    """path 是 .txt 文件或目录（递归读取其中全部 .txt，按相对路径排序）；每个文件是一篇文档。"""
    path = Path(path)
    if path.is_dir():
        # 按相对路径排序：rglob 的返回顺序随文件系统而变，排好序语料顺序和训练结果才可复现
        files = sorted(path.rglob("*.txt"), key=lambda p: p.relative_to(path).as_posix())
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"找不到语料 {path}：请用 --corpus 指定一个 .txt 文件或包含 .txt 的目录")
    try:
        # 显式写 UTF-8：中文 Windows 的默认编码是 GBK，不写就可能读出乱码或报错
        docs = [f.read_text(encoding="utf-8") for f in files]
    except UnicodeDecodeError as err:
        raise UserError(f"语料不是 UTF-8 编码：{err}") from None
    # 全是空白也算空：否则后面会训练出一个什么都没学到的词表
    if not any(doc.strip() for doc in docs):
        raise UserError(f"语料 {path} 是空的：里面没有任何非空的 .txt 文本")
    return docs


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


def get_project_tokenizer(path, docs, quick):
    if Path(path).is_file():
        return BPETokenizer.load(path)
    # 没有文件也能继续演示：临时训练一个；--quick 用小词表，几秒内训练完
    vocab_size = 512 if quick else DEFAULT_VOCAB_SIZE
    print(f"\n（没有找到 {path}，临时训练一个词表 {vocab_size} 的分词器；用 --train 保存）")
    return BPETokenizer(name=f"nfl-bpe-{vocab_size}").train(ENDOFTEXT.join(docs), vocab_size)


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


def prepare_output(path):
    """--train 开工之前先确认能写 path：训练几秒后才发现目录不存在，结果就白算了。"""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path} 是一个目录：请给出文件路径，如 {path / 'tokenizer.json'}")
    try:  # 目录不存在就建出来；路径上有同名的文件、没有权限时建不出来
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        raise UserError(f"无法创建输出目录 {path.parent}：路径上有同名文件，或没有权限") from None
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"输出目录 {path.parent} 不可写：请换一个 --out")


# ===== 进阶：让纯 Python 接近 tiktoken =====
# 第一遍读可以跳过这一节：本章的 BPETokenizer 已经完整、正确。这里的 FastBPETokenizer 编出的 ids
# 与它逐个相同（测试对两者都和 tiktoken 逐 id 比对），只是把编码的内部实现换成了快的写法：
# 在 C 里跑的扫描合并、长片段用堆合并、存成数组的片段缓存、以及一次合并几万个片段的 numpy 批量编码。
# 下面几个常量只影响速度：长片段阈值、批量阈值换成别的值，编出的 id 也完全相同
_NO_MERGE = (1 << 31) - 1                  # "这两段拼起来不是词元"，比任何 rank 都大；放得进 numpy 的 int64 高 32 位
_BYTES = [bytes([i]) for i in range(256)]  # 预先做好的单字节 bytes，省得反复创建
_LONG_PIECE = 256                          # 超过这么多字节的片段改用堆来合并
_BATCH_MIN = 64                            # 一次遇到这么多没见过的片段，才值得交给 numpy 批量合并


def _char_windows(token):
    """词元内部每个字符边界两侧的（左片段, 右片段）。UTF-8 里 10xxxxxx 是续字节，其余字节是字符开头。"""
    # 例：b'ab' -> [(b'a', b'b')]；单个汉字只有一个字符，没有内部边界，返回空列表
    # 词元开头可能是半个字符（续字节），这时第一个“字符”只是几个字节的残片
    starts = [i for i, byte in enumerate(token) if i == 0 or not 0x80 <= byte < 0xC0]
    ends = starts[1:] + [len(token)]
    return [(token[a:b], token[b:c]) for a, b, c in zip(starts, ends, ends[1:])]


# ---- 批量编码（见 FastBPETokenizer 里"批量编码"的说明）用到的 numpy 小工具 ----
def _sorted_table(keys, values):
    """键值对 -> 按键排好序的两个数组，供 _lookup 二分查找；末尾放一个比任何键都大的哨兵，
    查不到的键落在它上面，不会越界。"""
    keys, values = np.array(keys, np.int64), np.array(values, np.int64)
    order = np.argsort(keys)
    return np.append(keys[order], np.iinfo(np.int64).max), np.append(values[order], 0)


def _lookup(table, query, default):
    """向量化查表：query 里每个键对应的值，查不到的给 default。"""
    keys, values = table
    at = np.searchsorted(keys, query)  # 二分查找，全部查询一次在 C 里做完
    return np.where(keys[at] == query, values[at], default)


# 1~4 个字节的串 -> 一个整数键：字节按大端拼成整数，长度放在高位（区分 b'a' 和 b'\x00a'）
def _bytes_key(grid):
    """grid 的每一行是一串等长的字节（取值 0..255 的整数）：一次算出所有行的键。"""
    key = np.full(len(grid), grid.shape[1] << 32, np.int64)
    for k in range(grid.shape[1]):
        key |= grid[:, k] << (8 * (grid.shape[1] - 1 - k))
    return key


def _fragment_table(ranks):
    """{不超过 4 个字节的串: rank} -> _lookup 用的表（键与 _bytes_key 相同）；更长的串用不到，跳过。"""
    short = [(frag, rank) for frag, rank in ranks.items() if len(frag) <= 4]
    return _sorted_table([len(frag) << 32 | int.from_bytes(frag, "big") for frag, _ in short],
                         [rank for _, rank in short])


def _in_order(seg, sizes, ids):
    """ids 是若干小段的结果按任意顺序首尾相接，seg/sizes 是它们的段号和长度（段号恰好是 0..n-1）。
    返回按段号顺序重排后的 ids 和各段长度。"""
    final = np.zeros(len(seg), np.int64)
    final[seg] = sizes
    out = np.empty(len(ids), np.int64)
    out[_ragged((np.cumsum(final) - final)[seg], sizes)] = ids
    return out, final


def _ragged(offsets, lengths):
    """把 table[offsets[k] : offsets[k] + lengths[k]] (k = 0, 1, ...) 首尾相接时要取的下标。"""
    # 例：offsets=[5, 0]、lengths=[2, 3] -> [5, 6, 0, 1, 2]
    out_starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum())) + np.repeat(offsets - out_starts, lengths)


class FastBPETokenizer(BPETokenizer):
    """与 BPETokenizer 逐 id 相同的编码器：训练、解码、保存都继承下来，只重写编码的内部实现。"""

    def _rebuild(self):
        """在父类的解码表之外，再建编码加速用的查表。"""
        super()._rebuild()
        # 批量编码用的查表（见下面"批量编码"），都做成 _lookup 用的有序数组：
        # _leave[片段] = 这个片段后面紧跟字符边界的词元里最小的 rank，_enter[片段] = 紧跟在字符边界
        # 后面的；跨过某条字符边界的词元，rank 不会小于这两者。片段不超过 4 个字节（一个字以内）
        leave, enter = {}, {}
        for tok, rank in self.ranks.items():
            for left, right in _char_windows(tok):
                leave[left] = min(rank, leave.get(left, _NO_MERGE))
                enter[right] = min(rank, enter.get(right, _NO_MERGE))
        self._leave, self._enter = _fragment_table(leave), _fragment_table(enter)
        # 多字节的短词元：字内合并可能用到它们
        self._short_tokens = _fragment_table({t: r for t, r in self.ranks.items() if len(t) > 1})
        # 字节 -> 它的 rank（GPT-2 里不等于字节值）
        self._byte_ids = np.array([self.ranks.get(b, -1) for b in _BYTES], np.int64)
        # 文字 -> rank：查"整个片段是不是词元"时不必先把片段编码成字节（半个字的词元不会是整个片段）
        texts = (tok.decode("utf-8", "replace") for tok in self.ranks)
        self._text_ranks = {text: rank for text, (tok, rank) in zip(texts, self.ranks.items())
                            if text.encode("utf-8") == tok}
        # (左 id, 右 id) -> 两者拼起来的 rank：列出每个词元所有"两个词元拼成它"的拆法
        keys, values = [], []
        for tok, rank in self.ranks.items():
            for cut in range(1, len(tok)):
                left, right = self.ranks.get(tok[:cut]), self.ranks.get(tok[cut:])
                if left is not None and right is not None:
                    keys.append(left << 32 | right)
                    values.append(rank)
        self._pairs = _sorted_table(keys, values)

    def clear_cache(self):
        # 片段缓存只为提速，清空不影响结果。它不给每个片段存一个列表（建几万个小列表本身就慢）：
        # _cache[片段] = 编号 k，第 k 个片段的 ids 是 _ids[_starts[k] : _starts[k] + _lengths[k]]
        self._cache, self._ids, self._starts, self._lengths = {}, array("q"), array("q"), array("q")

    def _remember(self, pieces, ids, lengths):
        """把一批片段的结果存进缓存：ids 是各片段的 ids 首尾相接，lengths 是各片段的词元数。"""
        lengths = np.asarray(lengths, np.int64)
        self._cache.update(zip(pieces, range(len(self._starts), len(self._starts) + len(pieces))))
        self._starts.frombytes((np.cumsum(lengths) - lengths + len(self._ids)).tobytes())
        self._lengths.frombytes(lengths.tobytes())
        self._ids.frombytes(np.asarray(ids, np.int64).tobytes())

    def merge_piece(self, data):
        """与父类同一规则、同样的结果：短片段在 C 里扫描（_merge_scan），长片段用堆（_merge_long）。"""
        rank = self.ranks.get(data)  # 整个片段就是词元：tiktoken 的捷径
        if rank is not None:
            return [rank]
        return self._merge_long(data) if len(data) > _LONG_PIECE else self._merge_scan(data)

    def _merge_scan(self, data):
        """父类 merge_piece 的同一个循环，改用在 C 里跑的 map 和末尾的哨兵：省掉 Python 层的逐项循环。"""
        get = self.ranks.get
        parts = list(map(_BYTES.__getitem__, data))
        # pair_rank[i] = parts[i] 和 parts[i+1] 拼起来的 rank；末尾放一个哨兵
        pair_rank = list(map(get, map(bytes.__add__, parts, parts[1:]), repeat(_NO_MERGE)))
        pair_rank.append(_NO_MERGE)
        while True:
            best = min(pair_rank)  # min/index 都在 C 里跑，比 Python 循环找最小值快一个数量级
            if best == _NO_MERGE:
                break
            # index 返回第一个最小值：rank 并列时取最左的对，与 tiktoken 一致
            i = pair_rank.index(best)
            # 第 i、i+1 两段并成一段；pair_rank 同步删掉一项，两个列表的下标继续对齐
            parts[i] += parts.pop(i + 1)
            del pair_rank[i]
            if i:  # 只有新段左右两个相邻对变了
                pair_rank[i - 1] = get(parts[i - 1] + parts[i], _NO_MERGE)
            if i < len(parts) - 1:
                pair_rank[i] = get(parts[i] + parts[i + 1], _NO_MERGE)
        # 停下时每一段都是词元（单字节本来就是词元），所以查表一定查得到
        return list(map(self.ranks.__getitem__, parts))

    def _merge_long(self, data):
        """同样的规则，用于很长的片段（如几千个空格）：上面每步都扫一遍整个列表，是 O(n²)；
        这里把相邻对放进堆（键 = (rank, 起始字节位置)，取出的就是 rank 最小且最靠左的），
        各段用双向链表相连，合并后只压入新出现的两个对，旧条目取出时发现对不上就跳过。"""
        get, n = self.ranks.get, len(data)
        parts = list(map(_BYTES.__getitem__, data))  # parts[i]：从第 i 个字节开始的段；被并掉则为 None
        # nxt[i] / prv[i]：段 i 的后一段 / 前一段的起点；n 和 -1 表示到头了
        nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
        # 只放能合并的对（rank 不是 None）
        heap = [(r, i) for i, r in enumerate(map(get, map(bytes.__add__, parts, parts[1:])))
                if r is not None]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            if parts[i] is None or j == n or get(parts[i] + parts[j]) != rank:
                continue  # 过期条目
            # 把段 j 并进段 i，再从链表里摘掉 j：O(1)，不像 list.pop 要挪动后面所有元素
            parts[i] += parts[j]
            parts[j], nxt[i] = None, nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            # 合并后变了的只有（前一段, i）和（i, 后一段）两个对，压入它们的新 rank
            for left in (prv[i], i):
                if left >= 0 and nxt[left] < n:
                    rank = get(parts[left] + parts[nxt[left]])
                    if rank is not None:
                        heapq.heappush(heap, (rank, left))
        # 被并掉的位置是 None，跳过它们，剩下的按顺序就是各段
        return [self.ranks[part] for part in parts if part is not None]

    def _encode_text(self, text):
        pieces = self.pattern.findall(text)
        if not pieces:
            return []
        # 缓存太大就整个清空：比 LRU 简单，常见片段很快又会被缓存回来
        if len(self._cache) > _CACHE_LIMIT:
            self.clear_cache()
        new = list(set(pieces).difference(self._cache))  # 只有没见过的片段才需要真正去合并
        if len(new) < _BATCH_MIN:  # 少量片段：逐个合并，省掉 numpy 的固定开销
            results = list(map(self.merge_piece, map(str.encode, new)))
            self._remember(new, list(chain.from_iterable(results)), list(map(len, results)))
        else:
            self._encode_batch(new)
        # 按原顺序取出每个片段的编号，再一次性从 _ids 里取出各自那一截、首尾相接
        which = np.fromiter(map(self._cache.__getitem__, pieces), np.int64, len(pieces))
        # frombuffer 不复制数据，直接把 array 的内存当作 numpy 数组来读
        starts = np.frombuffer(self._starts, np.int64)[which]
        lengths = np.frombuffer(self._lengths, np.int64)[which]
        return np.frombuffer(self._ids, np.int64)[_ragged(starts, lengths)].tolist()

    # ---- 批量编码：大段文本时，纯 Python 也能接近 tiktoken ----
    # 逐个片段合并时，每合并一次都要跑一圈 Python 循环；没见过的片段成千上万，慢在这里。三步提速：
    # 1) 字先在字内合并完。设字 c 单独合并时用到的 rank 都不超过 inner(c)（c 内各多字节子串词元
    #    rank 的最大值），而跨过 c 两侧边界的词元 rank 都至少是 cross(c)。若 inner(c) < cross(c)：
    #    c 没合并完时，它下一步的字内合并总比任何跨边界合并优先，所以 c 一定先独立合并完，才会和
    #    邻居相连。于是直接从"c 单独合并的结果"出发，结果与从字节出发完全一样（每个字单独判断，
    #    不满足的字照旧从字节出发）。项目词表里常用汉字本身就是词元，一个字 3 个字节变成 1 段。
    # 2) 拆成互不相干的小段。两个相邻的字之间若没有任何词元能跨过，它们永远不会合到一起：
    #    各自独立合并即可。GPT-2 词表几乎没有跨两个汉字的词元，汉字串就拆成了一个个单字，
    #    单字小段就是这个字单独合并的结果，什么都不用再做。
    # 3) 一轮处理所有小段。把所有小段排进一个 numpy 数组，每一轮让每个小段各做一次"它自己 rank
    #    最小（并列取最左）的合并"——每段内部的合并顺序与逐个合并完全相同，只是几万段同时做。
    # 以上用到的查表都做成"有序键数组 + 二分查找"（_lookup），一次查几十万个键也只是几次 numpy 调用。
    def _char_table(self, chars):
        """chars：一批不同的字（字符串）。返回每个字的 inner、进入它的词元 rank 下界 k_in、离开它的
        下界 k_out，以及它的两种写法：单独合并的结果、各个字节（都是"表, 起点, 长度"三个数组）。"""
        codes = np.frombuffer("".join(chars).encode("utf-32-le"), np.uint32)
        size = 1 + (codes >= 0x80) + (codes >= 0x800) + (codes >= 0x10000)  # UTF-8 字节数
        raw = np.frombuffer("".join(chars).encode("utf-8"), np.uint8).astype(np.int64)
        first = np.cumsum(size) - size
        grid = np.zeros((len(chars), 4), np.int64)  # grid[c, k] = 第 c 个字的第 k 个字节
        for k in range(4):
            grid[size > k, k] = raw[first[size > k] + k]
        inner = np.full(len(chars), -1, np.int64)
        k_in = np.full(len(chars), _NO_MERGE, np.int64)
        k_out = k_in.copy()
        for i in range(4):
            for j in range(i + 1, 5):  # 子串 grid[:, i:j]，只对够长的字有意义
                rows = np.flatnonzero(size >= j)
                key = _bytes_key(grid[rows, i:j])
                if j - i >= 2:  # 多字节子串：字内合并可能用到的词元
                    inner[rows] = np.maximum(inner[rows], _lookup(self._short_tokens, key, -1))
                if i == 0:      # 前缀：从左边进入这个字的词元会含它
                    k_in[rows] = np.minimum(k_in[rows], _lookup(self._enter, key, _NO_MERGE))
                ends = size[rows] == j  # 后缀：从这个字离开到右边的词元会含它
                k_out[rows[ends]] = np.minimum(k_out[rows[ends]],
                                               _lookup(self._leave, key[ends], _NO_MERGE))
        byte_ids = self._byte_ids[raw]
        # 单独合并：有多字节子串是词元的字才可能合并，把它们当作一个个小段一起合并
        busy = np.flatnonzero(inner >= 0)
        merged, merged_len = self._merge_segments(byte_ids[_ragged(first[busy], size[busy])],
                                                  np.cumsum(size[busy]) - size[busy])
        alone_len = size.copy()
        alone_len[busy] = merged_len
        alone = np.concatenate([byte_ids, merged])  # 没合并的字直接指向它的字节
        alone_first = first.copy()
        alone_first[busy] = len(byte_ids) + np.cumsum(merged_len) - merged_len
        return inner, k_in, k_out, (alone, alone_first, alone_len), (byte_ids, first, size)

    def _pair_ranks(self, left, right):
        """向量化查表：left[k]、right[k] 两个词元拼起来的 rank，不是词元则为 _NO_MERGE。"""
        return _lookup(self._pairs, left << 32 | right, _NO_MERGE)

    def _merge_segments(self, ids, starts):
        """对每个小段 ids[starts[s] : starts[s+1]] 执行合并规则。返回（各段结果按段的顺序首尾相接,
        各段的词元数）。每一轮每段合并一次，合并完的段移出数组。"""
        if not len(starts):
            return ids[:0], starts[:0]
        # pair[k] = 第 k、k+1 两项拼起来的 rank；每段最后一项的右边没有对
        pair = np.full(len(ids), _NO_MERGE, np.int64)
        inside = np.ones(len(ids), bool)
        inside[np.append(starts[1:], len(ids)) - 1] = False
        k = np.flatnonzero(inside)
        pair[k] = self._pair_ranks(ids[k], ids[k + 1])
        seg = np.arange(len(starts))  # 还在合并的各小段原来是第几段
        done = []                     # 每项：(段号, 各段词元数, 这些段的 ids)
        position = np.arange(len(ids))
        while len(starts):
            sizes = np.diff(starts, append=len(ids))
            # 键 = rank × 2^32 + 位置：每段取最小的键，就同时得到最小 rank 和（并列时）最左的位置
            best = np.minimum.reduceat((pair << 32) | position[:len(ids)], starts)
            rank, at = best >> 32, best & 0xFFFFFFFF
            finished = rank == _NO_MERGE  # 没有可合并的对：这段已是最终结果，移出去
            drop = np.repeat(finished, sizes)
            if finished.any():
                done.append((seg[finished], sizes[finished], ids[drop]))
            live = ~finished
            seg, rank, at, starts = seg[live], rank[live], at[live], starts[live]
            # 其余每段把 at、at+1 两项并成一项：新 id 就是这个对的 rank，第 at+1 项删掉
            ids[at] = rank
            drop[at + 1] = True
            ids, pair = ids[~drop], pair[~drop]
            # 位置 p 及之前删掉了 shift[p] 项：留下来的项都前移这么多
            shift = np.cumsum(drop)
            at, starts = at - shift[at], starts - shift[starts]
            # 只有新项与左右邻居的两个对变了
            pair[at] = _NO_MERGE
            right = at[at + 1 < np.append(starts[1:], len(ids))]
            pair[right] = self._pair_ranks(ids[right], ids[right + 1])
            left = at[at > starts] - 1
            pair[left] = self._pair_ranks(ids[left], ids[left + 1])
        return _in_order(*(np.concatenate(column) for column in zip(*done)))

    def _encode_batch(self, new):
        """把一批没见过的片段编码、存进缓存：整段是词元的、很长的照旧处理，其余一起批量合并。"""
        # 下面都用 map/compress 在 C 里逐项处理：几万个片段，Python 循环每一趟都要好几毫秒
        ranks = list(map(self._text_ranks.get, new))
        found = list(map(operator.is_not, ranks, repeat(None)))
        # 整段就是词元的：直接存（tiktoken 的规则）
        self._remember(list(compress(new, found)), list(compress(ranks, found)), [1] * sum(found))
        rest = list(compress(new, map(operator.not_, found)))
        # 很长的片段（轮数 = 段内合并次数，太长会拖慢所有轮）单独用堆合并；一个字最多 4 个字节
        sizes = list(map(len, rest))
        short = list(map(operator.le, sizes, repeat(_LONG_PIECE // 4)))
        long = list(compress(rest, map(operator.not_, short)))
        results = [self._merge_long(piece.encode("utf-8")) for piece in long]
        self._remember(long, list(chain.from_iterable(results)), list(map(len, results)))
        pieces = list(compress(rest, short))
        lengths = np.array(list(compress(sizes, short)), np.int64)
        if not pieces:
            return
        # 每个位置是第几种字：先找出不同的字，再用"码位 -> 编号"的大表一次查完
        text = "".join(pieces)
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        chars = list(set(text))
        number = np.zeros(0x110000, np.int32)  # 全部 Unicode 码位；np.zeros 只在用到的页上真正分配内存
        number[np.frombuffer("".join(chars).encode("utf-32-le"), np.uint32)] = np.arange(len(chars))
        which = number[codes]
        inner, k_in, k_out, alone, raw = self._char_table(chars)
        # cross[i]：跨过第 i 个字左边那条边界的词元，rank 至少多大；片段开头没有边界，记 _NO_MERGE
        piece_start = np.zeros(len(codes), bool)
        piece_start[np.cumsum(lengths) - lengths] = True
        cross = np.maximum(np.append(_NO_MERGE, k_out[which[:-1]]), k_in[which])
        cross[piece_start] = _NO_MERGE
        cross_after = np.append(cross[1:], _NO_MERGE)
        premerged = inner[which] < np.minimum(cross, cross_after)  # 第 1) 步的条件
        # 第 2) 步：小段从"左边没有词元能跨过"的字开始；两侧都跨不过的字自成一段，结果就是单独合并的结果
        seg_first = cross == _NO_MERGE
        single = seg_first & (cross_after == _NO_MERGE)
        # 其余的字按条件挑一种写法（单独合并的结果或各个字节）接起来，交给第 3) 步
        rest_chars = np.flatnonzero(~single)
        table = np.concatenate([alone[0], raw[0]])
        form_first = np.where(premerged, alone[1][which], len(alone[0]) + raw[1][which])[rest_chars]
        form_len = np.where(premerged, alone[2][which], raw[2][which])[rest_chars]
        part_first = np.cumsum(form_len) - form_len
        merged, merged_len = self._merge_segments(table[_ragged(form_first, form_len)],
                                                  part_first[seg_first[rest_chars]])
        # 两类小段按原来的顺序放回去，再按片段数一数每个片段有几个词元
        seg_number = np.cumsum(seg_first) - 1
        ones = which[single]
        ids, seg_len = _in_order(
            np.concatenate([seg_number[single], seg_number[rest_chars[seg_first[rest_chars]]]]),
            np.concatenate([alone[2][ones], merged_len]),
            np.concatenate([alone[0][_ragged(alone[1][ones], alone[2][ones])], merged]))
        seg_piece = (np.cumsum(piece_start) - 1)[seg_first]
        self._remember(pieces, ids, np.bincount(seg_piece, weights=seg_len, minlength=len(pieces)))


# ---- 与 tiktoken 比速度 ----
def _docstrings(num_bytes):
    """Python 标准库里的英文文档字符串：现成、够多、和我们的语料毫无关系。"""
    out, size = [], 0
    # os.__file__ 所在的目录就是标准库目录，任何装了 Python 的机器上都有
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        # 模块、类、函数都可能带文档字符串；ast.walk 会走遍嵌套在里面的定义
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        nodes = (node for node in ast.walk(tree) if isinstance(node, kinds))
        for doc in filter(None, map(ast.get_docstring, nodes)):
            out.append(doc)
            size += len(doc.encode("utf-8"))
            if size >= num_bytes:
                return out
    return out


def make_benchmark_text(docs, num_bytes, seed):
    """约 num_bytes 字节的中英混合文本：一半英文文档字符串；一半中文，每句由语料里随机两个分句
    各取一截拼成——不是把训练语料原样重复，编码器的缓存占不到便宜。"""
    rng = random.Random(seed)
    # 按中文标点切成分句，标点留在分句末尾
    clauses = regex.findall(r"[^，。！？；：\n]+[，。！？；：\n]*", "\n".join(docs))
    chinese, size = [], 0
    while size < num_bytes // 2:
        a, b = rng.choice(clauses), rng.choice(clauses)
        # a 取开头一截（至少 1 个字）、b 取结尾一截，拼出语料里没有的句子
        sentence = a[:rng.randint(1, max(1, len(a) - 1))] + b[rng.randint(0, len(b) - 1):]
        chinese.append(sentence)
        size += len(sentence.encode("utf-8"))
    # 每 8 句中文合成一段，再和英文段落一起打乱：中英交错，更像真实输入
    paragraphs = _docstrings(num_bytes // 2) + ["".join(chinese[i:i + 8])
                                                for i in range(0, len(chinese), 8)]
    rng.shuffle(paragraphs)
    return "\n\n".join(paragraphs)


def _best_time(fn, repeats, setup=lambda: None):
    # 取多次里最快的一次：慢的那几次多半是被系统里别的程序打扰，最快的最接近真实开销
    best = float("inf")
    for _ in range(repeats):
        setup()  # 准备工作（清空缓存）不计时
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def benchmark(ours, reference, text, label, repeats=3):
    """单线程 encode_ordinary 计时（各取最快一次）；我们的编码器每次计时前都清空缓存。"""
    ref_time, ref_ids = _best_time(lambda: reference.encode_ordinary(text), repeats)
    cold_time, ids = _best_time(lambda: ours.encode_ordinary(text), repeats, ours.clear_cache)
    # 紧接着再跑一次，此时缓存里已有全部片段：看缓存能帮多大的忙
    warm_time, _ = _best_time(lambda: ours.encode_ordinary(text), 1)
    print(f"  {label}：{len(text.encode('utf-8')) / 1e6:.2f} MB，tiktoken {ref_time:.3f}s；从零实现 "
          f"{cold_time:.3f}s（缓存为空，{cold_time / ref_time:.1f} 倍）/ {warm_time:.3f}s"
          f"（缓存已热，{warm_time / ref_time:.1f} 倍）；ids 一致：{ids == ref_ids}")
    return cold_time / ref_time, ids == ref_ids


def demo_speed(project, docs, args):
    text = make_benchmark_text(docs, 100_000 if args.quick else 1_000_000, args.seed)
    print("\n[速度（进阶）] 同一段没见过的中英混合文本，FastBPETokenizer（纯 Python + numpy）"
          "vs tiktoken（Rust）：")
    fast = FastBPETokenizer(project.ranks, project.pat_str, project.special_tokens, project.name)
    benchmark(fast, project.to_tiktoken(), text, "项目分词器")
    try:
        gpt2 = get_gpt2_tokenizer()
    except UserError as err:
        print(f"  跳过 GPT-2 对比：{err}")
        return
    # GPT-2 词表几乎没有跨两个汉字的词元：汉字串被切成单字分别合并，缓存很容易命中
    benchmark(FastBPETokenizer.from_tiktoken(gpt2), gpt2, text, "GPT-2 词表")



if __name__ == "__main__":
    main()
