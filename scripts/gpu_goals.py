"""The tables at the end of scripts/gpu_check.sh, from what its steps left in OUT: each step's status and
time, the benchmark rows (benchmark.py --merge), the zoo's speed rows, the CUDA tests' results (the JUnit
XML) and the goals checked against them.

    python scripts/gpu_goals.py OUT                # the tables
    python scripts/gpu_goals.py --step-rate OUT    # the synthetic training step's img/s (3000 without it)
"""

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report import markdown_table, merge_benchmarks  # noqa: E402 (the repo's modules, from scripts/)

BENCHMARKS = (
    "model_bf16 model_fp32 forward_compiled from_jpeg gpu_decode train_176 train_176_gpu threads_4 memory "
    "loaders augment"
).split()
CUT = {"124", "137"}  # timeout's status for a step cut at its limit (137: killed after the grace period)
GOALS = {  # name -> (what is checked, the threshold)
    "from_jpeg_train": ("training from JPEG, CPU decoding / synthetic step (resnet50, 224 px)", 0.9),
    "gpu_decode_train": ("training from JPEG, --decode gpu / synthetic step (resnet50, 224 px)", 0.9),
    "gpu_decode_eval": ("evaluation with --decode gpu, img/s", 5000),
    "amp_speedup": ("training step bf16 + channels_last / fp32 NCHW", 2.0),
    "tests": ("python -m pytest -m gpu: tests failed or errored", 0),
}


def rows_of(out: Path, name: str) -> list[dict]:
    path = out / f"{name}.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def rate(out: Path, name: str, part: str) -> float | None:
    """img/s of our row of `part` in OUT/name.json (the first one), None where it is missing."""
    rows = [r for r in rows_of(out, name) if r["part"] == part and not r["variant"].startswith("plain")]
    return rows[0]["img_per_s"] if rows else None


def step_rate(out: Path) -> int:
    return round(rate(out, "model_bf16", "step") or 3000)


def steps_table(out: Path) -> str:
    rows = []
    for line in (out / "steps.tsv").read_text().splitlines() if (out / "steps.tsv").exists() else []:
        name, status, seconds = line.split("\t")
        if status == "0":
            status = "ok"
        elif status in CUT:
            status = "cut at its limit"
        elif status != "not run":
            status = f"failed (exit {status}): see {name}.log"
        rows.append({"step": name, "status": status, "seconds": int(seconds)})
    return markdown_table(rows, ["step", "status", "seconds"])


def test_results(out: Path) -> dict | None:
    """{'tests', 'failed': [names], 'skipped'} from the JUnit XML; None where pytest wrote none."""
    path = out / "gpu_tests.xml"
    if not path.exists():
        return None
    cases = ET.parse(path).getroot().iter("testcase")
    result = {"tests": 0, "failed": [], "skipped": 0}
    for case in cases:
        result["tests"] += 1
        if case.find("failure") is not None or case.find("error") is not None:
            result["failed"].append(case.get("name"))
        elif case.find("skipped") is not None:
            result["skipped"] += 1
    return result


def goal_values(out: Path) -> dict:
    """name -> the measured value of each goal (None: not measured)."""
    step, fp32 = rate(out, "model_bf16", "step"), rate(out, "model_fp32", "step")
    tests = test_results(out)

    def share(name):
        value = rate(out, name, "train")
        return None if value is None or not step else value / step

    return {
        "from_jpeg_train": share("from_jpeg"),
        "gpu_decode_train": share("gpu_decode"),
        "gpu_decode_eval": rate(out, "gpu_decode", "eval"),
        "amp_speedup": step / fp32 if step and fp32 else None,
        "tests": None if tests is None or tests["tests"] == tests["skipped"] else len(tests["failed"]),
    }


def goals_table(out: Path) -> str:
    rows = []
    for name, value in goal_values(out).items():
        what, threshold = GOALS[name]
        met = "not measured"
        if value is not None:
            met = "met" if (value <= threshold if name == "tests" else value >= threshold) else "NOT met"
        shown = None if value is None else round(value, 3)
        rows.append({"goal": what, "measured": shown, "threshold": threshold, "": met})
    return markdown_table(rows, ["goal", "measured", "threshold", ""])


def speed_summary(out: Path) -> str:
    path = out / "speed.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    if not rows:
        return "zoo speed: no rows"
    fastest = max(rows, key=lambda r: r["img_per_s"])
    slowest = min(rows, key=lambda r: r["img_per_s"])
    return (
        f"zoo speed: {len(rows)} weights measured (speed.md): fastest {fastest['weights']} "
        f"{fastest['img_per_s']:,.0f} img/s, slowest {slowest['weights']} {slowest['img_per_s']:,.0f} img/s"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the folder gpu_check.sh wrote")
    p.add_argument("--step-rate", action="store_true", help="print the synthetic training step's img/s")
    args = p.parse_args(argv)
    if args.step_rate:
        print(step_rate(args.out))
        return
    print(steps_table(args.out))
    present = [str(args.out / f"{name}.json") for name in BENCHMARKS if (args.out / f"{name}.json").exists()]
    if present:
        print(merge_benchmarks(present))
    print(speed_summary(args.out))
    tests = test_results(args.out)
    if tests is not None:
        failed = ", ".join(tests["failed"]) or "none"
        print(f"CUDA tests: {tests['tests']} run, {tests['skipped']} skipped, failed: {failed}")
    print()
    print(goals_table(args.out))


if __name__ == "__main__":
    main()
