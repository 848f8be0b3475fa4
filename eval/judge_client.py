"""A minimal OpenAI-compatible chat-completions client (OpenAI, vLLM, llama.cpp server, ...): stdlib
only, retries with exponential backoff and jitter, honours Retry-After. The API key is sent in the
Authorization header and nowhere else: it is kept out of repr, messages and files. A key with
whitespace or control characters (a pasted trailing newline) is refused before any request, and
every error message, whatever raised it, is redacted of the key (in each spelling a library may
quote it: as given, stripped, or as a Python bytes/str repr) before it is raised or stored.
"""
from __future__ import annotations

import http.client
import json
import random
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


def redact(text: str, secret: str | None) -> str:
    """`text` without `secret` in any spelling an exception message may quote it in."""
    if not secret:
        return text
    spellings = {secret, secret.strip(), repr(secret)[1:-1], repr(secret.encode())[2:-1],
                 repr(secret.strip().encode())[2:-1]}
    for spelling in sorted((s for s in spellings if s), key=len, reverse=True):  # longest first: no partial leftovers
        text = text.replace(spelling, "<redacted>")
    return text


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
        """The first choice's message content ("" if the endpoint returned none)."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens, "n": 1}).encode()
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                payload = self._post(body)
                return payload["choices"][0]["message"].get("content") or ""
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
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
            delay = self.base_delay * 2 ** attempt * random.uniform(0.5, 1.0)  # jitter: parallel workers spread out
            if retry_after is not None and retry_after.strip().replace(".", "", 1).isdigit():
                delay = max(delay, float(retry_after))
            self.sleep(min(delay, self.max_delay))
        raise AssertionError("unreachable")
