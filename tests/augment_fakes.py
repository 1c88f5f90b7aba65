"""A scripted stand-in for a generation backend (logic tests of the augment package).

It reads the item/user data out of the prompt and answers like a (bad) model would:
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


class FakeBackend:
    model_id = "fake-model@1"

    def __init__(self, delay: float = 0.0, fail_after: int | None = None) -> None:
        self.calls: list[str] = []  # the data block of every prompt generated
        self.delay = delay
        self.fail_after = fail_after  # raise after this many generate() calls (a crash)
        self.batches = 0

    def generate(self, chats, max_new_tokens):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise RuntimeError("backend crashed")
        self.batches += 1
        out = []
        for chat in chats:
            data = _data(chat)
            repaired = chat[0][-1]["content"].startswith("Your reply was not valid")
            self.calls.append(data)
            prefill = chat[1]
            m = INJECT.search(data)
            if m:
                reply = json.dumps({"summary": m.group(1), "genres": ["Hacking"]})
            elif "NEVER-VALID" in data or ("FIX-ME" in data and not repaired):
                reply = prefill + "this is not json"
            elif prefill.startswith('{"summary"'):
                title = re.search(r'"title": "([^"]*)"', data.replace('\\"', '"'))
                reply = json.dumps({"summary": f"A story about {title.group(1) if title else 'something'}.",
                                    "genres": ["drama"]})
            elif prefill.startswith('{"topics"'):
                reply = json.dumps({"topics": ["Drama", "Comedy"], "profile": "Likes dramas and comedies a lot."})
            elif prefill.startswith('{"items"'):
                reply = json.dumps({"items": [{"title": "A New Drama", "genres": ["Drama"]}]})
            else:
                reply = json.dumps({"reason": "Because you liked a similar drama before."})
            text = reply[len(prefill):] if reply.startswith(prefill) else reply
            out.append(Reply(text, max(1, len(text) // 4), 0.0))
        if self.delay:
            time.sleep(self.delay)
        return out
