"""An evaluation (one case, or a cohort) as a terminal table, CSV, or one self-contained HTML page.

The page has no external reference (no script, font or image fetched): the plots are SVG drawn by
matplotlib (in memory, text as paths) and written into the page, so a radiologist can open it offline.
"""

from __future__ import annotations

import csv
import html
import io
from typing import Any

COLUMNS = ("dice", "iou", "hd95_mm", "hausdorff_mm", "assd_mm", "volume_pred_ml", "volume_ref_ml",
           "volume_diff_ml")
HEADINGS = {"dice": "Dice", "iou": "IoU", "hd95_mm": "HD95 mm", "hausdorff_mm": "Hausdorff mm",
            "assd_mm": "ASSD mm", "volume_pred_ml": "pred mL", "volume_ref_ml": "ref mL",
            "volume_diff_ml": "diff mL", "sensitivity": "sensitivity", "precision": "precision"}


def case_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (case, structure) row: one case's structures, or each case's of a cohort."""
    if "cases" not in result:
        return [{"case": "", **row} for row in result["structures"]]
    return [{"case": case["case"], **row} for case in result["cases"] for row in case.get("structures", ())]


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _summary_cell(item: Any) -> str:
    if item is None:
        return "-"
    return f"{item['mean']:.3f} / {item['median']:.3f} [{item['q1']:.3f}-{item['q3']:.3f}]"


def table(result: dict[str, Any]) -> str:
    """The terminal output: a fixed-width table per case (and, for a cohort, the summary),
    then the flags, unmatched structures and notes."""
    lines = []
    if "cases" in result:
        lines.append(f"cohort: {len(result['cases'])} case(s)  (each figure: mean / median [q1-q3])")
        width = max([9, *(len(s["name"]) for s in result["structures"])])
        lines.append(f"{'structure':{width}}  {'cases':>5}  " + "  ".join(
            f"{HEADINGS[c]:>29}" for c in ("dice", "hd95_mm", "assd_mm", "volume_diff_ml")))
        for item in result["structures"]:
            lines.append(f"{item['name']:{width}}  {item['cases']:>5}  " + "  ".join(
                f"{_summary_cell(item[c]):>29}" for c in ("dice", "hd95_mm", "assd_mm", "volume_diff_ml")))
        for case in result["cases"]:
            lines.append("")
            lines.append(f"case {case['case']}: " + (f"NOT COMPARED: {case['error']}" if "error" in case
                                                      else f"{case['pred']} vs {case['ref']}"))
            if "error" not in case:
                lines.extend(_case_lines(case))
        for side in ("pred", "ref"):
            if result[f"unpaired_{side}"]:
                lines.append(f"unpaired {side} cases: {', '.join(result[f'unpaired_{side}'])}")
    else:
        lines.append(f"{result['pred']} vs {result['ref']}")
        lines.extend(_case_lines(result))
    return "\n".join(lines)


def _case_lines(result: dict[str, Any]) -> list[str]:
    rows = result["structures"]
    width = max([9, *(len(r["name"]) for r in rows)])
    lines = [f"  {'structure':{width}}  " + "  ".join(f"{HEADINGS[c]:>12}" for c in COLUMNS)]
    for row in rows:
        lines.append(f"  {row['name']:{width}}  " + "  ".join(f"{_number(row[c]):>12}" for c in COLUMNS))
    lines.extend(f"  {row['name']}: {row['flag']}" for row in rows if row["flag"])
    if result["resampled"]:
        lines.append("  the reference was resampled onto the prediction's grid (nearest neighbour)")
    for side, what in (("pred", "prediction"), ("ref", "reference")):
        if result[f"unmatched_{side}"]:
            lines.append(f"  unmatched in the {what}: {', '.join(result[f'unmatched_{side}'])}")
    lines.extend(f"  note: {note}" for note in result["notes"])
    return lines


def to_csv(result: dict[str, Any]) -> str:
    """One line per (case, structure) with every figure."""
    fields = ["case", "name", "reference_name", "matched_by", *HEADINGS, "flag"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in case_rows(result):
        writer.writerow(row)
    return out.getvalue()


def _svg(figure: Any) -> str:
    out = io.StringIO()
    figure.savefig(out, format="svg", bbox_inches="tight")
    text = out.getvalue()
    return text[text.index("<svg"):]  # without the XML prolog and DOCTYPE: inline in the page


def _plots(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot, no GUI backend, no global state

    plots = []
    names = list(dict.fromkeys(r["name"] for r in rows))
    dice = [[r["dice"] for r in rows if r["name"] == n and r["dice"] is not None] for n in names]
    if any(dice):
        figure = Figure(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.6))
        axes = figure.subplots()
        shown = [(n, d) for n, d in zip(names, dice, strict=True) if d]
        axes.boxplot([d for _, d in shown], tick_labels=[n for n, _ in shown])
        for i, (_, values) in enumerate(shown, start=1):  # every case as a point over its box
            axes.plot([i] * len(values), values, "o", color="#1f77b4", alpha=0.6, markersize=4)
        axes.set_ylabel("Dice")
        axes.set_ylim(min(0.0, *(min(d) for _, d in shown)) - 0.02, 1.02)
        axes.tick_params(axis="x", labelrotation=30)
        axes.set_title("Dice per structure")
        plots.append(("Dice per structure (box: quartiles of the cases; points: each case)", _svg(figure)))
    volumes = [(r["volume_pred_ml"], r["volume_ref_ml"]) for r in rows
               if r["volume_ref_ml"] or r["volume_pred_ml"]]
    if volumes:
        import numpy as np

        pred, ref = np.array(volumes, float).T
        mean, diff = (pred + ref) / 2, pred - ref
        bias, spread = float(diff.mean()), float(diff.std(ddof=1)) if diff.size > 1 else 0.0
        figure = Figure(figsize=(5.5, 3.8))
        axes = figure.subplots()
        axes.scatter(mean, diff, s=18)
        axes.axhline(bias, color="k", label=f"bias {bias:.1f} mL")
        for limit in (bias - 1.96 * spread, bias + 1.96 * spread):
            axes.axhline(limit, color="k", linestyle="--")
        axes.set_xscale("log")
        axes.set_xlabel("mean of prediction and reference volume (mL)")
        axes.set_ylabel("prediction - reference (mL)")
        axes.set_title("Bland-Altman: structure volumes")
        axes.legend(loc="best", fontsize="small")
        plots.append((f"Bland-Altman plot of volumes: bias {bias:.2f} mL, limits of agreement "
                      f"{bias - 1.96 * spread:.2f} to {bias + 1.96 * spread:.2f} mL (bias ± 1.96 SD)",
                      _svg(figure)))
    return plots


def to_html(result: dict[str, Any], title: str = "Vesalius evaluation") -> str:
    """One self-contained page: the plots, the summary (cohort), every case's table and flags."""
    esc = html.escape
    rows = case_rows(result)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #bbb;padding:.25em .6em;text-align:right}"
             "td:first-child,th:first-child{text-align:left}.flag{color:#a40}figure{margin:1em 0}</style>",
             f"</head><body><h1>{esc(title)}</h1>"]
    for caption, svg in _plots(rows):
        parts.append(f"<figure>{svg}<figcaption>{esc(caption)}</figcaption></figure>")
    if "cases" in result:
        parts.append(f"<h2>Cohort: {len(result['cases'])} case(s)</h2><p>Each figure: mean / median "
                     "[first quartile - third quartile] over the cases where it is defined.</p><table><tr>"
                     "<th>structure</th><th>cases</th><th>flagged</th>"
                     + "".join(f"<th>{esc(HEADINGS[c])}</th>" for c in COLUMNS) + "</tr>")
        for item in result["structures"]:
            parts.append(f"<tr><td>{esc(item['name'])}</td><td>{item['cases']}</td><td>{item['flagged']}</td>"
                         + "".join(f"<td>{esc(_summary_cell(item[c]))}</td>" for c in COLUMNS) + "</tr>")
        parts.append("</table>")
        for side in ("pred", "ref"):
            if result[f"unpaired_{side}"]:
                parts.append(f"<p class=\"flag\">Unpaired {side} cases: "
                             f"{esc(', '.join(result[f'unpaired_{side}']))}</p>")
        cases = result["cases"]
    else:
        cases = [{"case": "", **result}]
    for case in cases:
        heading = f"Case {case['case']}: " if case["case"] else ""
        if "error" in case:
            parts.append(f"<h2>{esc(heading)}not compared</h2><p class=\"flag\">{esc(case['error'])}</p>")
            continue
        parts.append(f"<h2>{esc(heading + case['pred'] + ' vs ' + case['ref'])}</h2><table><tr>"
                     "<th>structure</th><th>reference</th>"
                     + "".join(f"<th>{esc(HEADINGS[c])}</th>" for c in COLUMNS)
                     + "<th>flag</th></tr>")
        for row in case["structures"]:
            parts.append(f"<tr><td>{esc(row['name'])}</td><td>{esc(row['reference_name'])}</td>"
                         + "".join(f"<td>{esc(_number(row[c]))}</td>" for c in COLUMNS)
                         + f"<td class=\"flag\">{esc(row['flag'] or '')}</td></tr>")
        parts.append("</table>")
        if case["resampled"]:
            parts.append("<p>The reference was resampled onto the prediction's grid (nearest neighbour).</p>")
        for side, what in (("pred", "prediction"), ("ref", "reference")):
            if case[f"unmatched_{side}"]:
                parts.append(f"<p class=\"flag\">Unmatched in the {what}: "
                             f"{esc(', '.join(case[f'unmatched_{side}']))}</p>")
        parts.extend(f"<p>Note: {esc(note)}</p>" for note in case["notes"])
    parts.append("</body></html>")
    return "\n".join(parts)
