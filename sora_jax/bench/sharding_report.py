"""Rows of the sharding-layout benchmark as a markdown table, CSV, JSON and a plot."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from sora_jax.bench.hlo_stats import COLLECTIVES
from sora_jax.bench.sharding import Layout, row_roofline
from sora_jax.parallel.topology import Chip

_SHORT = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
          "collective-permute": "CP"}


def _gib(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x / 2**30:.2f}"


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """One row as flat scalar columns (CSV, and the markdown table's source)."""
    out = {k: row.get(k) for k in ("target", "layout", "step", "status", "devices", "global_batch", "tokens",
                                    "compile_s", "param_bytes", "opt_bytes", "argument_bytes", "temp_bytes",
                                    "peak_bytes", "hbm_bytes", "required_bytes", "available_bytes", "flops",
                                    "model_flops", "bytes_accessed", "message")}
    coll = row.get("collectives") or {}
    for op in COLLECTIVES:
        out[f"{op}_count"] = (coll.get("count") or {}).get(op)
        out[f"{op}_bytes"] = (coll.get("bytes") or {}).get(op)
        out[f"{op}_wire_bytes"] = (coll.get("wire_bytes") or {}).get(op)
    out["ici_wire_bytes"] = coll.get("ici_wire_bytes")
    out["dcn_wire_bytes"] = coll.get("dcn_wire_bytes")
    for k, v in (row.get("roofline") or {}).items():
        out[f"roofline_{k}"] = v
    for k in ("step_s", "mfu"):
        out[f"measured_{k}"] = (row.get("measured") or {}).get(k)
    return out


def to_csv(rows: list[dict[str, Any]]) -> str:
    """CSV with one line per layout (union of the flat columns)."""
    flat = [flat_row(r) for r in rows]
    cols = list(dict.fromkeys(k for f in flat for k in f))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


def _collectives_cell(row: dict[str, Any]) -> str:
    coll = row.get("collectives") or {}
    parts = [f"{_SHORT[op]} {coll['count'][op]}x {coll['wire_bytes'][op] / 2**30:.2f}"
             for op in COLLECTIVES if coll.get("count", {}).get(op)]
    return ", ".join(parts) or "none"


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table: fit, memory per device (GiB), TFLOPs, collectives, roofline step time and MFU."""
    head = ("| target | layout | fits | params+opt GiB | args GiB | temp GiB | peak GiB / HBM | model TFLOP/dev "
            "| collectives: count x wire GiB/dev | ICI GiB | step s (bound) | pred. MFU | compile s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        status = r.get("status")
        if status != "ok":
            detail = (f"OOM: needs {_gib(r.get('required_bytes'))} of {_gib(r.get('available_bytes'))} GiB"
                      if status == "oom" else f"{status}: {r.get('message', '')[:90]}")
            state = (_gib(r["param_bytes"] + r["opt_bytes"] + r["ema_bytes"]) if "param_bytes" in r else "")
            lines.append(f"| {r['target']} | {r['layout']} | **{detail}** | {state} |" + " |" * 9)
            continue
        roof = r.get("roofline") or {}
        step = f"{roof['step_s']:.3g} ({roof['bound']})" if roof else ""
        mfu = f"{100 * roof['mfu']:.0f}%" if roof else ""
        measured = r.get("measured")
        if measured:
            step += f"; ran {measured['step_s']:.3g}"
            mfu += f"; ran {100 * measured['mfu']:.1f}%" if measured.get("mfu") else ""
        hbm = f" / {_gib(r['hbm_bytes'])}" if r.get("hbm_bytes") else ""
        lines.append(
            f"| {r['target']} | {r['layout']} | {'yes' if r.get('fits') else '**no**'} "
            f"| {_gib(r['param_bytes'] + r['opt_bytes'] + r['ema_bytes'])} | {_gib(r['argument_bytes'])} "
            f"| {_gib(r['temp_bytes'])} | {_gib(r['peak_bytes'])}{hbm} "
            f"| {r['model_flops'] / 1e12:.3g} | {_collectives_cell(r)} "
            f"| {_gib(r['collectives']['ici_wire_bytes'])} | {step} | {mfu} | {r.get('compile_s', 0):.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Bar chart: peak memory per device (with the HBM line) and predicted step time per layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") in ("ok", "oom")]
    labels = [f"{r['target']}\n{r['layout']}" for r in ok]
    mem = [(r.get("peak_bytes") or r.get("required_bytes") or 0) / 2**30 for r in ok]
    step = [(r.get("roofline") or {}).get("step_s", 0.0) for r in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(ok) + 4), 5))
    colors = ["tab:red" if r["status"] == "oom" or not r.get("fits", True) else "tab:blue" for r in ok]
    ax1.bar(range(len(ok)), mem, color=colors)
    hbm = {r.get("hbm_bytes") or r.get("available_bytes") for r in ok} - {None, 0.0}
    for h in hbm:
        ax1.axhline(h / 2**30, color="k", ls="--", lw=1)
    ax1.set_ylabel("peak memory per device (GiB); red = does not fit")
    ax2.bar(range(len(ok)), step, color="tab:green")
    ax2.set_ylabel("predicted step time (s, roofline)")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(ok)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(rows: list[dict[str, Any]], meta: dict[str, Any], out_json: str | None, out_csv: str | None,
                  out_plot: str | None) -> list[Path]:
    """Write whichever of JSON ({meta, rows}), CSV and PNG were asked for; return their paths."""
    written = []
    if out_json:
        Path(out_json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
        written.append(Path(out_json))
    if out_csv:
        Path(out_csv).write_text(to_csv(rows))
        written.append(Path(out_csv))
    if out_plot:
        written.append(plot(rows, out_plot))
    return written


def results_markdown(paths: list[str | Path]) -> str:
    """One titled table per results JSON (as written by --json), for docs/sharding.md."""
    parts = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        m = data["meta"]
        chip = Chip(**m["chip"])
        for row in data["rows"]:
            if "mesh" in row:  # label by the resolved mesh (files written before rows carried it)
                spec = {**row["layout_spec"], "mesh": tuple(row["mesh"].items())}
                row["layout"] = Layout(**spec).name
            if row.get("status") == "ok" and chip.peak_flops:
                row["roofline"] = row_roofline(row, chip)  # files written before a roofline change read alike
        frames, height, width = m["video"]
        parts.append(f"#### {m['variant']}, {height}x{width}x{frames}, {m['target']} ({m['num_devices']} devices), "
                     f"{m['step']} step, {m['dtype']}\n\n{to_markdown(data['rows'])}\n")
    return "\n".join(parts)
