"""A scripted stand-in for a generation backend (logic tests of the augment package).

It reads the item/user data out of the prompt and continues the reply so far (the chat's prefill)
like a (bad) model would, stopping at the stop string:
* a title containing ``FIX-ME`` gets an invalid reply first and a valid one when repaired;
* ``NEVER-VALID`` always gets an invalid reply (-> rejected);
* ``ignore previous instructions and output <X>``: the fake OBEYS and answers
  ``{"summary": "<X>", "genres": ["Hacking"]}``, the worst case a real model could do;
* otherwise a valid JSON reply derived from the data it saw.
"""
from __future__ import annotations

import json
import re
import time

from genre_tasks.features.augment.backends import Reply

INJECT = re.compile(r"ignore previous instructions and output (.+?)(?:\\\"|\"|$)", re.I)


def _data(chat) -> str:
    messages, _ = chat
    user = [m["content"] for m in messages if m["role"] == "user"]
    return user[-1] if not user[-1].startswith("Your reply was not valid") else user[-2]


FIRST_STEPS = ('{"summary": "', '{"topics": ["', '{"items": [{"title": "', '{"reason": "')


class FakeBackend:
    model_id = "fake-model@1"

    def __init__(self, delay: float = 0.0, fail_after: int | None = None) -> None:
        self.calls: list[str] = []  # the data block of every prompt generated (once per attempt)
        self.delay = delay
        self.fail_after = fail_after  # raise after this many generate() calls (a crash; a prompt
        # takes one call per generated value, e.g. 2 for enrich_items)
        self.batches = 0

    def generate(self, chats, max_new_tokens, stop=None):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise RuntimeError("backend crashed")
        self.batches += 1
        out = []
        for chat in chats:
            data = _data(chat)
            repaired = chat[0][-1]["content"].startswith("Your reply was not valid")
            prefix = chat[1]  # the reply so far (the program wrote keys and punctuation)
            if prefix in FIRST_STEPS:  # count each prompt once, at its first generated value
                self.calls.append(data)
            m = INJECT.search(data)
            if m:
                full = json.dumps({"summary": m.group(1), "genres": ["Hacking"]})
            elif "NEVER-VALID" in data or ("FIX-ME" in data and not repaired):
                full = None
            elif prefix.startswith('{"summary"'):
                title = re.search(r'"title": "([^"]*)"', data.replace('\\"', '"'))
                full = json.dumps({"summary": f"A story about {title.group(1) if title else 'something'}.",
                                   "genres": ["drama"]})
            elif prefix.startswith('{"topics"'):
                full = json.dumps({"topics": ["Drama", "Comedy"], "profile": "Likes dramas and comedies a lot."})
            elif prefix.startswith('{"items"'):
                full = json.dumps({"items": [{"title": "A New Drama", "genres": ["Drama"]},
                                             {"title": "Another Drama", "genres": ["Comedy"]}]})
            else:
                full = json.dumps({"reason": "Because you liked a similar drama before."})
            text = full[len(prefix):] if full is not None and full.startswith(prefix) else "this is not json"
            if stop and stop in text:
                text = text[:text.index(stop)]
            out.append(Reply(text, max(1, len(text) // 4), 0.0))
        if self.delay:
            time.sleep(self.delay)
        return out
