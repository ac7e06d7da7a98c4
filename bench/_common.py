"""Shared benchmark plumbing: a table on stdout and a JSON file under bench/results/."""
from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def model_parser(doc: str, config: str = "DiT-S/2", image_size: int = 256, threads: int = 2):
    """The options every model benchmark takes: the named config, image size, threads, seed."""
    import argparse
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=config, help="named config, random init")
    parser.add_argument("--image-size", type=int, default=image_size)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}


def report(name: str, rows: list[dict], columns: list[str], extra: dict | None = None, out: Path | None = None) -> Path:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))
    out = out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": name, "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "machine": machine(), **(extra or {}), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
