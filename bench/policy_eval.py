"""Time the bench policies' ``PolicyEngine.evaluate`` on the sample input documents.

The input document holds only the fields the policy reads, as the gateway builds it, so
this is the time one request spends in regorus, without building the document.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ext_proc import policy

POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"
CASES = (
    ("request", POLICY_DIR / "bench_request.rego", POLICY_DIR / "samples" / "request_chat.json"),
    (
        "response",
        POLICY_DIR / "bench_response.rego",
        POLICY_DIR / "samples" / "response_tool_calls.json",
    ),
)


@dataclass(frozen=True)
class EvalTiming:
    stage: str
    policy: str
    input_bytes: int
    outcome: str
    p50_us: float
    p99_us: float


def time_evaluate(stage: str, policy_path: Path, sample_path: Path, rounds: int) -> EvalTiming:
    compiled = policy.compile_policy(policy_path.read_text(), policy_path.name)
    engine = policy.PolicyEngine([(compiled, False)], stage=stage)
    sample = json.loads(sample_path.read_text())
    required = engine.required_fields
    document = {
        k: v for k, v in sample.items() if required is None or k in required or k == "stage"
    }
    keys = engine.request_keys
    if keys is not None and "request" in document:
        # The gateway sends only the body keys the policy reads (Exchange.policy_input).
        document["request"] = {k: v for k, v in document["request"].items() if k in keys}
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    outcome = engine.evaluate(text).outcome
    timings = []
    for _ in range(rounds):
        began = time.perf_counter()
        engine.evaluate(text)
        timings.append((time.perf_counter() - began) * 1e6)
    timings.sort()
    return EvalTiming(
        stage,
        policy_path.name,
        len(text.encode()),
        outcome,
        timings[len(timings) // 2],
        timings[int(len(timings) * 0.99)],
    )


def measure_all(rounds: int = 5000) -> list[EvalTiming]:
    return [time_evaluate(stage, path, sample, rounds) for stage, path, sample in CASES]


if __name__ == "__main__":
    for timing in measure_all():
        print(timing)
