"""Writes python_stdlib.jsonl: 200 multiple-choice continuations of Python standard-library code.

Each example is three consecutive non-blank lines of a stdlib module (`context`), and four
candidate next lines (`choices`): the true one and three lines drawn from other modules, of
length within 10 characters of it; `label` is the true one's index. Drawn with a fixed seed
from the modules lmjax's "stdlib" corpus reads, so a model trained on that corpus has seen
this kind of code (and maybe these very lines: a smoke test, not a held-out benchmark).

    python experiments/lm_eval/python_stdlib/make_examples.py
"""

import json
import random
from pathlib import Path

from lmjax.data.sources import stdlib_files

rng = random.Random(0)
files = sorted(stdlib_files())
lines_of = {f: [line.rstrip() for line in f.read_text(errors="replace").splitlines() if line.strip()] for f in files}
lines_of = {f: lines for f, lines in lines_of.items() if len(lines) > 20}
pool = [(f, line) for f, lines in lines_of.items() for line in lines if 10 <= len(line) <= 80]
examples = []
while len(examples) < 200:
    f = rng.choice(list(lines_of))
    lines = lines_of[f]
    i = rng.randrange(3, len(lines))
    answer = lines[i]
    if not 10 <= len(answer) <= 80:
        continue
    distractors = set()
    while len(distractors) < 3:
        g, line = rng.choice(pool)
        if g != f and abs(len(line) - len(answer)) <= 10 and line != answer:
            distractors.add(line)
    choices = sorted(distractors) + [answer]
    rng.shuffle(choices)
    examples.append({"context": "\n".join(lines[i - 3:i]) + "\n", "choices": choices, "label": choices.index(answer)})
out = Path(__file__).with_name("python_stdlib.jsonl")
out.write_text("".join(json.dumps(e) + "\n" for e in examples))
print(f"wrote {len(examples)} examples to {out}")
