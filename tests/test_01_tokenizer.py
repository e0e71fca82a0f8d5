"""01_tokenizer.py 的测试：从零实现的 BPE 与 tiktoken 逐 id 一致、训练正确且可复现、数据窗口、坏输入。"""
import random
import time
from collections import Counter

import pytest
import regex

from conftest import ROOT, load_script, run_standalone, skip_or_fail

mod = load_script("01_tokenizer.py")
EOT = mod.ENDOFTEXT
COMMITTED = ROOT / "data" / "tokenizer.json"

VARIED_TEXTS = [
    "",
    "Hello world! It's a test, isn't it? I'm sure they'll say we've done it.",
    "神经网络通过梯度下降学习参数，损失函数越来越小。",
    "def f(x):\n    return x ** 2  # 平方\n\n\tprint(f(3))\n",
    "emoji 😀👍🏽 👨‍👩‍👧 🇨🇳 ❤️ ✨",
    "1234567890 3.14159 2024-05-01 ０１２３ 12,345,678 1e-9 99+1=100",
    "   leading and trailing   ",
    "\n\n\nnewlines\n\n\n",
    "tabs\t\t\tand  spaces    mixed \t \n \t",
    " " * 3000,
    "\r\n windows line endings \r\n",
    "混合 mixed 文本 text，标点。“引号”（括号）【方括号】",
    "Ünïcödé façade naïve — em dash … ellipsis",
    "Привет мир, Γειά σου κόσμε, مرحبا بالعالم, नमस्ते दुनिया, 안녕하세요, こんにちは世界",
    "\x00\x01\x1f\x7f control \u200b zero width \u00a0nbsp \u3000全角空格",
    "'s 'S 'll 'LL don't DON'T",
    "a" * 300 + "中" * 200 + "!" * 50,
    "https://example.com/path?q=1&r=2#frag",
    "龘靐齉爩 生僻字",
    "计算机把文字存成字节：UTF-8 里一个汉字占 3 个字节。",
    "".join(random.Random(0).choice("abcdefgh") for _ in range(3000)),  # 超长片段：走堆合并
]
SPECIAL_TEXTS = [
    EOT, f"a{EOT}b", f"前{EOT}后{EOT}", EOT * 3, "<|endoftext", f"  {EOT}  ", f"\n{EOT}\n 中文",
]


def random_texts(count, seed):
    """随机拼出各类字符混杂的字符串：谁也没有事先挑过它们。"""
    rng = random.Random(seed)
    pools = [
        lambda: rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"),
        lambda: rng.choice("0123456789"), lambda: rng.choice([" ", "  ", "\t", "\n", "\r\n"]),
        lambda: rng.choice("!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~'"),
        lambda: chr(rng.randint(0x4E00, 0x9FA5)), lambda: rng.choice("，。！？、；：“”（）《》"),
        lambda: chr(rng.randint(0x1F600, 0x1F64F)), lambda: rng.choice("éüñçßαβγδабвг０１２"),
        lambda: rng.choice(["'s", "'ll", "'T", EOT, "<|", "|>", "\u00a0", "\u3000", "\u200d"]),
        lambda: chr(rng.choice([rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])),  # 任意码位
    ]
    return ["".join(rng.choice(pools)() for _ in range(rng.randint(0, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def project():
    """(从零实现, tiktoken) 两个版本的项目分词器，都从提交的 data/tokenizer.json 读取。"""
    return mod.BPETokenizer.load(COMMITTED), mod.load_project_tokenizer(COMMITTED)


@pytest.fixture(scope="module")
def gpt2():
    try:
        enc = mod.get_gpt2_tokenizer()
    except mod.UserError as err:
        skip_or_fail(f"没有 GPT-2 词表：{err}")
    return mod.BPETokenizer.from_tiktoken(enc), enc


def assert_same_ids(ours, ref, texts):
    for text in texts:
        ids = ours.encode_ordinary(text)
        assert ids == ref.encode_ordinary(text), f"与 tiktoken 不一致：{text[:60]!r}"
        assert ours.decode(ids) == text, f"解码没有还原：{text[:60]!r}"


def assert_same_special_handling(ours, ref, texts):
    for text in texts:
        for allowed in ("all", {EOT}):
            assert ours.encode(text, allowed_special=allowed) == \
                ref.encode(text, allowed_special=allowed), text
        assert ours.encode(text, disallowed_special=()) == ref.encode(text, disallowed_special=())
        assert ours.decode(ours.encode(text, allowed_special="all")) == text
        if EOT in text:  # 默认不允许：两边都要报 ValueError，且都指出是哪个特殊词元
            with pytest.raises(ValueError) as ours_err:
                ours.encode(text)
            with pytest.raises(ValueError) as ref_err:
                ref.encode(text)
            assert repr(EOT) in str(ours_err.value) and repr(EOT) in str(ref_err.value)
        else:
            assert ours.encode(text) == ref.encode(text)


def test_project_bpe_matches_tiktoken_on_varied_text(project):
    assert_same_ids(*project, VARIED_TEXTS + SPECIAL_TEXTS)
    assert_same_special_handling(*project, SPECIAL_TEXTS + VARIED_TEXTS[:4])


def test_project_bpe_matches_tiktoken_on_random_text(project):
    texts = random_texts(400, seed=1)
    assert_same_ids(*project, texts)
    assert_same_special_handling(*project, texts[:100])


def test_gpt2_bpe_matches_tiktoken_on_varied_text(gpt2):
    assert_same_ids(*gpt2, VARIED_TEXTS + SPECIAL_TEXTS)
    assert_same_special_handling(*gpt2, SPECIAL_TEXTS + VARIED_TEXTS[:4])
    assert gpt2[0].encode_ordinary("Hello world") == [15496, 995]  # GPT-2 的公开事实


def test_gpt2_bpe_matches_tiktoken_on_random_text(gpt2):
    texts = random_texts(400, seed=2)
    assert_same_ids(*gpt2, texts)
    assert_same_special_handling(*gpt2, texts[:100])


def test_heap_merge_equals_scan_merge(project):
    """长片段用的堆合并与短片段用的逐步扫描，对同一串字节必须给出相同结果。"""
    rng = random.Random(3)
    words = ["的", "是", "模型", "学习", "a", "b", "th", "e", " ", "  ", "\n", "1", "😀"]
    for _ in range(1000):
        data = "".join(rng.choice(words) for _ in range(rng.randint(1, 60))).encode("utf-8")[:256]
        assert project[0]._merge_long(data) == project[0]._merge(data), data


def scrambled_text(length, seed):
    """字节味很重的随机文本：常用字、随机的 2/3/4 字节字符、英文字母、空白和标点混在一起。"""
    rng = random.Random(seed)
    pools = [lambda: rng.choice("abc xyz ABC"), lambda: rng.choice("的是了在不有和人这中大为上个"),
             lambda: chr(rng.randint(0x4E00, 0x4E60)), lambda: chr(rng.randint(0x80, 0x7FF)),
             lambda: chr(rng.randint(0x1F600, 0x1F60F)), lambda: rng.choice(" \n\t，。0123456789")]
    return "".join(rng.choice(pools)() for _ in range(length))


@pytest.fixture(scope="module")
def scrambled():
    """一个"刁钻"的词表：在上面的文本上训练，有大量跨字符边界、半个字的词元，"字内先合并完"
    的条件常常不成立，批量编码里从字节出发的那条路也会被走到。"""
    tok = mod.BPETokenizer(name="scrambled").train(scrambled_text(20_000, seed=7), 1500)
    return tok, tok.to_tiktoken()


def stored_ids(tok, piece):
    """缓存里这个片段的 ids（批量编码的结果只存在缓存里）。"""
    k = tok._cache[piece]
    return list(tok._ids[tok._starts[k]:tok._starts[k] + tok._lengths[k]])


@pytest.mark.parametrize("vocab", ["project", "gpt2", "scrambled"])
def test_batch_encoding_equals_piece_by_piece_and_tiktoken(vocab, request):
    """几千个没见过的片段一次交给批量编码：每个片段都与逐个合并的结果相同，整段与 tiktoken 相同。"""
    ours, ref = request.getfixturevalue(vocab)
    texts = random_texts(300, seed=11) + [scrambled_text(20_000, seed=8)]
    text = "".join(texts) + "".join(VARIED_TEXTS[1:])
    ours.clear_cache()
    assert ours.encode_ordinary(text) == ref.encode_ordinary(text)
    pieces = sorted(set(ours._pattern.findall(text)))
    assert len(pieces) > 10 * mod._BATCH_MIN  # 确实走了批量编码
    assert all(stored_ids(ours, p) == ours._encode_piece(p) for p in pieces)
    ours.clear_cache()  # 缓存为空时再编码同一批片段：结果不依赖编码的先后
    assert ours.encode_ordinary("".join(reversed(texts))) == ref.encode_ordinary("".join(reversed(texts)))


def test_scrambled_vocab_exercises_both_starting_points(scrambled):
    """刁钻词表里既有能"字内先合并"的字，也有不能的（否则上面的测试只测到了一条路）。"""
    tok = scrambled[0]
    chars = sorted(set(scrambled_text(20_000, seed=9)))
    inner, k_in, k_out, _, _ = tok._char_table(chars)
    can_merge = inner >= 0
    blocked = can_merge & ((inner >= k_in) | (inner >= k_out))
    assert blocked.sum() >= 20 and (can_merge & ~blocked).sum() >= 20


@pytest.mark.parametrize("vocab", ["project", "gpt2"])
def test_encoding_is_within_3x_of_tiktoken(vocab, request):
    """约 1 MB 没见过的中英混合文本、缓存为空：从零实现的耗时不超过 tiktoken 的 3 倍（各取最快一次）。"""
    ours, ref = request.getfixturevalue(vocab)
    text = mod.make_benchmark_text(mod.read_corpus(ROOT / "data" / "corpus"), 1_000_000, seed=5)
    ratio, same = mod.benchmark(ours, ref, text, vocab, repeats=3)
    assert same and ratio <= 3.0, f"慢了 {ratio:.1f} 倍"


def test_lone_surrogate_is_replaced_like_tiktoken(project):
    ours, ref = project
    assert ours.encode_ordinary("a\ud800b") == ref.encode_ordinary("a\ud800b")


def test_project_pattern_splits_numbers_into_groups_of_three():
    pieces = regex.findall(mod.PROJECT_PAT, "12345 678 模型model")
    assert pieces == ["123", "45", " ", "678", " ", "模型", "model"]


def test_toy_training_matches_hand_computation():
    # "aaabdaaabac" 的字节对计数：aa×4, ab×2, bd/da/ba/ac 各 1。
    # 1) (a,a)->256：a a a b d a a a b a c -> [aa,a,b,d,aa,a,b,a,c]
    # 2) 计数 (aa,a)=2、(a,b)=2 并列，取 id 小的 (97,98)->257：[aa,ab,d,aa,ab,a,c]
    # 3) (aa,ab)=2 -> 258 "aaab"：[aaab,d,aaab,a,c]
    # 4) 余下四对各 1 次，最小的是 (a,c)=(97,99) -> 259：[aaab,d,aaab,ac]
    # 5) (258,100)、(100,258)、(258,259) 各 1 次，最小 (100,258) -> 260 "daaab"
    tok = mod.BPETokenizer().train("aaabdaaabac", 256 + 5 + 1)
    assert tok.merges == [((97, 97), 256), ((97, 98), 257), ((256, 257), 258),
                          ((97, 99), 259), ((100, 258), 260)]
    assert [tok._decoder[i] for i in range(256, 261)] == [b"aa", b"ab", b"aaab", b"ac", b"daaab"]
    assert tok.special_tokens == {EOT: 261}
    # 按 rank 合并编码（手算）：…… -> [aaab, daaab, ac]
    assert tok.encode("aaabdaaabac") == [258, 260, 259]
    assert tok.to_tiktoken().encode("aaabdaaabac") == [258, 260, 259]


def naive_train(text, vocab_size, pat):
    """minbpe 式参照实现：不去重，每合并一次都把全部片段的相邻对重数一遍。平局规则与脚本相同。"""
    chunks = [list(p.encode("utf-8")) for doc in text.split(EOT) for p in regex.findall(pat, doc)]
    vocab = [bytes([i]) for i in range(256)]
    index_of = {tok: i for i, tok in enumerate(vocab)}
    merges = []
    while len(vocab) < vocab_size - 1:
        counts = Counter()
        for chunk in chunks:
            counts.update(zip(chunk, chunk[1:]))
        if not counts:
            break
        pair = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        merged = vocab[pair[0]] + vocab[pair[1]]
        if merged not in index_of:
            index_of[merged] = len(vocab)
            vocab.append(merged)
        merges.append((pair, index_of[merged]))
        chunks = [naive_merge(chunk, pair, index_of[merged]) for chunk in chunks]
    return vocab, merges


def naive_merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def corpus_text(max_bytes=None):
    text = EOT.join(mod.read_corpus(ROOT / "data" / "corpus"))
    return text if max_bytes is None else text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def test_incremental_training_equals_naive_and_is_30x_faster():
    text, vocab_size = corpus_text(30_000), 256 + 400 + 1
    start = time.perf_counter()
    naive_vocab, naive_merges = naive_train(text, vocab_size, mod.PROJECT_PAT)
    naive_time = time.perf_counter() - start
    fast_time = float("inf")
    for _ in range(2):  # 机器忙时计时有抖动：取快的一次
        start = time.perf_counter()
        tok = mod.BPETokenizer().train(text, vocab_size)
        fast_time = min(fast_time, time.perf_counter() - start)
    assert tok.merges == naive_merges  # 同样的合并 => 同样的压缩率
    assert sorted(tok.ranks, key=tok.ranks.get) == naive_vocab
    assert naive_time / fast_time >= 30, f"只快了 {naive_time / fast_time:.1f} 倍"


def test_training_is_deterministic(tmp_path):
    text = corpus_text(60_000)
    first = mod.BPETokenizer(name="t").train(text, 1024)
    second = mod.BPETokenizer(name="t").train(text, 1024)
    assert first.ranks == second.ranks and first.merges == second.merges
    first.save(tmp_path / "a.json")
    second.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_saved_tokenizer_loads_in_tiktoken_and_round_trips(tmp_path):
    text = corpus_text(40_000)
    tok = mod.BPETokenizer(name="t").train(text, 700)
    tok.save(tmp_path / "tok.json")
    enc = mod.load_project_tokenizer(tmp_path / "tok.json")
    again = mod.BPETokenizer.load(tmp_path / "tok.json")
    sample = text[:3000] + EOT + "新的文字 new text 123456"
    ids = tok.encode(sample, allowed_special="all")
    expected = enc.encode(sample, allowed_special="all")
    assert ids == expected == again.encode(sample, allowed_special="all")
    assert again.decode(ids) == sample and enc.n_vocab == tok.n_vocab == 700


def test_committed_tokenizer_is_reproduced_byte_for_byte(tmp_path):
    assert COMMITTED.is_file(), "data/tokenizer.json 应当随项目提交"
    out = tmp_path / "tokenizer.json"
    mod.train_and_save(mod.read_corpus(ROOT / "data" / "corpus"), mod.DEFAULT_VOCAB_SIZE, out)
    assert out.read_bytes() == COMMITTED.read_bytes(), \
        "重新训练的结果与提交的 data/tokenizer.json 不同：语料变了就运行 python 01_tokenizer.py --train"


def test_simple_tokenizer_maps_unknown_words_to_unk():
    tok = mod.SimpleTokenizer.from_text("我 爱 学习 hello world" + EOT)
    ids = tok.encode("我爱学习龘 hello there" + EOT)
    unk = tok.str_to_int[mod.UNK]
    assert ids.count(unk) == 2 and ids[-1] == tok.str_to_int[EOT]
    assert tok.decode(ids) == f"我爱学习{mod.UNK}hello{mod.UNK}{EOT}"  # 空白丢了


@pytest.mark.parametrize("length, max_length, stride, starts", [
    (20, 4, 4, [0, 4, 8, 12]),     # 16 + 4 + 1 = 21 > 20：起点 16 放不下
    (13, 4, 4, [0, 4, 8]),         # 8 + 4 + 1 = 13：恰好放下最后一个窗口
    (12, 4, 4, [0, 4]),            # 少一个词元，最后那个窗口就没了
    (10, 4, 1, [0, 1, 2, 3, 4, 5]),  # 步长 1：每个起点都要
    (20, 3, 5, [0, 5, 10, 15]),    # 步长大于窗口：中间有跳过的词元
    (5, 4, 7, [0]),                # 只够一个窗口
])
def test_dataset_windows_and_strides_are_exact_at_the_edges(length, max_length, stride, starts):
    data = mod.GPTDataset(list(range(length)), None, max_length, stride)
    assert len(data) == len(starts)
    for i, s in enumerate(starts):
        inputs, targets = data[i]
        assert inputs.tolist() == list(range(s, s + max_length))
        assert targets.tolist() == list(range(s + 1, s + max_length + 1))
    with pytest.raises(IndexError):
        data[len(starts)]


def test_dataset_rejects_too_short_text():
    with pytest.raises(mod.UserError):
        mod.GPTDataset(list(range(4)), None, max_length=4, stride=1)


def test_dataloader_batches_text_with_project_tokenizer(project):
    loader = mod.create_dataloader("一段用来测试的文字。" * 30, project[1], batch_size=3,
                                   max_length=5, stride=5, shuffle=False)
    inputs, targets = next(iter(loader))
    assert inputs.shape == targets.shape == (3, 5)
    assert (inputs[:, 1:] == targets[:, :-1]).all()
    assert all(len(batch[0]) == 3 for batch in loader)  # drop_last：不留不满的一批


def test_quick_run_standalone(tmp_path):
    result = run_standalone("01_tokenizer.py", ["--quick"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ids 一致：True") >= 1
    assert "与查表完全相等：True" in result.stdout and "Traceback" not in result.stderr


def test_missing_corpus_exits_2_with_chinese_message(tmp_path):
    result = run_standalone("01_tokenizer.py", ["--quick", "--corpus", "no_such_dir"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("错误：") and "no_such_dir" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("files, target", [
    ({}, "."),                                          # 空目录
    ({"a.txt": ""}, "a.txt"),                           # 空文件
    ({"a.txt": " \n\t\n", "sub/b.txt": ""}, "."),      # 只有空白
])
def test_empty_corpus_exits_2_with_chinese_message(tmp_path, capsys, files, target):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(content, encoding="utf-8")
    out = tmp_path / "t.json"
    with pytest.raises(SystemExit) as exit_info:
        mod.main(["--train", "--corpus", str(folder / target), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("错误：") and "空" in err
    assert not out.exists()
