"""Generate the bundled demo task: support tickets -> {"topic": ..., "sentiment": ...} JSON.

    python examples/make_demo_data.py          # rewrites examples/demo/{train,test}.jsonl

Each ticket is written from sentence frames with slot fillers (paraphrases), so the labels are
learnable from words in the text: topic keywords (invoice, parcel, password, crashes, refund
of a returned item, ...) and sentiment phrases (frustrated / thanks / please advise), mixed with
filler sentences (greetings, order numbers, dates) that carry no label. Rows are chat records:

    {"messages": [{"role": "system", "content": INSTRUCTION},
                  {"role": "user", "content": ticket},
                  {"role": "assistant", "content": "{\"topic\": \"billing\", \"sentiment\": \"negative\"}"}]}

Seeded and deterministic. Train and test are free of exact and near duplicates (minilora.data.dedup
over both at Jaccard 0.9) and of prompt overlap (minilora's contamination check), and the test
set is balanced over the 15 (topic, sentiment) pairs.
"""

import json
import os
import random

from minilora.data.dedup import dedup
from minilora.data.holdout import assert_no_contamination
from minilora.data.records import Example

SEED = 1234
N_TRAIN, N_TEST = 450, 90
INSTRUCTION = "Classify the support ticket. Reply with JSON: topic and sentiment."

TOPICS = {
    "billing": {
        "thing": ["invoice", "bill", "monthly charge", "subscription fee", "payment", "credit card charge"],
        "frame": [
            "I was charged twice for my {thing}.",
            "My {thing} shows the wrong amount.",
            "Why did my {thing} go up this month?",
            "The {thing} was taken from my card before the due date.",
            "I need a copy of my last {thing}.",
            "There is an unknown {thing} on my statement.",
        ],
    },
    "shipping": {
        "thing": ["package", "parcel", "delivery", "shipment", "order box", "courier delivery"],
        "frame": [
            "My {thing} has not arrived yet.",
            "The tracking number for my {thing} does not work.",
            "The {thing} went to the wrong address.",
            "When will my {thing} be shipped?",
            "The courier left my {thing} at the neighbour.",
            "My {thing} is stuck in transit for a week.",
        ],
    },
    "account": {
        "thing": ["password", "login", "username", "profile", "account email", "two-factor code"],
        "frame": [
            "I cannot reset my {thing}.",
            "My {thing} stopped working and I am locked out.",
            "How do I change my {thing}?",
            "Someone else changed my {thing} without asking.",
            "The sign in page rejects my {thing}.",
            "I never received the {thing} reset email.",
        ],
    },
    "technical": {
        "thing": ["app", "website", "mobile app", "desktop program", "dashboard", "sync feature"],
        "frame": [
            "The {thing} crashes every time I open it.",
            "The {thing} shows an error message after the update.",
            "The {thing} freezes and will not load.",
            "I found a bug in the {thing}.",
            "The {thing} is very slow and keeps timing out.",
            "The {thing} stopped working on my phone.",
        ],
    },
    "returns": {
        "thing": ["jacket", "pair of shoes", "blender", "lamp", "headphones", "backpack"],
        "frame": [
            "I want to return the {thing} I bought.",
            "The {thing} is the wrong size, can I exchange it?",
            "How do I send the {thing} back for a replacement?",
            "The {thing} arrived damaged and I would like to return it.",
            "I need a return label for the {thing}.",
            "Can I swap the {thing} for a different color?",
        ],
    },
}

SENTIMENTS = {
    "negative": [
        "This is unacceptable.",
        "I am really frustrated.",
        "Very disappointed with your service.",
        "This is the third time, I am angry.",
        "Terrible experience so far.",
        "I am annoyed and upset.",
    ],
    "positive": [
        "Thanks so much for your help!",
        "You have been great so far.",
        "I love your service, thank you.",
        "Really happy with the quick support.",
        "Great team, appreciate it!",
        "Thank you, you are wonderful.",
    ],
    "neutral": [
        "Please advise.",
        "Could you let me know?",
        "Just asking for my records.",
        "Let me know the next steps.",
        "I would like some information.",
        "Please check when you can.",
    ],
}

OPENERS = ["Hi team,", "Hello,", "Good morning.", "Hi there.", "", "", ""]
FACTS = [
    "My order number is {n}.",
    "I ordered it on {d}.",
    "My customer id is {n}.",
    "I am writing from {city}.",
    "",
    "",
    "",
]
CITIES = ["Lisbon", "Oslo", "Denver", "Osaka", "Nairobi", "Lyon", "Perth", "Quito"]
DAYS = ["Monday", "Tuesday", "March 3", "June 12", "last week", "yesterday", "May 21"]


def ticket(rng: random.Random, topic: str, sentiment: str) -> str:
    t = TOPICS[topic]
    body = rng.choice(t["frame"]).format(thing=rng.choice(t["thing"]))
    mood = rng.choice(SENTIMENTS[sentiment])
    fact = rng.choice(FACTS).format(n=rng.randint(10000, 99999), d=rng.choice(DAYS), city=rng.choice(CITIES))
    parts = [body, mood] if rng.random() < 0.6 else [mood, body]
    if fact:
        parts.insert(rng.randint(0, len(parts)), fact)
    return " ".join([rng.choice(OPENERS)] + parts).strip()


def record(text: str, topic: str, sentiment: str) -> dict:
    answer = json.dumps({"topic": topic, "sentiment": sentiment})
    return {
        "messages": [
            {"role": "system", "content": INSTRUCTION},
            {"role": "user", "content": text},
            {"role": "assistant", "content": answer},
        ]
    }


def as_example(row: dict, source: str = "") -> Example:
    return Example(row["messages"][:-1], row["messages"][-1]["content"], "chat", source)


def main(out_dir: str) -> None:
    rng = random.Random(SEED)
    pairs = [(t, s) for t in TOPICS for s in SENTIMENTS]
    # Candidates, balanced over the 15 pairs; then dedup over the union, so no near-copies remain.
    candidates = [(ticket(rng, t, s), t, s) for _ in range(80) for t, s in pairs]
    examples = [as_example(record(*c), str(i)) for i, c in enumerate(candidates)]
    kept, _ = dedup(examples, near_threshold=0.9, seed=0)  # as prepare_data will see them
    unique = [candidates[int(e.source)] for e in kept]
    rng.shuffle(unique)
    test, train, per_pair = [], [], {p: 0 for p in pairs}
    for text, t, s in unique:
        if per_pair[(t, s)] < N_TEST // len(pairs):
            per_pair[(t, s)] += 1
            test.append(record(text, t, s))
        elif len(train) < N_TRAIN:
            train.append(record(text, t, s))
    assert len(test) == N_TEST and len(train) == N_TRAIN, (len(test), len(train))
    assert_no_contamination([as_example(r) for r in train], [as_example(r) for r in test])
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        path = os.path.join(out_dir, f"{name}.jsonl")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo"))
