"""Benchmark: the clearing's CPU per record on the wire side, stage by stage, for 100-record and 1-record
messages; one run, the alternatives side by side.

    python3 bench/wire_bench.py [--records 20000] [--terminals 20] [--batch 100] [--repeat 5]

Not a test: it prints µs of CPU per record (each figure the best of ``--repeat`` passes, interleaved, under the
collector settings of ``clearing serve``) and asserts nothing. Rows:

- decoded first: what every payload went through before (``terminals.messages``): the limits on the text
  (``_check_text``), ``json.loads``, then the batch and each record validated from the decoded documents;
- from the text: ``parse_uplink_records``, which parses and validates a usual payload in one pydantic pass;
- the intake's ``check`` (everything but the TACs), its ``verify`` (the batched TACs), and the whole
  ``Intake.messages``;
- per accepted record: its ``Accepted`` verdict with the canonical JSON (part of ``verify``) and its ledger row
  (``clearing.ledger.ledger_row``).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from clearing_bench import CITY, HOST, make_stream

from clearing.intake import Accepted, Intake, Topic
from clearing.ledger import ledger_row
from clearing.schema import SOURCE_TERMINAL
from terminals.messages import (
    DEFAULT_LIMITS,
    _check_text,
    parse_record,
    parse_uplink,
    parse_uplink_records,
)


def _limits(text: str) -> str:
    _check_text(text, DEFAULT_LIMITS)
    return text


def stages(items: list[tuple[Topic, bytes]], intake: Intake) -> dict[str, Callable[[], object]]:
    """Each stage as a function over every message."""
    payloads = [payload for _, payload in items]
    texts = [payload.decode() for payload in payloads]
    checked = intake.check(items, frozenset())
    accepted = [v for message in intake.verify(checked) for v in message if isinstance(v, Accepted)]
    assert len(accepted) == sum(len(message) for message in checked.drafts)
    return {
        "limits on the text": lambda: [_limits(text) for text in texts],
        "json.loads": lambda: [json.loads(text) for text in texts],
        "decoded first, validated": lambda: [[parse_record(d) for d in parse_uplink(p)] for p in payloads],
        "from the text (fast path)": lambda: [parse_uplink_records(p) for p in payloads],
        "intake check": lambda: intake.check(items, frozenset()),
        "intake verify (TACs)": lambda: intake.verify(checked),
        "intake messages": lambda: intake.messages(items, frozenset()),
        "accepted (its canonical JSON)": lambda: [Accepted(a.record, a.forward) for a in accepted],
        "ledger row": lambda: [ledger_row(CITY, a, SOURCE_TERMINAL, 0.0) for a in accepted],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--terminals", type=int, default=20)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    runs = {}
    for batch in (args.batch, 1):
        stream = make_stream(args.records if batch > 1 else args.records // 10, args.terminals, batch)
        items = [(Topic("terminal", m.terminal), m.payload.encode()) for m in stream]
        funcs = stages(items, Intake(CITY, HOST))
        runs[batch] = (sum(m.records for m in stream), funcs)
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)  # as clearing serve
    best: dict[tuple[int, str], float] = {}
    for _ in range(args.repeat):
        for batch, (count, funcs) in runs.items():
            for name, func in funcs.items():
                started = time.process_time()
                func()
                spent = (time.process_time() - started) / count * 1e6
                best[batch, name] = min(best.get((batch, name), spent), spent)
    print(f"{'µs of CPU per record':32s}" + "".join(f"{f'{b}-record msgs':>16s}" for b in runs))
    for name in runs[args.batch][1]:
        print(f"{name:32s}" + "".join(f"{best[b, name]:16.2f}" for b in runs))


if __name__ == "__main__":
    main()
