"""The Video-ChatGPT judge protocol against any OpenAI-compatible chat-completions endpoint.

The messages reuse, word for word, the prompt of Video-LLaVA's
``videollava/eval/video/eval_video_qa.py`` (itself from Video-ChatGPT), so scores are comparable
with published numbers: the judge sees question / correct answer / predicted answer and replies
with a Python-dict-like string ``{'pred': 'yes'|'no', 'score': 0-5}``. Accuracy is
yes / (yes + no) and the score is the mean over valid replies, as in the original.

What differs from the original, on purpose:

- plain HTTP (``urllib.request``): POST ``{base_url}/chat/completions``, temperature 0, no SDK;
- bounded retries with exponential backoff on timeouts, connection errors, 429 and 5xx (the
  original loops forever over failed items);
- replies are parsed with ``json.loads`` or ``ast.literal_eval`` of the first ``{...}`` (never
  ``eval``) and validated: ``pred`` must be yes/no, ``score`` an integer 0-5 (an integral float
  such as ``4.0`` is accepted; ``4.8`` or ``"4"`` is not);
- parse failures and requests that still fail after the retries are counted in the report,
  never dropped and never fatal;
- raw replies are cached in a JSONL file keyed by a hash of (model, question, answer,
  prediction), so a rerun asks the endpoint only for what it has not answered yet. Parse failures
  are cached too (the reply is re-parsed on every run); failed requests are not, so they are
  retried by the next run.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from vidlora.errors import VidloraError
from vidlora.jsonl import JsonlAppender, JsonlError, read_jsonl

SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. "
    "Your task is to compare the predicted answer with the correct answer and determine if they match "
    "meaningfully. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
"""System message of the original protocol (its missing spaces between fragments kept as is)."""

USER_PROMPT_TEMPLATE = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer: {prediction}\n\n"
    "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, "
    "with 5 indicating the highest meaningful match. "
    "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', "
    "where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
    "For example, your response should look like this: {{'pred': 'yes', 'score': 4.8}}."
)
"""User message of the original protocol; ``str.format`` fields question / answer / prediction."""

_FIRST_DICT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_MAX_BACKOFF_S = 30.0
NONE_BUCKET = "(none)"

Status = Literal["ok", "parse_failure", "error"]


class JudgeConfigError(VidloraError, ValueError):
    """Judge options that cannot work (missing URL/model, unset API-key variable, bad numbers)."""


class JudgeParseError(ValueError):
    """A judge reply that is not a valid ``{'pred': yes|no, 'score': 0-5}`` dict."""


class JudgeCacheError(VidloraError, ValueError):
    """A judge cache file with a line that is not a cache entry."""


class JudgeRequestError(RuntimeError):
    """A request that failed for good (retries exhausted, or an error not worth retrying)."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to ask the judge."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)  # never printed
    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 1.0
    workers: int = 4
    cache_path: Path | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.base_url:
            problems.append("--judge_base_url is required")
        if not self.model:
            problems.append("--judge_model is required")
        if self.timeout <= 0:
            problems.append(f"--judge_timeout must be > 0, got {self.timeout}")
        if self.max_retries < 0:
            problems.append(f"--judge_max_retries must be >= 0, got {self.max_retries}")
        if self.backoff < 0:
            problems.append(f"--judge_backoff must be >= 0, got {self.backoff}")
        if self.workers < 1:
            problems.append(f"--judge_workers must be >= 1, got {self.workers}")
        if problems:
            raise JudgeConfigError("; ".join(problems))


@dataclass(frozen=True)
class Judgement:
    """A valid judge verdict."""

    pred: Literal["yes", "no"]
    score: int


@dataclass(frozen=True)
class JudgeResult:
    """The outcome for one record: a verdict, an unparsable reply, or a failed request."""

    status: Status
    judgement: Judgement | None = None
    reply: str | None = None
    error: str | None = None
    cached: bool = False
    attempts: int = 0


def config_from_args(args: argparse.Namespace) -> JudgeConfig:
    """Build a ``JudgeConfig`` from `vidlora eval` arguments, reading the key from the environment.

    An unset key variable is an error (rather than sending unauthenticated requests that would all
    fail); pass ``--judge_api_key_env ''`` for endpoints without authentication.
    """
    api_key = None
    if args.judge_api_key_env:
        api_key = os.environ.get(args.judge_api_key_env)
        if not api_key:
            raise JudgeConfigError(
                f"environment variable {args.judge_api_key_env} is not set (it should hold the judge's "
                "API key); pass --judge_api_key_env '' for an endpoint that needs no key"
            )
    cache = args.judge_cache
    if cache is None:
        out = Path(args.out)
        cache = out.with_name(out.stem + ".judge_cache.jsonl")
    return JudgeConfig(
        base_url=args.judge_base_url or "",
        model=args.judge_model or "",
        api_key=api_key,
        timeout=args.judge_timeout,
        max_retries=args.judge_max_retries,
        backoff=args.judge_backoff,
        workers=args.judge_workers,
        cache_path=Path(cache),
    )


def build_messages(question: str, answer: str, prediction: str) -> list[dict[str, str]]:
    """The system + user messages of the Video-ChatGPT protocol for one item."""
    user = USER_PROMPT_TEMPLATE.format(question=question, answer=answer, prediction=prediction)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_judgement(text: str) -> Judgement:
    """Parse a judge reply: the first ``{...}`` in it, as JSON or a Python literal (never ``eval``).

    Raises ``JudgeParseError`` when there is no dict, it does not parse, ``pred`` is not yes/no
    (case and surrounding spaces ignored) or ``score`` is not an integer 0-5 (``4.0`` is accepted).
    """
    match = _FIRST_DICT.search(text)
    if match is None:
        raise JudgeParseError(f"no {{...}} in reply {text[:200]!r}")
    snippet = match.group(0)
    try:
        value = json.loads(snippet)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(snippet)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as err:
            raise JudgeParseError(f"cannot parse {snippet[:200]!r}: {err}") from None
    if not isinstance(value, dict):
        raise JudgeParseError(f"expected a dict, got {snippet[:200]!r}")
    pred, score = value.get("pred"), value.get("score")
    if not isinstance(pred, str) or pred.strip().lower() not in ("yes", "no"):
        raise JudgeParseError(f"'pred' must be 'yes' or 'no', got {pred!r}")
    if isinstance(score, float) and score.is_integer():
        score = int(score)
    if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 5:
        raise JudgeParseError(f"'score' must be an integer 0-5, got {score!r}")
    return Judgement(pred=pred.strip().lower(), score=score)  # type: ignore[arg-type]


def cache_key(model: str, question: str, answer: str, prediction: str) -> str:
    """Stable key of one judge question: sha256 of the JSON list (model, question, answer, prediction)."""
    payload = json.dumps([model, question, answer, prediction], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _is_retryable_http(code: int) -> bool:
    return code == 429 or code >= 500


def request_completion(config: JudgeConfig, messages: Sequence[Mapping[str, str]]) -> tuple[str, int]:
    """POST one chat completion (temperature 0) and return ``(reply text, attempts used)``.

    Timeouts, connection errors, HTTP 429 and 5xx are retried up to ``config.max_retries`` times
    with exponential backoff; other HTTP errors and malformed response bodies fail at once.
    Raises ``JudgeRequestError`` when no reply could be obtained.
    """
    url = config.base_url.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": config.model, "messages": list(messages), "temperature": 0}).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    last_error = ""
    attempts = 0
    for attempt in range(config.max_retries + 1):
        if attempt:
            time.sleep(min(config.backoff * 2 ** (attempt - 1), _MAX_BACKOFF_S))
        attempts = attempt + 1
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=config.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            last_error = f"HTTP {err.code} {err.reason}"
            if _is_retryable_http(err.code):
                continue
            raise JudgeRequestError(f"{last_error} from {url}", attempts) from None
        except (OSError, http.client.HTTPException) as err:
            # URLError (connection refused, DNS), timeouts and dropped connections are all OSErrors.
            reason = getattr(err, "reason", err)
            last_error = f"{type(reason).__name__}: {reason}"
            continue
        try:
            return json.loads(raw)["choices"][0]["message"]["content"], attempts
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeRequestError(f"unexpected response body from {url}: {raw[:200]!r}", attempts) from None
    raise JudgeRequestError(f"gave up after {attempts} attempt(s): {last_error}", attempts)


def _result_from_reply(reply: str, attempts: int, cached: bool) -> JudgeResult:
    try:
        judgement = parse_judgement(reply)
    except JudgeParseError as err:
        return JudgeResult("parse_failure", reply=reply, error=str(err), cached=cached, attempts=attempts)
    return JudgeResult("ok", judgement=judgement, reply=reply, cached=cached, attempts=attempts)


def load_cache(path: Path) -> dict[str, str]:
    """Cached raw replies by key; a missing file is an empty cache, a malformed line an error.

    A torn last line (the run was killed while writing it) is skipped: the next run asks again and
    its appender cuts the fragment first.
    """
    replies: dict[str, str] = {}
    if not path.exists():
        return replies
    try:
        for lineno, entry in read_jsonl(path, allow_torn_tail=True):
            if not isinstance(entry, dict) or "key" not in entry or "reply" not in entry:
                raise JudgeCacheError(f"{path}:{lineno}: malformed judge cache line (delete it to ask again)")
            replies[str(entry["key"])] = str(entry["reply"])
    except JsonlError as err:
        raise JudgeCacheError(
            f"{path}:{err.line}: malformed judge cache line ({err.reason}; delete it to ask again)"
        ) from None
    return replies


def _question_of(record: Mapping[str, Any]) -> str:
    question = record.get("question")
    return question if isinstance(question, str) else ""


def judge_records(
    records: Sequence[Mapping[str, Any]], config: JudgeConfig, progress: bool = True
) -> list[JudgeResult]:
    """Judge every record (``question``, ``answer``, ``prediction``); one result per record, in order.

    Identical (question, answer, prediction) triples are asked once. Cached replies are reused;
    new replies are appended to the cache as they arrive (by this thread only, so lines never
    interleave).
    """
    keys = [cache_key(config.model, _question_of(r), str(r["answer"]), str(r["prediction"])) for r in records]
    cache = load_cache(config.cache_path) if config.cache_path else {}
    by_key: dict[str, JudgeResult] = {
        k: _result_from_reply(cache[k], 0, True) for k in set(keys) if k in cache
    }
    todo: dict[str, Mapping[str, Any]] = {}
    for key, record in zip(keys, records, strict=True):
        if key not in by_key and key not in todo:
            todo[key] = record
    if todo:
        appender: JsonlAppender | nullcontext[None] = (
            JsonlAppender(config.cache_path) if config.cache_path else nullcontext()
        )
        with appender as cache_file, ThreadPoolExecutor(max_workers=config.workers) as pool:
            futures = {
                pool.submit(
                    request_completion,
                    config,
                    build_messages(_question_of(r), str(r["answer"]), str(r["prediction"])),
                ): key
                for key, r in todo.items()
            }
            done = as_completed(futures)
            for future in tqdm(done, total=len(futures), desc="judge", disable=not progress):
                key = futures[future]
                try:
                    reply, attempts = future.result()
                except JudgeRequestError as err:
                    by_key[key] = JudgeResult("error", error=str(err), attempts=err.attempts)
                    continue
                by_key[key] = _result_from_reply(reply, attempts, cached=False)
                if cache_file is not None:
                    cache_file.write({"key": key, "model": config.model, "reply": reply})
    return [by_key[key] for key in keys]


def _bucket(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key)
    return NONE_BUCKET if value is None else str(value)


def _summary(results: Sequence[JudgeResult]) -> dict[str, Any]:
    verdicts = [r.judgement for r in results if r.judgement is not None]
    yes = sum(v.pred == "yes" for v in verdicts)
    no = len(verdicts) - yes
    return {
        "n": len(results),
        "yes": yes,
        "no": no,
        "accuracy": yes / (yes + no) if verdicts else None,
        "mean_score": sum(v.score for v in verdicts) / len(verdicts) if verdicts else None,
        "parse_failures": sum(r.status == "parse_failure" for r in results),
        "errors": sum(r.status == "error" for r in results),
    }


def summarize_judgements(
    records: Sequence[Mapping[str, Any]], results: Sequence[JudgeResult], config: JudgeConfig | None = None
) -> dict[str, Any]:
    """Judge accuracy yes/(yes+no), mean score, parse-failure and error counts, overall and by type/modality.

    ``accuracy`` and ``mean_score`` cover valid verdicts only and are ``None`` when there are none;
    ``parse_failures`` and ``errors`` say how many records they leave out.
    """
    if len(records) != len(results):
        raise ValueError(f"{len(records)} records but {len(results)} judge results")
    summary = _summary(results)
    summary["cached"] = sum(r.cached for r in results)
    if config is not None:
        summary["model"] = config.model
        summary["base_url"] = config.base_url
    for group, field_name in (("by_type", "type"), ("by_modality", "modality")):
        buckets: dict[str, list[JudgeResult]] = {}
        for record, result in zip(records, results, strict=True):
            buckets.setdefault(_bucket(record, field_name), []).append(result)
        summary[group] = {name: _summary(items) for name, items in sorted(buckets.items())}
    return summary
