"""Which model family a checkpoint directory holds, read from its config.json without running its code.

One place names each family's facts that both serving and training need (LoRA target modules), so the
two never disagree. An original layout (`original_family` is not None) is converted before loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Family:
    name: str
    # Modules LoRA adapts on a model of this family as transformers 5 loads it (q and v, as the paper did);
    # on the original layouts, what their LoRA adapters (DoctorGLM's) target.
    lora_targets: tuple[str, ...]


CHATGLM_6B = Family("chatglm-6b", ("query_key_value",))
CHATGLM2 = Family("chatglm2", ("query_key_value",))
CHATGLM3 = Family("chatglm3", ("query_key_value",))
# Converted ChatGLM-6B (the project's own class, model_type "chatglm6b-doctorglm"): fused q/k/v kept,
# so LoRA on query_key_value adapts q, k and v together (peft cannot address a slice of a fused Linear).
CHATGLM_6B_CONVERTED = Family("chatglm-6b (converted)", ("query_key_value",))
# transformers' own GLM classes: ChatGLM2/3 after conversion, GLM-4 `-hf`, and the embedded tiny model.
GLM = Family("glm", ("q_proj", "v_proj"))
OTHER = Family("other", ("q_proj", "v_proj"))

# The model_type the project's ChatGLM-6B implementation registers with the Auto classes.
CHATGLM6B_MODEL_TYPE = "chatglm6b-doctorglm"


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def original_family(config: dict, model_dir: Path | None = None) -> Family | None:
    """THUDM's original ChatGLM layouts, told apart by the fields each generation's config carries."""
    if config.get("model_type") != "chatglm":
        return None
    if "position_encoding_2d" in config or "inner_hidden_size" in config:
        return CHATGLM_6B
    if "multi_query_group_num" in config or "padded_vocab_size" in config:
        # ChatGLM2 and 3 share a config layout; ChatGLM3's tokenizer has role tokens, the tell that
        # survives a fine-tuned copy renaming the directory. _name_or_path when no tokenizer is there.
        roles = _tokenizer_has_role_tokens(Path(model_dir)) if model_dir is not None else None
        if roles is not None:
            return CHATGLM3 if roles else CHATGLM2
        name = str(config.get("_name_or_path", "")).lower()
        return CHATGLM3 if "chatglm3" in name else CHATGLM2
    return None


# Where a ChatGLM2/3 directory's tokenizer can show role tokens; the .py is read as text, never run.
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenization_chatglm.py")


def _tokenizer_has_role_tokens(model_dir: Path) -> bool | None:
    """True/False when the directory's tokenizer files say whether <|user|> is a token; None without them."""
    found = None
    for name in _TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file():
            if "<|user|>" in path.read_text(encoding="utf-8", errors="replace"):
                return True
            # tokenizer_config.json alone proves nothing: THUDM's has no token list for either family.
            found = False if name != "tokenizer_config.json" else found
    return found


def family_of(model_dir: Path) -> Family:
    return family_from_config(read_config(model_dir), model_dir)


def family_from_config(config: dict, model_dir: Path | None = None) -> Family:
    """The family of a config.json's contents (or of a loaded model's `config.to_dict()`)."""
    found = original_family(config, model_dir)
    if found is not None:
        return found
    model_type = config.get("model_type")
    if model_type == CHATGLM6B_MODEL_TYPE:
        return CHATGLM_6B_CONVERTED
    if model_type in ("glm", "glm4"):
        return GLM
    return OTHER
