"""Fast tokenizers, chat templates and generation configs for THUDM's original ChatGLM-6B / 2 / 3.

The original tokenizers are SentencePiece models wrapped in remote code (tokenization_chatglm.py). This
module reads the SentencePiece protobuf and the checkpoint's JSON files only — it never runs that code —
and writes a `tokenizer.json` that transformers 5 loads with no remote code and that yields the original
ids: the SentencePiece normaliser and BPE merges reproduced with `tokenizers`, ChatGLM-6B's newline /
tab / blank-run symbols and image-token id offset, and each family's special tokens where its
`build_inputs_with_special_tokens` puts them. Special tokens can never come from text: they are added
tokens only, never reachable through the BPE merges, so `split_special_tokens=True` encodes a typed
"[gMASK]" or "<|user|>" as the characters it is made of.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm.answer_text import ANSWER_TEXT_KEY, CHATGLM2_ANSWER, CHATGLM3_ANSWER, CHATGLM_6B_ANSWER
from llm.families import CHATGLM2, CHATGLM3, CHATGLM_6B, Family

# ChatGLM-6B writes these text-level SentencePiece symbols for whitespace (tokenization_chatglm.py).
NEWLINE_SYMBOL = "<n>"
TAB_SYMBOL = "<|tab|>"
MAX_BLANK = 80
# Each text symbol stands for one private-use character inside the BPE model, so it is a single initial
# symbol (one id, never merged) instead of a multi-character piece that only special handling could reach.
_PRIVATE_BASE = 0xF0000


def _blank(length: int) -> str:
    return f"<|blank_{length}|>"


@dataclass(frozen=True)
class _Spec:
    """What differs between the three families' tokenizers (read from each tokenization_chatglm.py)."""

    model_file: str
    # Special tokens beyond the SentencePiece pieces, appended after them in this order (ChatGLM2/3).
    appended_specials: tuple[str, ...]
    # TemplateProcessing for add_special_tokens=True.
    single: str
    special_map: dict[str, str]
    answer_text: str
    # Defaults of the original chat(): what generation_config.json records besides the stop ids.
    chat_defaults: dict[str, Any]


_SPECS: dict[str, _Spec] = {
    CHATGLM_6B.name: _Spec(
        model_file="ice_text.model",
        appended_specials=(),
        single="$A [gMASK] <sop>",
        special_map={"bos_token": "<sop>", "eos_token": "<eop>", "pad_token": "<pad>", "unk_token": "<unk>",
                     "mask_token": "[MASK]"},
        answer_text=CHATGLM_6B_ANSWER,
        chat_defaults={"max_length": 2048, "do_sample": True, "top_p": 0.7, "temperature": 0.95},
    ),
    CHATGLM2.name: _Spec(
        model_file="tokenizer.model",
        appended_specials=("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"),
        single="[gMASK] sop $A",
        special_map={"eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"},
        answer_text=CHATGLM2_ANSWER,
        chat_defaults={"max_length": 8192, "do_sample": True, "top_p": 0.8, "temperature": 0.8},
    ),
    CHATGLM3.name: _Spec(
        model_file="tokenizer.model",
        appended_specials=("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                           "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
        single="[gMASK] sop $A",
        special_map={"eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"},
        answer_text=CHATGLM3_ANSWER,
        chat_defaults={"max_length": 8192, "do_sample": True, "top_p": 0.8, "temperature": 0.8},
    ),
}

# ChatGLM-6B's chat(): the query alone without history; `[Round i]\n问：…\n答：…\n` rounds from 0 with
# history; build_inputs_with_special_tokens appends [gMASK]<sop>. System messages have no place in it.
CHATGLM_6B_TEMPLATE = (
    "{%- set msgs = messages | rejectattr('role', 'equalto', 'system') | list -%}"
    "{%- set ns = namespace(round=0) -%}"
    "{%- if msgs | length == 1 and msgs[0]['role'] == 'user' -%}"
    "{{ msgs[0]['content'] }}"
    "{%- else -%}"
    "{%- for m in msgs -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{ '[Round ' ~ ns.round ~ ']\\n问：' ~ m['content'] ~ '\\n答：' }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{ m['content'] ~ '\\n' }}{%- set ns.round = ns.round + 1 -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if add_generation_prompt -%}[gMASK]<sop>{%- endif -%}"
)

# ChatGLM2's build_prompt: `[Round i]\n\n问：…\n\n答：…\n\n` numbered from 1, [gMASK]sop first.
CHATGLM2_TEMPLATE = (
    "[gMASK]sop"
    "{%- set msgs = messages | rejectattr('role', 'equalto', 'system') | list -%}"
    "{%- set ns = namespace(round=1) -%}"
    "{%- for m in msgs -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{ '[Round ' ~ ns.round ~ ']\\n\\n问：' ~ m['content'] ~ '\\n\\n答：' }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{ m['content'] ~ '\\n\\n' }}{%- set ns.round = ns.round + 1 -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def chatglm3_template(dummy_prefix: bool) -> str:
    """ChatGLM3's build_chat_input: <|role|> + encode(f"{metadata}\\n") + encode(content), then <|assistant|>.

    The original encodes the metadata line and the content separately, each with SentencePiece's dummy
    prefix. One string gives the same ids when a space separates them (the space becomes that second
    prefix), and nothing when the content is empty (encode("") is no ids).
    """
    gap = " " if dummy_prefix else ""
    roles = ("system", "user", "assistant", "observation")
    branches = "".join(
        f"{{%- {'if' if i == 0 else 'elif'} m['role'] == '{role}' -%}}<|{role}|>" for i, role in enumerate(roles))
    return (
        "[gMASK]sop"
        "{%- for m in messages -%}"
        f"{branches}{{%- endif -%}}"
        "{%- set content = m['content'] -%}"
        "{%- if m['role'] == 'system' and m['tools'] is defined -%}"
        "{%- set content = content ~ '\\n' ~ (m['tools'] | tojson(indent=4)) -%}"
        "{%- endif -%}"
        "{{ (m['metadata'] if m['metadata'] is defined else '') ~ '\\n' }}"
        f"{{%- if content -%}}{{{{ '{gap}' ~ content }}}}{{%- endif -%}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
    )


def _load_proto(path: Path) -> Any:
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as exc:
        proto.Clear()
        detail = f" ({exc})"
    else:
        detail = ""
    if not proto.pieces:  # e.g. an original GLM-4 directory (model_type chatglm too): tiktoken's file
        raise ValueError(f"{path} is not a SentencePiece model{detail}; if this is an original GLM-4 directory "
                         "(tiktoken tokenizer), serve its -hf release, which transformers loads as it is")
    return proto


def _text_symbols(proto: Any) -> dict[str, str]:
    """ChatGLM-6B's whitespace symbols that its SentencePiece model holds, each → its private character."""
    wanted = [NEWLINE_SYMBOL, TAB_SYMBOL, *(_blank(n) for n in range(2, MAX_BLANK + 1))]
    present = {p.piece for p in proto.pieces}
    return {symbol: chr(_PRIVATE_BASE + i) for i, symbol in enumerate(wanted) if symbol in present}


def _bpe_merges(proto: Any) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose join is the best-scoring normal piece: rank by score."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == 1}
    ranked = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def _normalizer(proto: Any, symbols: dict[str, str], whitespace_symbols: bool) -> Any:
    """SentencePiece's normaliser in its order, after ChatGLM-6B's own whitespace preprocessing."""
    from tokenizers import Regex, normalizers

    steps: list[Any] = []
    if whitespace_symbols:
        # SPTokenizer._preprocess: newline, tab, then runs of MAX_BLANK..2 spaces, as str.replace does.
        steps += [normalizers.Replace("\n", NEWLINE_SYMBOL), normalizers.Replace("\t", TAB_SYMBOL)]
        steps += [normalizers.Replace(" " * n, _blank(n)) for n in range(MAX_BLANK, 1, -1)]
    spec = proto.normalizer_spec
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    # SentencePiece matches its user-defined symbols (typed or produced above) before anything else.
    steps += [normalizers.Replace(symbol, char) for symbol, char in symbols.items()]
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if spec.add_dummy_prefix:
        # Per segment between special tokens, like one SentencePiece encode call; a no-op on "".
        steps.append(normalizers.Prepend("▁"))
    return normalizers.Sequence(steps)


def _decoder(proto: Any, symbols: dict[str, str], whitespace_symbols: bool) -> Any:
    from tokenizers import decoders

    steps: list[Any] = [decoders.Replace("▁", " ")]
    if proto.trainer_spec.byte_fallback:
        # SentencePiece decodes a run of byte pieces character by character (only the invalid bytes become
        # U+FFFD); ByteFallback turns every byte of an invalid run into U+FFFD. Decoding the ASCII bytes
        # first keeps "\t*" in a run like <0x09><0x2A><0xE5> (the common case of the difference).
        ascii_bytes = {f"<0x{b:02X}>" for b in range(0x80)}
        steps += [decoders.Replace(p.piece, chr(int(p.piece[3:5], 16)))
                  for p in proto.pieces if p.type == 6 and p.piece in ascii_bytes]
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    steps += [decoders.Replace(char, symbol) for symbol, char in symbols.items()]
    if whitespace_symbols:
        # SPTokenizer.postprocess, on the whole decoded text as the original does.
        steps += [decoders.Replace(NEWLINE_SYMBOL, "\n"), decoders.Replace(TAB_SYMBOL, "\t")]
        steps += [decoders.Replace(_blank(n), " " * n) for n in range(2, MAX_BLANK + 1)]
    return decoders.Sequence(steps)


def _fresh_name(name: str, taken: dict[str, int]) -> str:
    """A special token whose text is also an ordinary piece gets a bracketed name (ids stay the original)."""
    while name in taken:
        name = f"<|{name}|>"
    return name


def build_tokenizer(source_dir: Path, family: Family) -> tuple[Any, dict[str, int], dict[str, str]]:
    """The `tokenizers.Tokenizer`, its special tokens (text → id), and the appended specials' texts."""
    from tokenizers import AddedToken, Tokenizer, models, processors

    spec = _SPECS[family.name]
    proto = _load_proto(Path(source_dir) / spec.model_file)
    is_6b = family.name == CHATGLM_6B.name
    offset = _image_token_offset(source_dir) if is_6b else 0
    symbols = _text_symbols(proto) if is_6b else {}

    vocab: dict[str, int] = {}
    specials: dict[str, int] = {}
    for index, piece in enumerate(proto.pieces):
        name = symbols.get(piece.piece, piece.piece)
        vocab[name] = index + offset
        # unknown, control and user-defined pieces other than the whitespace symbols are control tokens
        if piece.type in (2, 3) or (piece.type == 4 and piece.piece not in symbols):
            specials[name] = index + offset
    # The appended ids follow the pieces in order (ChatGLM2/3 SPTokenizer: n_words, n_words + 1, ...).
    names: dict[str, str] = {}
    for i, name in enumerate(spec.appended_specials):
        names[name] = _fresh_name(name, vocab)
        vocab[names[name]] = specials[names[name]] = len(proto.pieces) + i

    unk = proto.trainer_spec.unk_piece or "<unk>"
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(proto), unk_token=unk, fuse_unk=True,
                                     byte_fallback=proto.trainer_spec.byte_fallback))
    tokenizer.normalizer = _normalizer(proto, symbols, is_6b)
    tokenizer.decoder = _decoder(proto, symbols, is_6b)
    # ChatGLM2/3's "sop" and "eop" are spelled like text ("people"): they match only as whole words.
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False, single_word=name.isalnum())
                                  for name, _ in sorted(specials.items(), key=lambda item: item[1])])
    single = " ".join(names.get(part, part) for part in spec.single.split())
    used = [part for part in single.split() if part != "$A"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} $B", special_tokens=[(name, specials[name]) for name in used])
    return tokenizer, specials, names


def _image_token_offset(source_dir: Path) -> int:
    """ChatGLM-6B shifts every SentencePiece id by num_image_tokens (the original class default: 20000)."""
    config = _read_json(Path(source_dir) / "tokenizer_config.json")
    return int(config.get("num_image_tokens", 20000))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def convert_tokenizer(source_dir: Path, family: Family, out_dir: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json (chat template, answer post-processing) into out_dir."""
    from transformers import PreTrainedTokenizerFast

    if family.name not in _SPECS:
        raise ValueError(f"no tokenizer conversion for the {family.name} family")
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    spec = _SPECS[family.name]
    if not (source_dir / spec.model_file).is_file():
        raise FileNotFoundError(f"{source_dir} has no {spec.model_file} (the {family.name} SentencePiece model)")
    tokenizer, specials, names = build_tokenizer(source_dir, family)
    proto = _load_proto(source_dir / spec.model_file)
    template = {CHATGLM_6B.name: CHATGLM_6B_TEMPLATE, CHATGLM2.name: CHATGLM2_TEMPLATE}.get(
        family.name) or chatglm3_template(proto.normalizer_spec.add_dummy_prefix)
    if names.get("sop", "sop") != "sop":  # an ordinary piece spelled "sop": the special got another text
        template = template.replace("[gMASK]sop", "[gMASK]" + names["sop"])
    special_map = spec.special_map
    roles = set(special_map.values())
    original = _read_json(source_dir / "config.json")
    window = original.get("seq_length") or original.get("max_sequence_length")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **({"model_max_length": int(window)} if window else {}),
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=template,
        extra_special_tokens=[name for name in specials if name not in roles],
        **special_map,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = _read_json(config_path)
    config[ANSWER_TEXT_KEY] = spec.answer_text
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def stop_ids(source_dir: Path, family: Family, original_config: dict) -> list[int]:
    """The ids generation stops on: the config's eos, plus <|user|> and <|observation|> for ChatGLM3."""
    eos = original_config.get("eos_token_id")
    ids = [int(v) for v in (eos if isinstance(eos, list) else [eos]) if v is not None]
    if family.name == CHATGLM3.name:
        # Appended specials take the ids after the SentencePiece pieces, in order (as build_tokenizer numbers
        # them): no need to build the whole tokenizer again for two ids.
        spec = _SPECS[family.name]
        pieces = len(_load_proto(Path(source_dir) / spec.model_file).pieces)
        roles = [pieces + spec.appended_specials.index(name) for name in ("<|user|>", "<|observation|>")]
        ids += [i for i in roles if i not in ids]
    return ids


def write_generation_config(source_dir: Path, family: Family, original_config: dict, out_dir: Path) -> None:
    """generation_config.json: stop ids, pad id and the original chat() sampling defaults."""
    if family.name not in _SPECS:
        raise ValueError(f"no generation config for the {family.name} family")
    spec = _SPECS[family.name]
    ids = stop_ids(source_dir, family, original_config)
    config: dict[str, Any] = {
        "eos_token_id": ids[0] if len(ids) == 1 else ids,
        "pad_token_id": original_config.get("pad_token_id"),
        **spec.chat_defaults,
        ANSWER_TEXT_KEY: spec.answer_text,
    }
    if original_config.get("bos_token_id") is not None:
        config["bos_token_id"] = original_config["bos_token_id"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
