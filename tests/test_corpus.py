"""语料检查（data/check_corpus.py）：随项目发布的语料是人写的文章，不是模板输出。"""
import importlib.util

from conftest import ROOT


def load_checker():
    spec = importlib.util.spec_from_file_location("check_corpus", ROOT / "data" / "check_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_corpus_reads_as_prose():
    lines, ok = load_checker().check([ROOT / "data" / "corpus"])
    assert ok, "\n".join(lines)


def test_checker_rejects_template_output(tmp_path):
    # 自检：同一句式换个名字和物品批量生成，三项指标里至少有一项必须报警
    names, things = ["小明", "小红", "阿强", "丽丽", "大伟"], ["苹果", "书包", "雨伞", "铅笔", "风筝"]
    text = "".join(f"{n}今天去商店买了一个{t}，他很高兴地回家了。\n" for n in names for t in things)
    (tmp_path / "a.txt").write_text(text * 3, encoding="utf-8")
    lines, ok = load_checker().check([tmp_path])
    assert not ok, "\n".join(lines)
    # 只换名字的模板：没有整句重复（每句都不同），但 12-gram 重复率必须超标
    checker = load_checker()
    varied = {tmp_path / "a.txt": "".join(f"{n}{t}今天去商店买了东西，他很高兴地回家了。" for n in names
                                          for t in things)}
    assert checker.ngram_repeat_rate(varied) > checker.MAX_NGRAM_REPEAT
