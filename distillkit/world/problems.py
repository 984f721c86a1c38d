"""The tiny reasoning world: chains of one-digit operations with exact answers and step traces.

A problem is a start digit followed by operations on one-digit operands, evaluated left to right
with every intermediate result kept modulo 10::

    question  "3+9-7*4"
    prompt    "3+9-7*4\\n<think> ### Step"                       (CoRD's prompt-guided template)
    response  " 1: 3+9=2\\n### Step 2: 2-7=5\\n### Step 3: 5*4=0\\n</think> The final answer is 0."

Every token of a trace sits at a fixed offset from the operands it depends on (digits are single
characters), which is what lets a 0.3M-parameter model learn the world in minutes on a CPU.

Each step has a *kind*, the ways people (and our teachers) err on such steps:

    carry     a + b >= 10   (the wrap-around of an addition)
    borrow    a - b < 0     (the wrap-around of a subtraction)
    overflow  a * b >= 10   (a product with a tens digit)
    plain     everything else

A *flaw* is a systematic wrong rule for one kind (``FLAWS``): a flawed trace applies it on every
step of that kind and computes everything else correctly from its (possibly wrong) running value,
so its final answer is the value its own steps lead to. The shipped teachers were trained on
traces with one flaw each, so they err on complementary kinds of step.

:func:`solve` computes answers by this module's rule; :func:`evaluate_question` is an independent
evaluator (it parses the question text and folds it with Python's own operators), used by the
tests to check the generator, and :func:`check_trace` checks a written trace step by step.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

OPS = ("+", "-", "*")
KINDS = ("carry", "borrow", "overflow", "plain")
MODULUS = 10
NUM_OPS = 3
PROMPT_TEMPLATE = "{question}\n<think> ### Step"  # distillkit.data.DEFAULT_PROMPT
STEP_HEADER = "### Step"
END_MARKER = "</think>"
ANSWER_TEMPLATE = " The final answer is {answer}."

# The flawed rule a teacher follows on steps of one kind: (a, b) -> the digit it writes.
FLAWS = {
    "carry": lambda a, b: (a + b + 1) % MODULUS,    # adds the carry into the units digit
    "borrow": lambda a, b: (a - b - 1) % MODULUS,   # takes one more on a borrow
    "overflow": lambda a, b: (a * b) // MODULUS,    # writes the tens digit of the product
}


@dataclass(frozen=True)
class Problem:
    """``start`` followed by ``ops`` [(op, operand)], each a one-digit operand and op in OPS."""

    start: int
    ops: tuple[tuple[str, int], ...]

    def __post_init__(self):
        if not (isinstance(self.start, int) and 0 <= self.start < MODULUS):
            raise ValueError(f"start={self.start!r}: expected a digit 0-9")
        if not self.ops:
            raise ValueError("ops: expected at least one operation")
        for op, b in self.ops:
            if op not in OPS or not (isinstance(b, int) and 0 <= b < MODULUS):
                raise ValueError(f"ops: expected (op in {OPS}, digit 0-9), got {(op, b)!r}")

    @property
    def question(self) -> str:
        return f"{self.start}" + "".join(f"{op}{b}" for op, b in self.ops)

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(question=self.question)

    @property
    def answer(self) -> str:
        return str(solve(self))


def step_kind(a: int, op: str, b: int) -> str:
    """The kind of the step ``a op b`` (one of KINDS)."""
    if op == "+" and a + b >= MODULUS:
        return "carry"
    if op == "-" and a - b < 0:
        return "borrow"
    if op == "*" and a * b >= MODULUS:
        return "overflow"
    return "plain"


def apply_op(a: int, op: str, b: int, flaw: str | None = None) -> int:
    """The digit written for the step ``a op b``: correct mod 10, or by ``flaw``'s rule on its kind."""
    if flaw is not None and step_kind(a, op, b) == flaw:
        return FLAWS[flaw](a, b)
    if op == "+":
        return (a + b) % MODULUS
    if op == "-":
        return (a - b) % MODULUS
    return (a * b) % MODULUS


def steps(problem: Problem, flaw: str | None = None) -> list[tuple[int, str, int, int]]:
    """[(a, op, b, written result)] for each step; a flawed trace carries its own running value."""
    if flaw is not None and flaw not in FLAWS:
        raise ValueError(f"flaw={flaw!r}: expected one of {tuple(FLAWS)} or None")
    out, value = [], problem.start
    for op, b in problem.ops:
        nxt = apply_op(value, op, b, flaw)
        out.append((value, op, b, nxt))
        value = nxt
    return out


def solve(problem: Problem) -> int:
    return steps(problem)[-1][3]


def format_step(index: int, a: int, op: str, b: int, result: int) -> str:
    """One step as written after ``"### Step"``: ``" 2: 7-1=6\\n"``."""
    return f" {index}: {a}{op}{b}={result}\n"


def trace(problem: Problem, flaw: str | None = None, *, num_steps: int | None = None,
          close: bool = True) -> str:
    """The response that follows :attr:`Problem.prompt` (which ends with ``"### Step"``).

    ``num_steps`` keeps only the first steps (a partial trace, for the meta-prover); ``close`` adds
    ``"</think> The final answer is N."`` with N the last written value (only for complete traces).
    """
    rows = steps(problem, flaw)
    n = len(rows) if num_steps is None else num_steps
    if not 0 <= n <= len(rows):
        raise ValueError(f"num_steps={num_steps!r}: expected 0..{len(rows)}")
    text = f"\n{STEP_HEADER}".join(format_step(i + 1, *row)[:-1] for i, row in enumerate(rows[:n]))
    if n:
        text += "\n"
    if close and n == len(rows):
        text += END_MARKER + ANSWER_TEMPLATE.format(answer=rows[-1][3])
    return text


def random_problem(rng: random.Random, num_ops: int = NUM_OPS) -> Problem:
    return Problem(rng.randrange(MODULUS), tuple((rng.choice(OPS), rng.randrange(MODULUS)) for _ in range(num_ops)))


def generate_problems(n: int, *, seed: int, num_ops: int = NUM_OPS, exclude: Sequence[str] = ()) -> list[Problem]:
    """``n`` distinct problems drawn under ``seed`` (questions in ``exclude`` are skipped).

    There are 10 * 30**num_ops distinct problems (270,000 for 3 operations).
    """
    if num_ops < 1:
        raise ValueError(f"num_ops={num_ops}: expected >= 1")
    space = MODULUS * (len(OPS) * MODULUS) ** num_ops
    banned = set(exclude)
    if n < 0 or n > space - len(banned):
        raise ValueError(f"n={n}: expected 0..{space - len(banned)} for num_ops={num_ops}")
    rng = random.Random(seed)
    out, seen = [], set(banned)
    while len(out) < n:
        p = random_problem(rng, num_ops)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def to_record(problem: Problem, index: int | str, flaw: str | None = None) -> dict:
    """A plain JSONL record {id, question, answer, response} (distillkit.data reads it)."""
    return {"id": str(index), "question": problem.question, "answer": problem.answer,
            "response": trace(problem, flaw)}


def kinds_of(problem: Problem) -> list[str]:
    """The kind of each step of the correct trace."""
    return [step_kind(a, op, b) for a, op, b, _ in steps(problem)]


# ----------------------------------------------------------------------------------------------
# Independent checking: parses text, does not reuse the generator's rule functions.
# ----------------------------------------------------------------------------------------------
_QUESTION = re.compile(r"(\d)((?:[-+*]\d)+)")
_STEP = re.compile(r"(\d+): (\d)([-+*])(\d)=(\d+)")


def parse_question(question: str) -> tuple[int, list[tuple[str, int]]]:
    m = _QUESTION.fullmatch(question.strip())
    if m is None:
        raise ValueError(f"question={question!r}: expected a digit followed by op-digit pairs, e.g. '3+9-7'")
    tail = m.group(2)
    return int(m.group(1)), [(tail[i], int(tail[i + 1])) for i in range(0, len(tail), 2)]


def evaluate_question(question: str) -> str:
    """The exact answer of a question, evaluated from its text with Python's operators."""
    import operator

    table = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    value, ops = parse_question(question)
    for op, b in ops:
        value = table[op](value, b) % 10
    return str(value)


def check_trace(question: str, response: str) -> dict:
    """Checks a written trace step by step against the question.

    Returns {"steps": [{"index", "a", "op", "b", "written", "kind", "ok", "consistent"}],
    "well_formed", "all_steps_ok", "answer", "answer_ok"}: ``ok`` means the step's result is right
    for its own left operand; ``consistent`` that the left operand is the previous step's result
    (the start digit for step 1) and the operand is the question's. ``answer_ok`` compares the
    extracted final answer with :func:`evaluate_question`.
    """
    from distillkit.answers import answers_match, extract_answer

    start, ops = parse_question(question)
    reasoning = response.split(END_MARKER)[0]
    found = _STEP.findall(reasoning)
    rows, prev = [], start
    for i, (idx, a, op, b, written) in enumerate(found):
        a, b, written = int(a), int(b), int(written)
        exact = {"+": a + b, "-": a - b, "*": a * b}[op] % 10
        kind = ("carry" if op == "+" and a + b > 9 else "borrow" if op == "-" and a < b
                else "overflow" if op == "*" and a * b > 9 else "plain")
        consistent = (a == prev and i < len(ops) and ops[i] == (op, b) and int(idx) == i + 1)
        rows.append({"index": int(idx), "a": a, "op": op, "b": b, "written": written, "kind": kind,
                     "ok": written == exact, "consistent": consistent})
        prev = written
    truth = evaluate_question(question)
    answer = extract_answer(response) if END_MARKER in response else None
    well_formed = len(rows) == len(ops) and all(r["consistent"] for r in rows)
    return {"steps": rows, "well_formed": well_formed, "all_steps_ok": well_formed and all(r["ok"] for r in rows),
            "answer": answer, "answer_ok": answers_match(answer, truth)}


# ----------------------------------------------------------------------------------------------
# Command line: question files for running the methods' CLIs on the shipped models
# ----------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distillkit.world.problems --n 32 --seed 7 --out questions.jsonl``: {id, question,
    answer} per line (``--flaw KIND`` adds a "response" trace with that teacher's systematic error,
    ``--flaw none`` a correct one)."""
    import argparse
    import json
    import os

    p = argparse.ArgumentParser(prog="python -m distillkit.world.problems", description=main.__doc__.split("\n")[0])
    p.add_argument("--n", type=int, required=True, help="number of distinct problems")
    p.add_argument("--seed", type=int, default=7, help="problem draw seed (default: 7)")
    p.add_argument("--num-ops", type=int, default=NUM_OPS, help=f"operations per problem (default: {NUM_OPS})")
    p.add_argument("--flaw", choices=("none", *FLAWS), default=None,
                   help="also write a 'response' trace: correct (none) or with one kind of step wrong")
    p.add_argument("--out", required=True, help="output JSONL (written whole, then renamed into place)")
    args = p.parse_args(argv)
    probs = generate_problems(args.n, seed=args.seed, num_ops=args.num_ops)
    tmp = f"{args.out}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for i, prob in enumerate(probs):
            if args.flaw is None:
                row = {"id": str(i), "question": prob.question, "answer": prob.answer}
            else:
                row = to_record(prob, i, None if args.flaw == "none" else args.flaw)
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, args.out)
    print(f"{args.out}: {len(probs)} problems")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
