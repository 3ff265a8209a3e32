"""Generate the bundled preference pairs for `python train.py --objective dpo` (or orpo) on the tiny model.

    python examples/make_demo_pairs.py         # rewrites examples/demo/pairs_{train,test}.jsonl

Built from the SFT demo (examples/demo/{train,test}.jsonl, make_demo_data.py): the prompt is the
ticket's system and user messages (the system message asks for "JSON: topic and sentiment"), the
chosen answer is the correct JSON, and the rejected answer the same labels with the keys in the other
order. Both answers are the same tokens, so the base model has no length or vocabulary to prefer one
by (its preference accuracy starts near chance), and the preference is the order the instruction
names the fields in, which the tiny model learns in a few dozen steps. Chat form, the answers as
assistant turns:

    {"prompt": [{"role": "system", ...}, {"role": "user", "content": ticket}],
     "chosen": [{"role": "assistant", "content": "{\"topic\": \"billing\", \"sentiment\": \"negative\"}"}],
     "rejected": [{"role": "assistant", "content": "{\"sentiment\": \"negative\", \"topic\": \"billing\"}"}]}

Deterministic; the train pairs come from the SFT train rows and the test pairs from the
SFT test rows, which share no prompts (so the contamination check passes).
"""

import json
import os

N_TRAIN, N_TEST = 160, 90
HERE = os.path.dirname(os.path.abspath(__file__))


def swapped(answer: dict) -> str:
    """The same JSON with its keys in the other order than the instruction names them."""
    return json.dumps(dict(reversed(list(answer.items()))))


def main(demo: str) -> None:
    rows = {
        name: [json.loads(line) for line in open(os.path.join(demo, f"{name}.jsonl"))] for name in ("train", "test")
    }
    for name, n in (("train", N_TRAIN), ("test", N_TEST)):
        out = []
        for r in rows[name][:n]:
            answer = r["messages"][-1]["content"]
            turn = lambda text: [{"role": "assistant", "content": text}]
            out.append(
                {"prompt": r["messages"][:-1], "chosen": turn(answer), "rejected": turn(swapped(json.loads(answer)))}
            )
        path = os.path.join(demo, f"pairs_{name}.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in out)
        os.replace(path + ".tmp", path)
        print(f"wrote {len(out)} pairs to {path}")


if __name__ == "__main__":
    main(os.path.join(HERE, "demo"))
