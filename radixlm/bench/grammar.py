"""Constrained-decoding benchmark over the labelled JSON schemas (issues 6 and 12).

``radixlm bench grammar --schemas ../shared/schemas/dev`` runs, side by side:

- ``llguidance``: radixlm's default backend (llguidance with radixlm's schema repairs, see
  ``radixlm.constrained.json_repair``);
- ``llguidance-raw``: llguidance alone (``grammar_from_json_schema`` with its defaults);
- ``outlines``: radixlm's own JSON-schema-to-regex compiler + outlines-core token index;
- ``xgrammar``: XGrammar alone (its defaults), if installed (not a radixlm dependency);
- ``outlines-core``: outlines-core's own ``build_regex_from_schema`` + ``Index``.

A backend written ``NAME:K`` runs on every K-th schema only (the slow ones). Per schema:

- pass: it compiles, every ``valid: true`` instance is accepted and every invalid one rejected;
- false rejections: a valid instance the grammar does not accept in full (then EOS). Each
  instance is spelled the way the grammar accepts it if there is one (key order and number
  spelling found by asking the grammar, :func:`radixlm.constrained.grammar_json`), then
  tokenized with the tokenizer and fed token by token (outlines-core: its own spelling);
- compile time (p50/p90 over schemas that compiled);
- mask time per token per request (avg/p99 wall clock, and the same on the thread's CPU clock,
  which other processes on a shared box do not inflate): every position of every instance.

Each radixlm compilation runs in the compiler's own lanes; outlines-core in a killable child;
XGrammar in a thread with the time limit (a timed-out compile is abandoned). Also measured: the
batch mask cost per request at batch 1/32/256. Prints a table and writes JSON.

    python -m radixlm.bench.grammar --schemas ../shared/schemas/dev --out grammar.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SCHEMAS = ROOT.parent / "shared" / "schemas" / "dev"
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "llama3"
BACKENDS = ("llguidance", "llguidance-raw", "outlines:10", "xgrammar:10", "outlines-core:50")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns a process exit code."""
    args = _parse(argv)
    if args.baseline_child:
        return baseline_child_main(args.tokenizer)
    if args.kernel:
        result = kernel_timing()
        print(json.dumps(result, indent=1))
        _write(args.out, {"kernel": result})
        return 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    if args.reuse:
        rows = reuse_cost(tokenizer, args.timeout)
        _write(args.out, {"reuse": rows})
        return 0
    schemas = load_schemas(Path(args.schemas), args.limit, args.match)
    report: dict[str, Any] = {
        "schemas": len(schemas),
        "tokenizer": str(args.tokenizer),
        "timeout_s": args.timeout,
        "backends": {},
    }
    for spec in filter(None, args.backends.split(",")):
        backend, _, every = spec.partition(":")
        if backend == "xgrammar" and importlib.util.find_spec("xgrammar") is None:
            print("xgrammar is not installed: skipped", file=sys.stderr)
            continue
        sample = schemas[:: int(every)] if every else schemas
        started = time.time()
        records = run_backend(backend, sample, tokenizer, args)
        report["backends"][spec] = {
            "summary": summarize(records, len(sample)),
            "wall_s": time.time() - started,
            "records": records,
        }
        _print_summary(spec, report["backends"][spec]["summary"])
        _write(args.out, report)
    if args.batch:
        report["batch"] = batch_mask_cost(tokenizer, schemas, args)
        _print_batch(report["batch"])
    _write(args.out, report)
    print_table(report)
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemas", default=str(DEFAULT_SCHEMAS), help="schema directory")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="HF tokenizer dir")
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated; NAME:K runs NAME on every K-th schema only",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="compile limit (s)")
    parser.add_argument("--limit", type=int, default=0, help="first N schemas only")
    parser.add_argument("--match", default="", help="only schemas whose file name contains this")
    parser.add_argument("--out", default="grammar_bench.json", help="JSON report path")
    parser.add_argument("--batch", default="1,32,256", help="batch sizes for the mask cost")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="only the reused-grammar mask cost: a 3-field schema and "
        "[0-9a-f]{128} on llguidance and outlines",
    )
    parser.add_argument(
        "--kernel",
        action="store_true",
        help="only time apply_token_bitmask on CUDA (Triton vs the torch op)",
    )
    parser.add_argument("--baseline-child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_schemas(directory: Path, limit: int = 0, match: str = "") -> list[dict]:
    """The schema files (sorted by name), each ``{"name", "schema", "tests"}``."""
    out = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and match in path.name and path.suffix != ".md":
            data = json.loads(path.read_text())
            out.append({"name": path.name, "schema": data["schema"], "tests": data["tests"]})
    return out[:limit] if limit else out


def serialize(instance: Any, schema: Any) -> str:
    """The instance as the grammar spells it (plain compact JSON if that fails)."""
    from radixlm.constrained import canonical_json

    try:
        return canonical_json(instance, schema)
    except Exception:
        return json.dumps(instance, ensure_ascii=False, separators=(", ", ": "))


def run_backend(backend: str, schemas: list[dict], tokenizer: Any, args) -> list[dict]:
    """One record per schema."""
    if backend == "outlines-core":
        return run_baseline(schemas, tokenizer, args)
    from radixlm.constrained import GrammarCompiler

    native = "outlines" if backend == "outlines" else "llguidance"
    compiler = GrammarCompiler(
        tokenizer, backend=native, timeout_s=args.timeout, max_workers=1, cache_size=4
    )
    compiler.compile_json_schema({"type": "object"})  # start the worker, build the tables
    if backend in ("llguidance", "outlines"):

        def compile_fn(schema):
            return compiler.submit("json_schema", schema).result()
    elif backend == "llguidance-raw":
        compile_fn = _RawLLGuidance(compiler)
    elif backend == "xgrammar":
        compile_fn = _XGrammar(tokenizer, compiler, args.timeout)
    else:
        raise SystemExit(f"unknown backend {backend!r} (one of {BACKENDS})")
    try:
        return [
            _one_schema(compile_fn, item, tokenizer, compiler.info.vocab.eos_token_ids)
            for item in _progress(schemas, backend)
        ]
    finally:
        compiler.close()


def _progress(schemas: list[dict], label: str):
    for i, item in enumerate(schemas):
        if i % 50 == 0:
            print(f"[{label}] {i}/{len(schemas)}", file=sys.stderr, flush=True)
        yield item


def _one_schema(compile_fn, item: dict, tokenizer: Any, eos_ids) -> dict:
    record: dict[str, Any] = {"name": item["name"], "compiled": False}
    started = time.perf_counter()
    try:
        grammar = compile_fn(item["schema"])
    except Exception as exc:  # GrammarError, or whatever a baseline raises
        record.update(error=str(exc)[:300], feature=getattr(exc, "feature", None) or "error")
        return record
    record.update(
        compiled=True,
        compile_s=time.perf_counter() - started,
        compile_cpu_s=getattr(grammar, "compile_cpu_s", None),
        relaxed=list(grammar.relaxed),
    )
    record.update(check_instances(grammar, item, tokenizer, eos_ids))
    return record


def spell(instance: Any, schema: Any, grammar) -> str:
    """The instance as the grammar accepts it, or (none found) plain canonical JSON."""
    from radixlm.constrained import grammar_json

    hint = instance
    try:
        hint = json.loads(serialize(instance, schema))  # schema key order: a good first guess
    except ValueError:
        pass
    return grammar_json(hint, grammar) or serialize(instance, schema)


def check_instances(grammar, item: dict, tokenizer: Any, eos_ids) -> dict:
    """Feed every labelled instance token by token; count rejections and mask times."""
    import torch

    bitmask = torch.zeros((1, -(-grammar.vocab_size // 32)), dtype=torch.int32)
    eos = eos_ids[0]
    out = Counter()
    times: list[float] = []
    cpu: list[float] = []
    warm: list[float] = []
    for test in item["tests"]:
        text = spell(test["data"], item["schema"], grammar)
        ids = tokenizer.encode(text, add_special_tokens=False)
        accepted, mismatch = _feed(grammar.matcher(), ids + [eos], bitmask, times, cpu)
        # the same states again: what a grammar reused by many requests costs (outlines
        # caches each state's mask; llguidance computes every mask)
        _feed(grammar.matcher(), ids + [eos], bitmask, [], warm)
        key = "valid" if test["valid"] else "invalid"
        out[key] += 1
        out["mask_mismatch"] += mismatch
        if test["valid"] and not accepted:
            out["false_rejections"] += 1
        if not test["valid"] and accepted:
            out["accepted_invalid"] += 1
    return {
        **out,
        "mask_us": [round(t * 1e6, 1) for t in times],
        "mask_cpu_us": [round(t * 1e6, 1) for t in cpu],
        "mask_warm_cpu_us": [round(t * 1e6, 1) for t in warm],
    }


def _feed(
    matcher, ids: list[int], bitmask, times: list[float], cpu: list[float]
) -> tuple[bool, int]:
    """(all accepted, number of steps where the mask disagreed with accept_token)."""
    mismatch = 0
    for token in ids:
        started_cpu = time.thread_time()
        started = time.perf_counter()
        matcher.fill_bitmask(bitmask, 0)
        times.append(time.perf_counter() - started)
        cpu.append(time.thread_time() - started_cpu)
        allowed = bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1)
        ok = matcher.accept_token(token)
        mismatch += int(ok != allowed)
        if not ok:
            return False, mismatch
    return True, mismatch


class _RawLLGuidance:
    """llguidance alone: ``grammar_from_json_schema(schema)`` with llguidance's defaults."""

    def __init__(self, compiler):
        self.owner = compiler.llguidance()

    def __call__(self, schema: Any):
        from llguidance import LLMatcher

        from radixlm.constrained.llguidance_backend import LLGuidanceGrammar

        cpu = time.thread_time()
        text = LLMatcher.grammar_from_json_schema(schema)
        matcher = LLMatcher(self.owner.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error()[:300])
        grammar = LLGuidanceGrammar(self.owner, text, matcher)
        grammar.compile_cpu_s = time.thread_time() - cpu
        return grammar


class _XGrammar:
    """XGrammar alone (``compile_json_schema`` with its defaults), one compile thread."""

    def __init__(self, tokenizer: Any, compiler, timeout_s: float):
        import xgrammar

        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=compiler.vocab_size, stop_token_ids=sorted(compiler.info.eos_ids)
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.info = compiler.info
        self.timeout_s = timeout_s

    def __call__(self, schema: Any):
        import threading

        result: list = []

        def run() -> None:
            cpu = time.thread_time()
            try:
                result.append(self.compiler.compile_json_schema(json.dumps(schema)))
                cpu_s.append(time.thread_time() - cpu)
            except Exception as exc:  # noqa: BLE001 - reported as this schema's failure
                result.append(exc)

        cpu_s: list[float] = []

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if not result:
            raise TimeoutError(f"timed out after {self.timeout_s:g} s")
        if isinstance(result[0], Exception):
            raise result[0]
        grammar = _XGrammarGrammar(result[0], self.info)
        grammar.compile_cpu_s = cpu_s[0] if cpu_s else None
        return grammar


class _XGrammarGrammar:
    relaxed: tuple = ()
    compile_cpu_s: float | None = None

    def __init__(self, compiled, info):
        self.compiled = compiled
        self.info = info
        self.vocab_size = info.vocab_size

    def matcher(self):
        return _XGrammarMatcher(self)


class _XGrammarMatcher:
    """The radixlm matcher calls the bench makes, on an XGrammar matcher."""

    def __init__(self, grammar: _XGrammarGrammar):
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(grammar.compiled)
        self.retokenizer = grammar.info.retokenizer
        self.num_accepted = 0

    def fill_bitmask(self, bitmask, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        ok = self._matcher.accept_token(token_id)
        self.num_accepted += int(ok)
        return ok

    def accept_tokens(self, ids: list[int]) -> bool:
        for done, token in enumerate(ids):
            if not self.accept_token(token):
                self.rollback(done)
                return False
        return True

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._matcher.rollback(num_tokens)
            self.num_accepted -= num_tokens

    def is_complete(self) -> bool:
        return self._matcher.is_completed()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: list[dict], total: int) -> dict:
    """Pass rate, coverage, compile-time and mask-time figures, correctness counts."""
    compiled = [r for r in records if r["compiled"]]
    compile_s = [r["compile_s"] for r in compiled]
    compile_cpu = [r["compile_cpu_s"] for r in compiled if r.get("compile_cpu_s") is not None]
    masks = [t for r in compiled for t in r.get("mask_us", [])]
    cpu = [t for r in compiled for t in r.get("mask_cpu_us", [])]
    warm = [t for r in compiled for t in r.get("mask_warm_cpu_us", [])]
    failures = Counter(r.get("feature") or "error" for r in records if not r["compiled"])
    relaxed = Counter(x.split(" ")[0] for r in compiled for x in r.get("relaxed", []))
    passed = [
        r for r in compiled if not r.get("false_rejections") and not r.get("accepted_invalid")
    ]
    return {
        "passed": len(passed),
        "pass_rate": len(passed) / total if total else 0.0,
        "coverage": len(compiled) / total if total else 0.0,
        "compiled": len(compiled),
        "total": total,
        "compile_p50_s": _pct(compile_s, 0.5),
        "compile_p90_s": _pct(compile_s, 0.9),
        "compile_max_s": max(compile_s) if compile_s else None,
        "compile_cpu_p50_s": _pct(compile_cpu, 0.5),
        "compile_cpu_p90_s": _pct(compile_cpu, 0.9),
        "mask_avg_us": _mean(masks),
        "mask_p50_us": _pct(masks, 0.5),
        "mask_p99_us": _pct(masks, 0.99),
        "mask_cpu_avg_us": _mean(cpu),
        "mask_cpu_p99_us": _pct(cpu, 0.99),
        "mask_warm_cpu_avg_us": _mean(warm),
        "mask_warm_cpu_p99_us": _pct(warm, 0.99),
        "mask_samples": len(masks),
        "valid_checked": sum(r.get("valid", 0) for r in compiled),
        "false_rejections": sum(r.get("false_rejections", 0) for r in compiled),
        "false_rejection_schemas": sorted(r["name"] for r in compiled if r.get("false_rejections")),
        "invalid_checked": sum(r.get("invalid", 0) for r in compiled),
        "accepted_invalid": sum(r.get("accepted_invalid", 0) for r in compiled),
        "mask_mismatches": sum(r.get("mask_mismatch", 0) for r in compiled),
        "failures": dict(failures),
        "relaxed_keywords": dict(relaxed.most_common()),
    }


REUSE_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 32},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
REUSE_CASES = (
    (
        "json_schema",
        REUSE_SCHEMA,
        '{"name": "Ada Lovelace", "age": 36, "tags": ["math", "poet", "engine"]}',
    ),
    ("regex", "[0-9a-f]{128}", "0123456789abcdef" * 8),
)


def reuse_cost(tokenizer: Any, timeout_s: float, requests: int = 6) -> list[dict]:
    """Mask CPU time per token of the first request on a new grammar and of later ones.

    What a steady stream of requests on one constraint costs: outlines caches every state's
    mask, llguidance recomputes each (caching only its lexer states).
    """
    import statistics

    import torch

    from radixlm.constrained import GrammarCompiler

    rows = []
    for backend in ("llguidance", "outlines"):
        with GrammarCompiler(
            tokenizer, backend=backend, max_workers=1, timeout_s=max(timeout_s, 60)
        ) as compiler:
            for kind, spec, text in REUSE_CASES:
                started = time.perf_counter()
                grammar = compiler.submit(kind, spec).result()
                compile_s = time.perf_counter() - started
                ids = tokenizer.encode(text, add_special_tokens=False)
                bitmask = torch.zeros((1, compiler.words), dtype=torch.int32)
                per_request = []
                for _ in range(requests):
                    matcher, cpu = grammar.matcher(), []
                    for token in ids:
                        begin = time.thread_time()
                        matcher.fill_bitmask(bitmask, 0)
                        cpu.append(time.thread_time() - begin)
                        if not matcher.accept_token(token):
                            raise RuntimeError(f"{backend} rejected its own test text")
                    per_request.append(statistics.mean(cpu) * 1e6)
                row = {
                    "backend": backend,
                    "kind": kind,
                    "tokens": len(ids),
                    "compile_wall_ms": compile_s * 1e3,
                    "compile_cpu_ms": None
                    if grammar.compile_cpu_s is None
                    else grammar.compile_cpu_s * 1e3,
                    "first_us": per_request[0],
                    "reused_us": statistics.median(per_request[1:]),
                }
                rows.append(row)
                print(
                    f"| {kind} | {backend} | {row['compile_wall_ms']:.1f} ms wall"
                    f" ({_fmt(row['compile_cpu_ms'])} ms CPU) | {row['first_us']:.1f} | "
                    f"{row['reused_us']:.1f} |",
                    flush=True,
                )
    return rows


def batch_mask_cost(tokenizer: Any, schemas: list[dict], args) -> dict:
    """Per-request cost of filling one batch bitmask at several batch sizes, plus applying it."""
    import torch

    from radixlm.constrained import GrammarCompiler, apply_token_bitmask

    item = next((s for s in schemas if s["name"].startswith("Glaive")), schemas[0])
    valid = [t for t in item["tests"] if t["valid"]] or item["tests"]
    ids = tokenizer.encode(serialize(valid[0]["data"], item["schema"]), add_special_tokens=False)
    out: dict[str, Any] = {"schema": item["name"], "vocab": len(tokenizer), "rows": []}
    for backend in ("outlines", "llguidance"):
        with GrammarCompiler(tokenizer, backend=backend, timeout_s=60) as compiler:
            grammar = compiler.compile_json_schema(item["schema"])
            for batch in (int(b) for b in args.batch.split(",")):
                out["rows"].append(
                    {
                        "backend": backend,
                        "batch": batch,
                        **_time_batch(grammar, ids, batch, compiler.words),
                    }
                )
    for batch in (int(b) for b in args.batch.split(",")):
        logits = torch.randn(batch, len(tokenizer))
        mask = torch.randint(
            -(2**31), 2**31 - 1, (batch, -(-len(tokenizer) // 32)), dtype=torch.int32
        )
        apply_token_bitmask(logits, mask)
        started = time.perf_counter()
        for _ in range(5):
            apply_token_bitmask(logits, mask)
        out.setdefault("apply_torch_cpu_ms", {})[batch] = (time.perf_counter() - started) / 5 * 1e3
    return out


def _time_batch(grammar, ids: list[int], batch: int, words: int) -> dict:
    import torch

    matchers = []
    for i in range(batch):
        matcher = grammar.matcher()
        for token in ids[: i % max(len(ids) - 1, 1)]:
            matcher.accept_token(token)
        matchers.append(matcher)
    bitmask = torch.zeros((batch, words), dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        matcher.fill_bitmask(bitmask, row)
    reps = max(3, 2000 // batch)
    started = time.perf_counter()
    for _ in range(reps):
        for row, matcher in enumerate(matchers):
            matcher.fill_bitmask(bitmask, row)
    per_step = (time.perf_counter() - started) / reps
    return {"step_us": per_step * 1e6, "per_request_us": per_step / batch * 1e6}


# ---- outlines-core baseline (its own schema-to-regex and Index), in a killable child ----


def run_baseline(schemas: list[dict], tokenizer: Any, args) -> list[dict]:
    """outlines-core's ``build_regex_from_schema`` + ``Index`` on every schema."""
    child = _BaselineChild(args.tokenizer)
    eos = tokenizer.eos_token_id
    records = []
    try:
        for item in _progress(schemas, "outlines-core"):
            tests = [
                (
                    t["valid"],
                    tokenizer.encode(
                        serialize(t["data"], item["schema"]), add_special_tokens=False
                    ),
                )
                for t in item["tests"]
            ]
            records.append(child.evaluate(item, tests, eos, args.timeout))
    finally:
        child.close()
    return records


class _BaselineChild:
    """``python -m radixlm.bench.grammar --baseline-child``: killed and restarted on timeout."""

    def __init__(self, tokenizer_dir: str):
        self.tokenizer_dir = tokenizer_dir
        self.process = None

    def _start(self) -> None:
        import subprocess

        from radixlm.constrained.worker import _child_env

        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "radixlm.bench.grammar",
                "--baseline-child",
                "--tokenizer",
                self.tokenizer_dir,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=_child_env(),
        )
        if self._receive(300) != "ready":
            raise RuntimeError("baseline child failed to start")

    def _receive(self, timeout_s: float) -> Any:
        import pickle

        from radixlm.constrained.worker import _HEADER, _read_exact

        deadline = time.monotonic() + timeout_s
        (length,) = _HEADER.unpack(_read_exact(self.process.stdout, _HEADER.size, deadline))
        return pickle.loads(_read_exact(self.process.stdout, length, deadline))

    def evaluate(self, item: dict, tests: list, eos: int, timeout_s: float) -> dict:
        from radixlm.constrained.worker import _send

        record: dict[str, Any] = {"name": item["name"], "compiled": False}
        if self.process is None or self.process.poll() is not None:
            self._start()
        try:
            _send(self.process.stdin, (item["schema"], tests, eos))
            status, value = self._receive(timeout_s)
            if status != "compiled":
                record.update(error=str(value)[:300], feature="error")
                return record
            record.update(compiled=True, compile_s=value)
            status, value = self._receive(600)
            record.update(value)
        except TimeoutError:
            record.update(
                error=f"timed out after {timeout_s:g} s", feature="timeout", compiled=False
            )
            self.close()
        except (EOFError, OSError):
            record.update(error="crashed", feature="crash", compiled=False)
            self.close()
        return record

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def baseline_child_main(tokenizer_dir: str) -> int:
    """Child loop: compile with outlines-core, then check the instances."""
    from outlines_core import Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from transformers import AutoTokenizer

    from radixlm.constrained.vocab import build_token_vocab
    from radixlm.constrained.worker import _read_blocking, _send

    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    vocab = build_token_vocab(AutoTokenizer.from_pretrained(tokenizer_dir))
    table: dict[bytes, list[int]] = {}
    for tid, data in enumerate(vocab.token_bytes):
        if data:
            table.setdefault(data, []).append(tid)
    vocabulary = Vocabulary(vocab.eos_token_ids[0], table)
    _send(protocol, "ready")
    while True:
        try:
            schema, tests, eos = _read_blocking(sys.stdin.buffer)
        except EOFError:
            return 0
        started = time.perf_counter()
        try:
            index = Index(build_regex_from_schema(json.dumps(schema)), vocabulary)
        except BaseException as exc:  # outlines raises ValueError and pyo3 panics
            _send(protocol, ("error", repr(exc)[:300]))
            continue
        _send(protocol, ("compiled", time.perf_counter() - started))
        _send(protocol, ("done", _baseline_instances(index, tests, vocab.size)))


def _baseline_instances(index, tests: list, vocab_size: int) -> dict:
    import torch
    from outlines_core import Guide

    out = Counter()
    times: list[float] = []
    mask = torch.zeros(-(-vocab_size // 32) + 1, dtype=torch.int32)
    for valid, ids in tests:
        guide = Guide(index)
        state = index.get_initial_state()
        accepted = True
        for token in ids:
            started = time.perf_counter()
            guide.write_mask_into(mask.data_ptr(), mask.numel(), 4)
            times.append(time.perf_counter() - started)
            state = index.get_next_state(state, token)
            if state is None:
                accepted = False
                break
            guide.advance(token, return_tokens=False)
        accepted = accepted and index.is_final_state(state)
        out["valid" if valid else "invalid"] += 1
        out["false_rejections"] += int(valid and not accepted)
        out["accepted_invalid"] += int(not valid and accepted)
    return {**out, "mask_us": [round(t * 1e6, 1) for t in times]}


def kernel_timing(vocab: int = 128256, batches=(1, 32, 256), reps: int = 200) -> dict:
    """CUDA-event timings (median of ``reps`` after warm-up) of applying a bitmask to logits.

    Bytes moved per call: logits read and written where masked (bf16: 2 B each) plus the mask
    (V / 8 B per row); the table reports the achieved GB/s on the logits+mask bytes read.
    """
    import torch

    from radixlm.bench.common import time_median
    from radixlm.constrained.bitmask import apply_token_bitmask

    device = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(device), "vocab": vocab, "rows": []}
    for dtype in (torch.bfloat16, torch.float32):
        for batch in batches:
            logits = torch.randn(batch, vocab, device=device).to(dtype)
            mask = torch.randint(
                -(2**31), 2**31 - 1, (batch, -(-vocab // 32)), device=device, dtype=torch.int32
            )
            for backend in ("triton", "torch"):
                ms = 1e3 * time_median(
                    lambda b=backend, x=logits, m=mask: apply_token_bitmask(x, m, backend=b),
                    device,
                    reps,
                    warmup=10,
                )
                read = batch * vocab * logits.element_size() + mask.numel() * 4
                out["rows"].append(
                    {
                        "dtype": str(dtype).split(".")[-1],
                        "batch": batch,
                        "backend": backend,
                        "us": ms * 1e3,
                        "GBps_read": read / (ms * 1e-3) / 1e9,
                    }
                )
    return out


def _print_summary(backend: str, s: dict) -> None:
    print(
        f"{backend}: pass {s['passed']}/{s['total']} ({s['pass_rate']:.1%}), "
        f"compiled {s['compiled']}, false rejections {s['false_rejections']}/"
        f"{s['valid_checked']} {s['false_rejection_schemas'][:5]}, accepted invalid "
        f"{s['accepted_invalid']}/{s['invalid_checked']}, failures {s['failures']}",
        flush=True,
    )


def _print_batch(batch: dict) -> None:
    for row in batch["rows"]:
        print(
            f"mask fill {row['backend']:>10} batch {row['batch']:>4}: "
            f"{row['per_request_us']:.2f} us/request ({row['step_us'] / 1e3:.3f} ms/step)"
        )
    for size, ms in batch.get("apply_torch_cpu_ms", {}).items():
        print(f"apply_token_bitmask torch CPU batch {size}: {ms:.2f} ms")


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def print_table(report: dict) -> None:
    """The markdown table recorded in docs/benchmarks.md and docs/constrained.md."""
    print(
        "\n| backend | schemas | pass | false rejections | accepted invalid | compile p50 / p90 "
        "(ms), wall | compile p50 / p90 (ms), CPU | mask avg / p99 (us), wall | "
        "mask avg / p99 (us), CPU | same, grammar reused |"
    )
    print("|---|---:|---:|---:|---:|---|---|---|---|---|")
    for name, data in report["backends"].items():
        s = data["summary"]
        print(
            f"| {name} | {s['total']} | {s['passed']} ({s['pass_rate']:.1%}) | "
            f"{s['false_rejections']}/{s['valid_checked']} | "
            f"{s['accepted_invalid']}/{s['invalid_checked']} | "
            f"{_fmt(s['compile_p50_s'], 1e3)} / {_fmt(s['compile_p90_s'], 1e3)} | "
            f"{_fmt(s.get('compile_cpu_p50_s'), 1e3)} / "
            f"{_fmt(s.get('compile_cpu_p90_s'), 1e3)} | "
            f"{_fmt(s['mask_avg_us'])} / {_fmt(s['mask_p99_us'])} | "
            f"{_fmt(s['mask_cpu_avg_us'])} / {_fmt(s['mask_cpu_p99_us'])} | "
            f"{_fmt(s.get('mask_warm_cpu_avg_us'))} / {_fmt(s.get('mask_warm_cpu_p99_us'))} |"
        )


def _write(path: str, report: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(report, handle)
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
