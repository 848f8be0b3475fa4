"""A minimal OpenAI-compatible chat-completions client (OpenAI, vLLM, llama.cpp server, ...): stdlib
only, retries with exponential backoff and jitter, honours Retry-After. The API key is sent in the
Authorization header and nowhere else: it is kept out of repr, and a key with whitespace or control
characters (a pasted trailing newline) is refused before any request. Everything the client hands
on (error messages whatever raised them, response bodies, the judge's replies) is redacted of the
key in any spelling: any run of 8 or more of its characters, read through the escapes a server or
a library may put on it (JSON's \\/ \\" \\\\ \\uXXXX, Python's \\xXX, URL %XX, HTML &#NN; &quot;).
"""
from __future__ import annotations

import http.client
import json
import random
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
FATAL_STATUS = {401, 403, 404}       # wrong key, no access, wrong URL or model: no request would succeed


class JudgeAPIError(RuntimeError):
    """This request failed (after its retries, or with a non-retryable status such as 400)."""


class JudgeConfigError(RuntimeError):
    """The endpoint refuses us outright (401/403/404): stop the run instead of recording failures."""


def key_problem(key: str | None) -> str | None:
    """Why `key` cannot go into an HTTP header (None if it can); the message never shows the key."""
    if key is None:
        return None
    bad = sorted({repr(c) for c in key if c.isspace() or not c.isprintable()})
    if bad:
        return (f"contains whitespace or control characters ({', '.join(bad)}; a trailing newline from a file or "
                "a paste?): remove them")
    return None


# One character of text as it reads once an escape is undone: \\uXXXX / \\UXXXXXXXX / \\xXX behind any run of
# backslashes (JSON, doubly escaped JSON, Python reprs), %XX (URLs), &#xHH; / &#NN; (HTML), a backslash
# &quot; and its kin, a backslash run before any other character (\\/ \\" \\\\), else the character itself.
_UNIT = re.compile(r"\\+u([0-9a-fA-F]{4})|\\+U([0-9a-fA-F]{8})|\\+x([0-9a-fA-F]{2})|%([0-9a-fA-F]{2})"
                   r"|&#[xX]([0-9a-fA-F]{1,6});|&#([0-9]{1,7});|&(quot|amp|lt|gt|apos);|\\+(.)|(.)", re.S)
_ENTITIES = {"quot": '"', "amp": "&", "lt": "<", "gt": ">", "apos": "'"}
REDACT_RUN = 8  # a run of this many characters of the key is redacted wherever it appears


def _units(text: str) -> list[tuple[int, int, str]]:
    """(start, end, character) per character of `text` read through its escapes."""
    out = []
    for m in _UNIT.finditer(text):
        u4, u8, x2, pct, hexa, dec, entity, escaped, plain = m.groups()
        code = next((int(c, 16) for c in (u4, u8, x2, pct, hexa) if c), int(dec) if dec else None)
        char = (chr(code) if code <= 0x10FFFF else "\0") if code is not None else \
            _ENTITIES[entity] if entity else escaped if escaped else plain
        out.append((m.start(), m.end(), char))
    return out


def redact(text: str, secret: str | None) -> str:
    """`text` with every run of REDACT_RUN or more characters of `secret` (all of it, if shorter),
    in any escaping `_units` reads, replaced by <redacted>. Backslashes are dropped from both sides
    before comparing, since an escape's backslashes are not part of the text it spells."""
    key = (secret or "").replace("\\", "")
    if not key or not text:
        return text
    n = min(REDACT_RUN, len(key))
    grams = {key[i: i + n] for i in range(len(key) - n + 1)}
    units = _units(text)
    chars = "".join(c for _, _, c in units).replace("\\", "\0")
    hit = [False] * len(units)
    for i in range(len(units) - n + 1):
        if chars[i: i + n] in grams:
            hit[i: i + n] = [True] * n
    if not any(hit):
        return text
    pieces, i = [], 0
    while i < len(units):
        j = i
        while j < len(units) and hit[j] == hit[i]:
            j += 1
        pieces.append("<redacted>" if hit[i] else text[units[i][0]: units[j - 1][1]])
        i = j
    return "".join(pieces)


def redact_all(obj, secret: str | None):
    """Every string in a JSON-like value redacted (a judgment row before it is written)."""
    if isinstance(obj, str):
        return redact(obj, secret)
    if isinstance(obj, dict):
        return {k: redact_all(v, secret) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_all(v, secret) for v in obj)
    return obj


@dataclass
class ChatClient:
    base_url: str                    # e.g. https://api.openai.com/v1 ; /chat/completions is appended
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 120.0
    max_retries: int = 8
    base_delay: float = 2.0
    max_delay: float = 60.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    warn: Callable[[str], None] | None = field(default=None, repr=False)  # told of the first failed attempt
    _warned: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        problem = key_problem(self.api_key)
        if problem:
            raise ValueError(f"the judge API key {problem}")

    def redact(self, text: str) -> str:
        return redact(text, self.api_key)

    def _post(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url.rstrip('/')}/chat/completions", data=body,
                                         headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def complete(self, messages: list[dict], temperature: float = 0.0, max_tokens: int = 2048) -> str:
        """The first choice's message content ("" if the endpoint returned none), redacted."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens, "n": 1}).encode()
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                payload = self._post(body)
                return self.redact(payload["choices"][0]["message"].get("content") or "")
            except urllib.error.HTTPError as e:
                detail = self.redact(e.read(1 << 16).decode("utf-8", "replace"))[:300]  # redacted before the cut
                error = self.redact(f"HTTP {e.code} from {self.base_url}: {detail}")
                if e.code in FATAL_STATUS:
                    raise JudgeConfigError(error) from None
                if e.code not in RETRYABLE_STATUS and e.code < 500:
                    raise JudgeAPIError(error) from None
                retry_after = e.headers.get("Retry-After")
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                error = self.redact(f"{type(e).__name__} talking to {self.base_url}: {e}")
            except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                error = self.redact(f"malformed response from {self.base_url}: {type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001  anything else a transport raises: a failed request, redacted too
                error = self.redact(f"{type(e).__name__} from {self.base_url}: {e}")
            if attempt == self.max_retries:
                raise JudgeAPIError(f"{error} (gave up after {self.max_retries + 1} attempts)")
            if self.warn is not None and not self._warned:  # once: the failed judgments are reported one by one
                self._warned = True
                self.warn(f"{error}; retrying (up to {self.max_retries} times, --max_retries)")
            delay = self.base_delay * 2 ** attempt * random.uniform(0.5, 1.0)  # jitter: parallel workers spread out
            if retry_after is not None and retry_after.strip().replace(".", "", 1).isdigit():
                delay = max(delay, float(retry_after))
            self.sleep(min(delay, self.max_delay))
        raise AssertionError("unreachable")
