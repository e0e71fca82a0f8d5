"""检查语料是不是"人写的文章"，而不是模板拼出来的：
  1. 8 个字符以上的句子不能出现两次（模板最先露馅的地方：同一句话换个名字反复出现）；
  2. 字符 12-gram 里重复出现的不到 2%（重复的位置 ÷ 全部位置；换词不换句式的模板会让它飙升）；
  3. zlib 压缩比不超过 2.6（重复越多越好压；同一份内容复制几遍，压缩比会成倍上升）。
用法：python data/check_corpus.py [目录或 .txt ...]   # 默认检查 data/corpus；不合格时以状态码 1 退出
"""
import re
import sys
import zlib
from collections import Counter
from pathlib import Path

MIN_SENTENCE = 8      # 短句（"他点点头。"）在真实文章里本来就会重复，不算
NGRAM = 12
MAX_NGRAM_REPEAT = 0.02
MAX_ZLIB_RATIO = 2.6
SENTENCE_END = re.compile(r"(?<=[。！？!?…；;])|\n")


def read_texts(paths):
    files = []
    for path in map(Path, paths):
        files += sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    return {f: f.read_text(encoding="utf-8") for f in files}


def repeated_sentences(texts):
    """{句子: 出现次数}，只列出现两次以上、去掉首尾空白后不短于 MIN_SENTENCE 个字符的句子。"""
    counts = Counter()
    for text in texts.values():
        for sentence in SENTENCE_END.split(text):
            sentence = sentence.strip().strip("“”\"'「」")
            if len(sentence) >= MIN_SENTENCE:
                counts[sentence] += 1
    return {s: n for s, n in counts.items() if n > 1}


def ngram_repeat_rate(texts, n=NGRAM):
    """重复的 n-gram 位置占全部位置的比例。空白不计（段落之间的换行不该算作重复）。"""
    counts = Counter()
    for text in texts.values():
        flat = re.sub(r"\s+", "", text)
        counts.update(flat[i:i + n] for i in range(len(flat) - n + 1))
    total = sum(counts.values())
    return sum(c for c in counts.values() if c > 1) / max(total, 1)


def zlib_ratio(texts):
    raw = "\n".join(texts.values()).encode("utf-8")
    return len(raw) / max(len(zlib.compress(raw, 9)), 1)


def check(paths):
    """返回 (报告行列表, 是否合格)。"""
    texts = read_texts(paths)
    size = sum(len(t.encode("utf-8")) for t in texts.values())
    repeats = repeated_sentences(texts)
    rate, ratio = ngram_repeat_rate(texts), zlib_ratio(texts)
    ok = not repeats and rate < MAX_NGRAM_REPEAT and ratio <= MAX_ZLIB_RATIO
    lines = [f"{len(texts)} 个文件，{size:,} 字节",
             f"重复出现的长句（≥{MIN_SENTENCE} 字）：{len(repeats)} 句",
             f"重复的 {NGRAM}-gram：{rate:.2%}（上限 {MAX_NGRAM_REPEAT:.0%}）",
             f"zlib 压缩比：{ratio:.2f}×（上限 {MAX_ZLIB_RATIO}×）"]
    lines += [f"  重复 {n} 次：{s[:60]}" for s, n in sorted(repeats.items())[:20]]
    return lines, ok


def main(argv=None):
    paths = (argv if argv is not None else sys.argv[1:]) or [Path(__file__).parent / "corpus"]
    lines, ok = check(paths)
    print("\n".join(lines))
    print("合格" if ok else "不合格")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
