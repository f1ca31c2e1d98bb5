"""Conversations → chat-template tokens with the assistant-only loss mask, derived generically from any template."""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant",
          "system": "system"}
# What one row became; the batcher counts these (they travel with the element through grain's threads).
OK, TRUNCATED, MALFORMED, TOO_LONG, EMPTY = range(5)


class MalformedRow(ValueError):
  """A row that cannot be a training conversation; `reason` is a short category for the counters."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def normalize_conversation(row: Any) -> list[dict[str, str]]:
  """ShareGPT (`conversations` of from/value) or `messages` (role/content) → [system], user, assistant, ...

  Leading assistant turns are dropped (the ShareGPT V3 split cuts long chats so that parts start with "gpt"),
  a trailing user turn is dropped (it has nothing to learn from), then roles must alternate starting with user.
  """
  if not isinstance(row, dict):
    raise MalformedRow("not_an_object")
  if "_malformed" in row:
    raise MalformedRow(row["_malformed"])
  turns = row.get("messages")
  turns = row.get("conversations") if turns is None else turns
  if not isinstance(turns, (list, tuple)) or not turns:
    raise MalformedRow("no_turns")
  messages = []
  for turn in turns:
    if not isinstance(turn, dict):
      raise MalformedRow("turn_not_an_object")
    role = turn.get("role") or turn.get("from")
    role = _ROLES.get(role) if isinstance(role, str) else None
    content = turn.get("content") if turn.get("content") is not None else turn.get("value")
    if role is None:
      raise MalformedRow("unknown_role")
    if not isinstance(content, str):
      raise MalformedRow("content_not_a_string")
    messages.append({"role": role, "content": content})
  system = messages[:1] if messages[0]["role"] == "system" else []
  body = messages[len(system):]
  while body and body[0]["role"] == "assistant":
    body = body[1:]
  if body and body[-1]["role"] == "user":
    body = body[:-1]
  if not body:
    raise MalformedRow("no_assistant_turn")
  if any(m["role"] == "system" for m in body):
    raise MalformedRow("misplaced_system")
  for k, m in enumerate(body):
    if m["role"] != ("user", "assistant")[k % 2]:
      raise MalformedRow("roles_not_alternating")
  return system + body


class ChatEncoder:
  """Raw row → {tokens, loss_mask, status, reason} through the tokenizer's chat template (picklable grain map).

  The mask is derived for any template: assistant turn i covers the tokens that rendering messages[:i+1] adds
  to rendering messages[:i] with the generation prompt. Both renderings must tokenise to prefixes of the whole
  conversation's tokens (else the row is malformed: training would see tokens that inference never produces).
  The turn's own framing is found once by rendering two probe replies: a leading part the generation prompt
  did not cover is unmasked, and of the trailing part only the first special token (the end-of-turn) is kept.
  """

  _PROBES = ("Probe reply one", "Another probe reply 2")

  def __init__(self, tokenizer, *, max_length: int, overflow: str = "drop", system_prompt: str | None = None):
    if not getattr(tokenizer, "chat_template", None):
      raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat_template")
    self.tokenizer, self.max_length, self.overflow = tokenizer, max_length, overflow
    self.system_prompt = system_prompt
    # The Rust tokenizer's encode borrows immutably, so grain's threads can share it; the transformers wrapper
    # resets truncation/padding on every call ("RuntimeError: Already borrowed" under threads).
    self._backend = copy.deepcopy(getattr(tokenizer, "backend_tokenizer", None))
    if self._backend is not None:
      self._backend.no_truncation()
      self._backend.no_padding()
    specials = set(getattr(tokenizer, "all_special_ids", ()))
    specials |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    head, tail = self._turn_framing()
    self._head = self.encode(head) if head else []
    self._tail = self.encode(tail) if tail else []
    self._tail_keep = next((k + 1 for k, t in enumerate(self._tail) if t in specials), len(self._tail))

  def encode(self, text: str) -> list[int]:
    if self._backend is not None:
      return self._backend.encode(text, add_special_tokens=False).ids
    return self.tokenizer(text, add_special_tokens=False)["input_ids"]

  def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

  def _turn_framing(self) -> tuple[str, str]:
    """(text before, text after) the content of an assistant turn, or ("", "") if the template hides it."""
    system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
    found = set()
    for probe in self._PROBES:
      messages = system + [{"role": "user", "content": "Probe question"}, {"role": "assistant", "content": probe}]
      try:
        prompt, full = self.render(messages[:-1], True), self.render(messages, False)
      except Exception:  # noqa: BLE001  (a template that rejects the probe: mask whole turns)
        return "", ""
      at = full.find(probe, len(prompt))
      if not full.startswith(prompt) or at < 0:
        return "", ""
      found.add((full[len(prompt):at], full[at + len(probe):]))
    return found.pop() if len(found) == 1 else ("", "")

  def encode_messages(self, messages: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray, int, str]:
    """(tokens int32[n], loss_mask int32[n], status, reason) with n <= max_length."""
    if self.system_prompt is not None and messages[0]["role"] != "system":
      messages = [{"role": "system", "content": self.system_prompt}] + messages
    try:
      full = self.encode(self.render(messages, False))
    except Exception as e:  # noqa: BLE001  (templates raise TemplateError, TypeError, ...)
      return _EMPTY_IDS, _EMPTY_IDS, MALFORMED, f"template_error:{type(e).__name__}"
    if len(full) > self.max_length and self.overflow == "drop":
      return _EMPTY_IDS, _EMPTY_IDS, TOO_LONG, "too_long"
    limit = min(len(full), self.max_length)
    mask = np.zeros(len(full), np.int32)
    for i, message in enumerate(messages):
      if message["role"] != "assistant":
        continue
      try:
        prompt = self.encode(self.render(messages[:i], True))
        if len(prompt) >= limit:
          break  # this turn and the rest are cut off
        turn = full if i == len(messages) - 1 else self.encode(self.render(messages[: i + 1], False))
      except Exception as e:  # noqa: BLE001
        return _EMPTY_IDS, _EMPTY_IDS, MALFORMED, f"template_error:{type(e).__name__}"
      if turn[: len(prompt)] != prompt or full[: len(turn)] != turn:
        return _EMPTY_IDS, _EMPTY_IDS, MALFORMED, "template_not_prefix_stable"
      start, stop = len(prompt), len(turn)
      if self._head and full[start : start + len(self._head)] == self._head:
        start += len(self._head)
      if self._tail and stop - start >= len(self._tail) and full[stop - len(self._tail) : stop] == self._tail:
        stop -= len(self._tail) - self._tail_keep
      mask[start:stop] = 1
    tokens, mask = np.asarray(full[: self.max_length], np.int32), mask[: self.max_length]
    if not mask.any():
      return _EMPTY_IDS, _EMPTY_IDS, EMPTY, "no_assistant_token_left"
    return tokens, mask, (TRUNCATED if len(full) > self.max_length else OK), ""

  def __call__(self, row: Any) -> dict[str, Any]:
    try:
      tokens, mask, status, reason = self.encode_messages(normalize_conversation(row))
    except MalformedRow as e:
      tokens, mask, status, reason = _EMPTY_IDS, _EMPTY_IDS, MALFORMED, e.reason
    return {"tokens": tokens, "loss_mask": mask, "status": status, "reason": reason}


_EMPTY_IDS = np.zeros((0,), np.int32)
