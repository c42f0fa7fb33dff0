"""The SmolLM2-135M benchmark's methods, labels and report (:mod:`smollm2` runs them): the table
of perplexities per method and goal, the calibration cost, issue 22's targets, the measured
choice's candidates and the greedy continuations, as markdown."""

import json

FRACTIONS = (0.2, 0.4, 0.6)
"""Fractions of the decoder layers' Linear learnables to remove (``--fractions`` runs a subset)."""
PROMPT = "The Python standard library"
NEW_TOKENS = 30
METHODS = ("original", "rw-defaults", "rw-variance-global", "rw-variance-uniform", "rw-loss-global",
           "svd", "asvd", "svd-llm", "svd-llm-v2", "kfac")
LABELS = {"original": "original", "rw-defaults": "rankwise defaults (measured choice)",
          "rw-variance-global": "old defaults (`criterion=\"variance\", allocation=\"global\"`)",
          "rw-variance-uniform": "`criterion=\"variance\", allocation=\"uniform\"`",
          "rw-loss-global": "`criterion=\"loss\"`, `loss_fn=\"kl\"`, global",
          "svd": "plain SVD, uniform ratio", "asvd": "ASVD (activation-scaled, alpha 0.5), uniform ratio",
          "svd-llm": "SVD-LLM whitened SVD, uniform ratio",
          "svd-llm-v2": "SVD-LLM V2-style heterogeneous ratios (whitened SVD)",
          "kfac": "KFAC-style both sides (G^1/2 W C^1/2), uniform ratio"}
BASELINES = ("svd", "asvd", "svd-llm", "svd-llm-v2", "kfac")


def save_rows(path, rows, new_rows):
    keys = {(r["method"], r["fraction"]) for r in new_rows}
    merged = [r for r in rows if (r["method"], r["fraction"]) not in keys] + new_rows
    with open(path, "w") as stream:
        json.dump(merged, stream, indent=1)
    return merged


def find(rows, method, fraction):
    return next((r for r in rows if r["method"] == method and r["fraction"] == fraction), None)


def targets(rows, split):
    """Issue 22's targets: defaults at most 0.5x SVD-LLM at 20% and 40%, below every baseline at 60%."""
    lines = ["", "Targets (issue 22): rankwise defaults at most 0.5x the SVD-LLM whitened SVD's perplexity at "
             "20% and 40%; below every baseline at 60%:", ""]
    for fraction in (0.2, 0.4):
        ours, theirs = find(rows, "rw-defaults", fraction), find(rows, "svd-llm", fraction)
        if ours and theirs:
            ratio = ours[split] / theirs[split]
            lines.append(f"- {100 * fraction:.0f}%: {ours[split]:.2f} / {theirs[split]:.2f} = {ratio:.2f}x: "
                         + ("**reached**" if ratio <= 0.5 else "**NOT reached**"))
    ours = find(rows, "rw-defaults", 0.6)
    baselines = [r for r in (find(rows, m, 0.6) for m in BASELINES) if r is not None]
    if ours and baselines:
        best = min(baselines, key=lambda r: r[split])
        lines.append(f"- 60%: {ours[split]:.2f} against the best baseline {best['method']} {best[split]:.2f} "
                     f"({len(baselines)} of {len(BASELINES)} baselines run): "
                     + ("**reached**" if ours[split] < best[split] else "**NOT reached**"))
    return lines


def markdown(rows, split, header):
    original = find(rows, "original", 0.0)
    lines = [header, "", f"Original: {split} perplexity **{original[split]:.2f}**." if original else "", ""]
    lines += ["Cells: " + split + " perplexity (fraction of the compressed Linears' learnables actually "
              "removed; seconds of calibration + decision and build).", "",
              "| method | " + " | ".join(f"{100 * f:.0f}%" for f in FRACTIONS) + " |",
              "|---|" + "---:|" * len(FRACTIONS)]
    for method in METHODS[1:]:
        cells = []
        for fraction in FRACTIONS:
            row = find(rows, method, fraction)
            cells.append("" if row is None else
                         f"{row[split]:.2f} ({100 * row['removed_compressed_linear']:.1f}%, "
                         f"{row['calibration_seconds']:.0f} + {row['decision_seconds']:.0f} s)")
        lean = any(r.get("lean_candidates") for r in rows if r["method"] == method)
        lines.append(f"| {LABELS[method]}{' (*)' if lean else ''} | " + " | ".join(cells) + " |")
    if any(r.get("lean_candidates") for r in rows):
        lines += ["", "(*) run with `--lean-candidates`: each (criterion, shrinkage) pair's options freed once "
                  "the candidates move on (a bench-side memory workaround; same computations and scores)."]
    lines += targets(rows, split)
    lines += ["", "Calibration cost: wall seconds of the statistics (shared by every goal of a method) and "
              "the largest decision-and-build seconds of one goal; peak resident memory (VmHWM) of the "
              "process when the method's last row was written (one process per method unless several "
              "methods ran in one invocation: then the peak so far).", "",
              "| method | calibration s | decision and build s (max over goals) | peak RSS GiB |", "|---|---:|---:|---:|"]
    for method in METHODS[1:]:
        done = [r for r in rows if r["method"] == method]
        if done:
            lines.append(f"| {LABELS[method]} | {done[0]['calibration_seconds']:.0f} | "
                         f"{max(r['decision_seconds'] for r in done):.0f} | {max(r['peak_rss_gib'] for r in done):.1f} |")
    lines += ["", "### The measured choice (`rankwise defaults`)", ""]
    for fraction in FRACTIONS:
        row = find(rows, "rw-defaults", fraction)
        if row is None:
            continue
        lines += [f"{100 * fraction:.0f}% (goal {row['goal']:.4f} of all learnables): chosen "
                  f"{row['choice']}. Calibration {row['calibration_seconds']:.0f} s (one NeuronPCA for every goal), "
                  f"decision and build {row['decision_seconds']:.0f} s, of which measuring the "
                  f"candidates {row['measuring_seconds']:.0f} s.", "",
                  "| criterion | allocation | shrinkage | held-out KL | learnables after |",
                  "|---|---|---|---:|---:|"]
        for c in row["candidates"]:
            score = "not built: " + c["note"] if c["score"] is None else f"{c['score']:.4f}"
            after = "" if c["learnables_after"] is None else f"{c['learnables_after']:,}"
            lines.append(f"| {c['criterion']} | {c['allocation']} | {c['regularization']} | {score} | {after} |")
        lines.append("")
    lines += ["### Greedy continuations", "", f"Prompt: `{PROMPT}`, {NEW_TOKENS} new tokens, `do_sample=False`.", ""]
    for method, fraction in [("original", 0.0)] + [(m, f) for f in FRACTIONS for m in METHODS[1:]]:
        row = find(rows, method, fraction)
        if row is not None and "continuation" in row:
            name = "original" if method == "original" else f"{LABELS[method]} at {100 * fraction:.0f}%"
            lines.append(f"- {name}: `{row['continuation']!r}`")
    warned = sorted({w for r in rows for w in r.get("warnings", [])})
    if warned:
        lines += ["", "### Warnings issued by rankwise", ""] + [f"- {w}" for w in warned]
    return "\n".join(lines)


