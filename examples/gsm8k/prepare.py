"""Write GSM8K as lmpo prompt datasets: examples/gsm8k/{train,test}.jsonl.

Each row: ``prompt`` (chat messages, rendered with the model's chat template) and ``answer`` (GSM8K's
solution ending in ``#### 72``; the ``math_answer`` reward reads the number after ``####`` and
compares it by value with the completion's final ``\\boxed{}`` answer).

    pip install datasets && python examples/gsm8k/prepare.py
"""

import json
from pathlib import Path

from datasets import load_dataset

INSTRUCTION = "Solve the problem step by step, then give the final answer as \\boxed{{number}}.\n\n{question}"


def main(out=Path(__file__).parent):
    for split in ("train", "test"):
        ds = load_dataset("openai/gsm8k", "main", split=split)
        with open(out / f"{split}.jsonl", "w") as f:
            for row in ds:
                prompt = [{"role": "user", "content": INSTRUCTION.format(question=row["question"])}]
                f.write(json.dumps({"prompt": prompt, "answer": row["answer"]}) + "\n")
        print(f"{out / f'{split}.jsonl'}: {len(ds)} rows")


if __name__ == "__main__":
    main()
