"""LLM-as-judge: a 0–100 score for each held-out response, from any OpenAI-compatible chat
completions endpoint (a local Ollama server, vLLM, llama.cpp's server, OpenAI itself).

Off unless `eval.judge_url` is set. The judge sees the user's request, the reference answer
(when the data has one) and the response, and must answer with a line `Score: N`. It runs
on the generations before and after training; the first call happens before training starts,
so a wrong URL or model stops the run at once rather than after it.

Standard library HTTP only: no client package to install for an optional feature.
"""

from __future__ import annotations

import dataclasses
import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence

SYSTEM = (
    "You grade answers of an AI assistant. Given a user's request, a reference answer and the "
    "assistant's response, judge how well the response fulfils the request: correct, complete "
    "and in the requested form. The reference shows one good answer; other wordings can be "
    "just as good. Reply with one short sentence of reasons, then a last line `Score: N` with "
    "N an integer from 0 (useless) to 100 (as good as the reference)."
)
_SCORE = re.compile(r"score\s*[:=]\s*\**\s*(\d{1,3})\b", re.IGNORECASE)


class JudgeError(ValueError):
    """The judge could not be asked or gave no usable answer; the message names the fix."""


def parse_score(reply: str) -> int | None:
    """The N of the last `Score: N` in the reply (0–100), or None."""
    found = [int(m) for m in _SCORE.findall(reply)]
    if not found or not 0 <= found[-1] <= 100:
        return None
    return found[-1]


def user_message(request: str, reference: str, response: str) -> str:
    parts = [f"Request:\n{request}"]
    if reference:
        parts.append(f"Reference answer:\n{reference}")
    parts.append(f"Response to grade:\n{response}")
    return "\n\n".join(parts)


@dataclasses.dataclass(frozen=True)
class Judge:
    url: str  # e.g. http://localhost:11434/v1 (Ollama); …/chat/completions is added
    model: str
    api_key: str = ""
    timeout_s: float = 120.0

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def ask(self, request: str, reference: str, response: str) -> str:
        """The judge's reply text (temperature 0)."""
        body = {
            "model": self.model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": user_message(request, reference, response)},
            ],
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(
            self.endpoint, json.dumps(body).encode("utf-8"), headers, method="POST"
        )
        where = f"eval.judge_url={self.url!r} ({self.endpoint})"
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                data = json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = " ".join(e.read().decode("utf-8", "replace").split())[:300]
            hint = (
                " Set the API key's environment variable (eval.judge_api_key_env)."
                if e.code in (401, 403)
                else f" Check eval.judge_model={self.model!r}."
                if e.code in (400, 404)
                else ""
            )
            raise JudgeError(f"{where}: HTTP {e.code}: {detail}.{hint}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise JudgeError(
                f"{where}: could not reach the judge ({reason}). Start the server (for "
                "example `ollama serve`) or set eval.judge_url='' to turn the judge off."
            ) from None
        except json.JSONDecodeError:
            raise JudgeError(f"{where}: the reply is not JSON; is this a chat endpoint?") from None
        try:
            return data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(
                f"{where}: no choices[0].message.content in the reply: {str(data)[:300]}"
            ) from None

    def score_records(self, records: Sequence[dict]) -> None:
        """Adds `judge` (0–100, or None when the reply had no `Score: N`) and `judge_reply`
        to each generation record, in place."""
        for r in records:
            reply = self.ask(r["prompt"], r.get("reference", ""), r["response"])
            r["judge"] = parse_score(reply)
            r["judge_reply"] = reply


def from_config(eval_config, environ) -> Judge | None:
    """The judge of the config's `eval.judge_*` keys, or None when it is off."""
    if not eval_config.judge_url:
        return None
    if not eval_config.judge_model:
        raise ValueError(
            "config: eval.judge_url is set but eval.judge_model is empty; name the judge "
            "model (for example eval.judge_model=llama3.1:8b for Ollama)"
        )
    if eval_config.generations <= 0:
        raise ValueError(
            "config: eval.judge_url is set but eval.generations is 0; the judge scores the "
            "held-out generations, so set eval.generations > 0"
        )
    key = environ.get(eval_config.judge_api_key_env, "") if eval_config.judge_api_key_env else ""
    return Judge(eval_config.judge_url, eval_config.judge_model, key)


def mean_score(records: Sequence[dict]) -> tuple[float | None, int]:
    """(mean judge score over the records that got one, how many did not)."""
    scores = [r["judge"] for r in records if r.get("judge") is not None]
    missing = sum(1 for r in records if "judge" in r and r["judge"] is None)
    return (sum(scores) / len(scores) if scores else None), missing
