"""Language detection for choosing the language of safety advice."""

from __future__ import annotations

import re
from typing import Literal

Language = Literal["zh", "en"]

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


def detect_language(text: str) -> Language:
    """Return "zh" or "en" from the share of CJK characters.

    One CJK character carries about as much meaning as a short English word (~4 letters), so CJK
    characters are weighted 4:1 against Latin letters. Text with neither defaults to "zh", the
    service's primary language.
    """
    cjk = len(_CJK.findall(text))
    latin = len(_LATIN.findall(text))
    if cjk == 0 and latin == 0:
        return "zh"
    return "zh" if cjk * 4 >= latin else "en"
