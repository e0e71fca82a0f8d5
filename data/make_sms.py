"""data/make_sms.py — 生成中文短信分类数据的"模板部分"（05_finetune_cls.py 用）

手写的短信在 data/sms/handwritten/ 里，一条条写成、逐条审过；这里用模板 + 词槽批量生成更多训练样本，
让模型见到更多的品牌、金额、链接、时间的组合。测试集只从手写短信里抽（见 --build-splits），
所以测试准确率衡量的是"学会了区分垃圾短信"，而不是"背下了这几十个模板"。

用法：
  python data/make_sms.py --seed 0 --count 2000 --out generated.tsv   # 只生成，写 label<TAB>text
  python data/make_sms.py --build-splits    # 重建 data/sms/{train,val,test}.tsv
"""
import argparse
import random
import sys
from pathlib import Path

SMS_DIR = Path(__file__).resolve().parent / "sms"
SPLIT_SEED, GEN_SEED, GEN_COUNT = 2024, 0, 2000
TEST_SHARE, VAL_SHARE = 0.20, 0.10  # 手写短信里各取多少做测试集、验证集；其余和生成的一起做训练集

# ---- 词槽 ----
SLOTS = {
    "bank": ["招商银行", "工商银行", "建设银行", "农业银行", "中国银行", "交通银行", "邮储银行",
             "浦发银行", "中信银行", "平安银行", "兴业银行", "民生银行", "光大银行", "宁波银行"],
    "pay": ["支付宝", "微信支付", "云闪付", "京东支付", "美团支付"],
    "courier": ["顺丰速运", "中通快递", "圆通速递", "韵达快递", "申通快递", "京东物流", "极兔速递",
                "邮政EMS", "德邦快递", "菜鸟驿站"],
    "shop": ["淘宝", "京东", "拼多多", "唯品会", "抖音商城", "苏宁易购", "天猫超市", "盒马"],
    "app": ["美团", "饿了么", "滴滴出行", "携程", "12306", "高德地图", "哈啰", "大众点评", "闲鱼",
            "小红书", "网易云音乐", "爱奇艺", "bilibili"],
    "travel": ["携程旅行", "航旅纵横", "去哪儿旅行", "飞猪", "同程旅行"],
    "station": ["小区东门驿站", "3号楼丰巢柜", "南门菜鸟驿站", "学校快递点", "物业前台", "超市旁驿站"],
    "carrier": ["中国移动", "中国联通", "中国电信"],
    "product": ["羽绒服", "保温杯", "儿童自行车", "蓝牙耳机", "电饭煲", "空气炸锅", "运动鞋", "台灯",
                "洗发水", "行李箱", "投影仪", "猫粮", "茶叶礼盒", "护眼台灯", "扫地机器人"],
    "store": ["万达广场", "永辉超市", "苏宁电器", "国美", "优衣库", "屈臣氏", "海底捞", "肯德基",
              "名创优品", "太平鸟", "安踏", "周大福", "红星美凯龙", "居然之家"],
    "family": ["妈", "爸", "老婆", "老公", "姐", "哥", "闺女", "儿子", "奶奶", "舅舅", "小姨"],
    "name": ["王磊", "李娜", "张伟", "刘洋", "陈静", "杨帆", "赵敏", "黄涛", "周婷", "吴斌", "徐丽",
             "孙浩", "马超", "朱琳", "胡杰", "郭芳", "何亮", "高雪", "林峰", "罗娟"],
    "surname": ["王", "李", "张", "刘", "陈", "杨", "赵", "黄", "周", "吴", "徐", "孙", "马", "朱"],
    "place": ["小区东门", "公司楼下", "地铁站B口", "学校门口", "老地方", "万达三楼", "人民医院",
              "火车站北广场", "楼下便利店", "图书馆二楼", "体育馆", "奶茶店"],
    "food": ["火锅", "烧烤", "饺子", "麻辣烫", "烤鸭", "酸菜鱼", "螺蛳粉", "小龙虾", "米线", "煎饼"],
    "city": ["北京", "上海", "广州", "深圳", "成都", "杭州", "武汉", "西安", "南京", "长沙", "郑州",
             "重庆", "苏州", "天津", "昆明"],
    "weekday": ["周一", "周二", "周三", "周四", "周五", "周六", "周日", "明天", "后天", "今晚"],
    "course": ["会计初级", "教师资格证", "一级建造师", "成人本科", "雅思", "考研英语", "Python编程",
               "PMP", "健康管理师", "公务员考试"],
    "house": ["地铁口精装两居", "学区三房", "江景洋房", "临湖别墅", "现房公寓", "商铺"],
    "game": ["棋牌", "百家乐", "真人娱乐", "体育竞猜", "捕鱼", "老虎机"],
    "gov": ["个人所得税", "失业补助", "住房补贴", "医保账户", "社保卡", "ETC", "养老金",
            "育儿补贴", "职业技能补贴"],
    "hospital": ["市第一人民医院", "妇幼保健院", "中医院", "口腔医院", "社区卫生服务中心"],
    "dept": ["口腔科", "眼科", "内科", "皮肤科", "儿科", "骨科", "体检中心"],
    "company": ["星辰科技", "蓝海网络", "远航物流", "华信咨询", "启明教育", "青禾食品", "万象传媒"],
    "domain": ["cn-yh.top", "etc-rz.vip", "sbbt-gov.cc", "kd-lp.xyz", "jf-dh.icu", "vip-dk.cc",
               "mm-hd.top", "zx-xf.club", "tk-cs.vip", "hb-ling.cn.com"],
}


def slot_value(name, rng):
    """一个词槽的随机取值：列表里的词，或随机生成的数字、时间、链接。"""
    if name in SLOTS:
        return rng.choice(SLOTS[name])
    makers = {
        "code": lambda: f"{rng.randrange(10**5, 10**6)}" if rng.random() < 0.7
        else f"{rng.randrange(1000, 10000)}",
        "pickup": lambda: "-".join(str(rng.randrange(*r)) for r in ((1, 30), (1, 6), (1000, 9999))),
        "money": lambda: rng.choice([f"{rng.randrange(5, 999)}.{rng.randrange(100):02d}",
                                     f"{rng.randrange(1, 60) * 100}",
                                     f"{rng.randrange(1000, 50000)}"]),
        "big": lambda: f"{rng.randrange(2, 50)}万" if rng.random() < 0.5
        else f"{rng.randrange(3, 30) * 1000}",
        "tail": lambda: f"{rng.randrange(10000):04d}",
        # 手机号中间四位打码（和手写部分一样）：随机生成的号码可能恰好是某个真人的
        "phone": lambda: f"1{rng.choice('3578')}{rng.randrange(10)}****{rng.randrange(10**4):04d}",
        "hotline": lambda: rng.choice(["400", "95"]) + f"{rng.randrange(10**4, 10**7)}",
        "time": lambda: f"{rng.randrange(7, 22)}:{rng.choice(['00', '10', '15', '30', '45'])}",
        "date": lambda: f"{rng.randrange(1, 13)}月{rng.randrange(1, 29)}日",
        "num": lambda: f"{rng.randrange(2, 12)}",
        "percent": lambda: f"{rng.randrange(3, 9)}折" if rng.random() < 0.5
        else f"{rng.randrange(5, 50)}%",
        "rate": lambda: f"{rng.randrange(8, 60)}.{rng.randrange(10)}%",
        "order": lambda: f"{rng.randrange(10**11, 10**12)}",
        "plate": lambda: rng.choice("京沪粤川浙苏鄂陕") + rng.choice("ABCDEFG")
        + f"{rng.randrange(10**4, 10**5)}",
        "link": lambda: rng.choice([f"http://{rng.choice(SLOTS['domain'])}/{_word(rng)}",
                                    f"t.cn/{_word(rng)}",
                                    f"{rng.choice(SLOTS['domain'])}/{_word(rng)}",
                                    f"https://{_word(rng).lower()}.{rng.choice(['top', 'vip'])}"]),
    }
    return makers[name]()


def _word(rng):
    return "".join(rng.choice("abcdefghjkmnpqrstuvwxyzABCDEFGHJKMNPQRSTUVWXYZ23456789")
                   for _ in range(rng.randrange(4, 8)))


# ---- 模板：{词槽}；每条模板尽量像一条真实短信 ----
SPAM = [
    "【{bank}】您的账户存在异常，已被临时冻结，请于24小时内登录 {link} 完成身份核验，逾期将影响正常使用。",
    "尊敬的用户：您的{bank}信用卡积分{big}即将清零，可兑换现金，速登 {link} 办理。",
    "【{gov}】您有一笔{money}元补贴待领取，请尽快登录 {link} 填写银行卡信息申领，今日截止。",
    "您的{gov}认证已失效，为避免影响使用，请点击 {link} 重新认证。",
    "【{courier}】您的快递在运输途中丢失，我司将双倍理赔{money}元，请添加客服QQ{phone}办理退款。",
    "亲，您在{shop}购买的{product}因质检不合格需要召回，我们将退款{money}元，请点击 {link} 申请。",
    "{surname}总：我是你的老领导，换号了，明天上午来我办公室一趟，先加我微信{phone}有事交代。",
    "{family}，我手机掉水里了，这是临时号码，急需{money}块交押金，你先转到我同学卡上，晚点还你。",
    "无抵押无担保，最快当天放款，额度{big}，日息低至万分之二，详询{phone}，退订回T",
    "您的征信有逾期记录，我司可帮助修复征信，成功后收费，咨询{phone}。",
    "【{game}】首充{money}送{money}，提款秒到账，注册即送彩金 {link}",
    "恭喜您被抽中为{store}幸运会员，获得{product}一台，请登录 {link} 填写收货地址并支付运费。",
    "招聘兼职：在家用手机{shop}点赞刷单，一单{num}元，日结{money}，加微信{phone}，学生宝妈优先。",
    "{store}会员日全场{percent}，满{money}减{num}0，{date}至{weekday}，速来抢购！退订回T",
    "【{city}楼盘】{house}，首付{big}起，地铁直达，现场看房送油，热线{hotline}，回TD退订",
    "{course}考试包过，内部资料押题命中率{percent}，报名联系{phone}，拒收请回复R",
    "代开各类发票，税点低，可验真，有需要请联系{surname}经理{phone}。",
    "您的{carrier}话费积分{big}将于本月底清零，点击 {link} 兑换话费或实物礼品。",
    "【{app}】您的账号在异地登录，存在被盗风险，请立即点击 {link} 修改密码并验证身份。",
    "你的照片被人发到网上了，好多人在传，你自己看看吧 {link}",
    "股票交流群：每日推荐{num}只潜力股，上月平均收益{rate}，名额有限，添加老师微信{phone}。",
    "您已获得{bank}信用卡提额资格，最高可提至{big}，回复Y或点击 {link} 立即办理。",
    "{surname}先生您好，您的{shop}店铺保证金未缴纳，将被关店处理，请联系客服{phone}。",
    "亲爱的用户，您的{app}会员已到期，为避免自动扣费{money}元，请致电{hotline}取消。",
    "同学聚会照片出来了，我把你也拍进去了，哈哈，看看 {link}",
    "【{carrier}】尊敬的客户，您的号码因实名信息不全将于今日停机，请点击 {link} 补全资料。",
    "{city}同城交友，寂寞的夜晚有人陪，真实照片认证，点击 {link} 立即匹配。",
    "您好，我是{shop}客服，您的订单{order}因系统故障重复扣款，需要为您办理退款，请提供银行卡号。",
    "【{store}】年终大促，{product}限时{percent}，前100名再送礼品，地址：{city}{place}。退订回T",
    "装修找我们！{city}本地装修公司，全包{num}万起，免费上门量房设计，电话{phone}。",
    "{surname}女士您好，您申请的{big}贷款已审批通过，需先缴纳{money}元解冻金方可放款。",
    "高价回收二手车、黄金、名表，当场结款，上门服务，电话{phone}。",
    "新用户注册即送{money}元体验金，稳赚不赔，年化收益{rate}，{link}",
    "您好，您在我店的积分可以兑换{product}，活动{date}截止，回复1了解详情，退订回T。",
]
HAM = [
    "【{bank}】您尾号{tail}的储蓄卡{date}{time}消费支出人民币{money}元，活期余额{money}元。",
    "【{bank}】您尾号{tail}的信用卡本期账单{money}元，最后还款日{date}，请按时还款。",
    "【{bank}】您尾号{tail}账户{date}{time}工资收入{money}元，余额{money}元。",
    "【{app}】验证码{code}，用于登录验证，5分钟内有效。请勿泄露给他人。",
    "【{pay}】校验码{code}，您正在进行付款操作，切勿告知他人，如非本人操作请忽略。",
    "【{courier}】您的快递已到{station}，取件码{pickup}，请于{weekday}前取件。",
    "【{courier}】您的包裹正在派送中，快递员{surname}师傅，电话{phone}，预计{time}前送达。",
    "【{shop}】您的订单{order}已发货，{courier}承运，可在App内查看物流。",
    "【{shop}】您申请的退款{money}元已原路退回，预计1-3个工作日到账。",
    "{family}，我{time}到家，晚饭不用等我了。",
    "{name}，{weekday}晚上{place}吃{food}，你来不来？",
    "今天会议改到下午{time}，还是三楼会议室，麻烦通知一下组里的人。",
    "{surname}老师您好，孩子今天有点发烧，想请一天假，谢谢。",
    "【{hospital}】您已成功预约{date}{dept}{time}的号，请提前20分钟携带身份证到院取号。",
    "【{carrier}】您本月套餐内流量已使用{percent}，剩余约{num}GB，可发送CXLL查询。",
    "【{carrier}】尊敬的客户，您的话费余额为{money}元，为避免影响使用，请及时充值。",
    "【12306】订单{order}，您已购{date}{city}至{city}的车票，请凭身份证检票乘车。",
    "【{travel}】您预订的{city}酒店{date}入住，订单已确认，祝您入住愉快。",
    "物业通知：{date}上午9点至下午4点小区停水检修，请各位业主提前储水。",
    "{name}你好，我是{company}的HR，{weekday}{time}的面试地点在公司{place}，记得带简历。",
    "到了没？我在{place}等你。",
    "{family}，周末回家吃饭吗？你奶奶念叨你好几天了。",
    "【{app}】您的账号于{date}{time}在新设备登录，如非本人操作，请在App内修改密码。",
    "您好，我是送外卖的，你点的{food}放在{place}了，记得拿。",
    "【{store}】您预约的{date}{time}服务已确认，如需改期请提前一天告知。",
    "钱收到了，谢谢啊，下个月发工资还你。",
    "{name}，上次说的那本书我放你桌上了。",
    "【{bank}】您尾号{tail}的信用卡{date}还款{money}元已入账，感谢您的支持。",
    "【{travel}】您的{date}{city}至{city}航班登机口变更为{num}号，请留意机场广播。",
    "{family}，药我给你买好了，放门口鞋柜上。",
    "下午的快递帮我拿一下，取件码{pickup}，谢谢！",
    "明天降温，出门多穿点，别感冒了。",
    "【{city}气象台】预计{weekday}有大到暴雨，请注意出行安全。",
    "你好，我是{surname}师傅，你叫的车到{place}了，白色车牌{plate}。",
]


def fill(template, rng):
    """把模板里的每个 {词槽} 各自独立地随机填一次（同一模板里两个 {money} 取值不同）。"""
    out, rest = [], template
    while "{" in rest:
        head, _, tail = rest.partition("{")
        name, _, rest = tail.partition("}")
        out += [head, slot_value(name, rng)]
    return "".join(out + [rest])


def generate(seed, count):
    """count 条互不相同的 (label, text)：垃圾与正常交替，模板和词槽都随机抽。
    没有词槽的模板（"明天降温……"）只能出现一次：重复的样本只会让模型多背一遍。"""
    rng = random.Random(seed)
    rows, seen = [], set()
    for _ in range(count * 20):  # 上限：count 大到模板组合不出那么多不同的短信时，不会死循环
        if len(rows) == count:
            break
        label = "spam" if len(rows) % 2 == 0 else "ham"
        text = fill(rng.choice(SPAM if label == "spam" else HAM), rng)
        if text not in seen:
            seen.add(text)
            rows.append((label, text))
    return rows


def read_tsv(path):
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        label, text = line.split("\t")
        rows.append((label, text))
    return rows


def write_tsv(path, rows):
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")


def build_splits():
    """手写短信按类别分层抽出测试集与验证集；训练集 = 其余手写 + 生成的 GEN_COUNT 条。"""
    files = sorted((SMS_DIR / "handwritten").glob("*.tsv"))
    hand = [row for file in files for row in read_tsv(file)]
    rng = random.Random(SPLIT_SEED)
    splits = {"train": [], "val": [], "test": []}
    for label in ("spam", "ham"):
        rows = [row for row in hand if row[0] == label]
        rng.shuffle(rows)
        n_test, n_val = round(len(rows) * TEST_SHARE), round(len(rows) * VAL_SHARE)
        splits["test"] += rows[:n_test]
        splits["val"] += rows[n_test:n_test + n_val]
        splits["train"] += rows[n_test + n_val:]
    splits["train"] += generate(GEN_SEED, GEN_COUNT)
    for name, rows in splits.items():
        rng.shuffle(rows)
        write_tsv(SMS_DIR / f"{name}.tsv", rows)
        print(f"{name}: {len(rows)} 条（垃圾 {sum(r[0] == 'spam' for r in rows)}）")


def main(argv=None):
    p = argparse.ArgumentParser(description="生成模板短信，或重建 data/sms 的三个划分")
    p.add_argument("--seed", type=int, default=GEN_SEED)
    p.add_argument("--count", type=int, default=GEN_COUNT)
    p.add_argument("--out", type=Path, help="把生成的短信写到这个 TSV 文件")
    p.add_argument("--build-splits", action="store_true", help="重建 data/sms/{train,val,test}.tsv")
    args = p.parse_args(argv)
    if args.build_splits:
        return build_splits()
    if args.out is None or not 1 <= args.count <= 10**6:
        p.error("需要 --out FILE，且 --count 在 1 到 1000000 之间")
    write_tsv(args.out, generate(args.seed, args.count))
    print(f"写出 {args.count} 条 → {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
