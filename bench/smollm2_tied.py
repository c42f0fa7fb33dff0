"""SmolLM2-135M at 20% of ALL its learnables, its tied token table and head compressed as one unit.

SmolLM2's token table (49 152 x 576 = 28 311 552 learnables, tied to the output head) is 21% of
its 134 515 008 learnables. Before tied tables could be compressed, a goal on the whole network
had to come from the decoder layers alone; here the table is a candidate like the Linears
(:mod:`rankwise.ranks.tied`: one factored table ``E ~ A B`` serving the lookup and the logits).

**What runs** (same model, text, splits and perplexity as :mod:`smollm2`: 32 calibration chunks
of 256 tokens of standard-library docstrings, perplexity on the 16 held-apart test chunks):

- ``layer_names = ["model.embed_tokens"] + the Linears of the decoder layers DECODER_LAYERS``;
- ``npca = rw.NeuronPCA(model, calibration, layer_names=layer_names, loss_fn="kl",
  validation=None)`` (one pass with a backward pass per batch: the loss criterion's Fisher
  information, of the table's output and of the head's input too);
- for each ``criterion`` in ``("loss", "variance")``: ``rw.compress_network_using_projection(model,
  npca, learnables_reduction_goal=0.2, layer_names=layer_names, criterion=criterion,
  allocation="global")``. Explicit options instead of ``"auto"``: the measured choice on this many
  layers exceeds this shared machine's memory budget (see :mod:`smollm2`), and ``0.2`` is of the
  whole network's learnables, so the goal needs about a quarter of the candidates' learnables.

**Where the perplexity goes.** For each criterion, two more rows from the same NeuronPCA: the
table alone as the only candidate, asked to remove what the table gave in the joint decision, and
the decoder Linears alone, asked to remove what they gave.

**Which decoder layers.** Every third, ``0, 3, ..., 27`` (10 layers, 70 Linears, 35 389 440
learnables), chosen before any result, to keep the peak resident memory under 8 GiB; with the
table, 63 700 992 candidate learnables, of which the goal (26 903 002) is 42%.

    python bench/smollm2_tied.py             # -> bench/results/smollm2_tied.{json,md}, 1 torch thread
    python bench/smollm2_tied.py --quick     # 4 calibration / 2 test chunks, decoder layers 0, 15
"""

import argparse
import json
import os
import time
import warnings

import torch

import rankwise as rw
from environment import write_result
from smollm2 import (continuation, decoder_linear_names, perplexity, rss_gib, smollm2, splits)

GOAL = 0.2
DECODER_LAYERS = {"full": tuple(range(0, 30, 3)), "quick": (0, 15)}
PROFILES = {"full": {"calibration": 32, "validation": 8, "test": 16},
            "quick": {"calibration": 4, "validation": 1, "test": 2}}
CRITERIA = ("loss", "variance")
TABLE, HEAD = "model.embed_tokens", "lm_head"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run(profile):
    torch.manual_seed(0)
    model, tokenizer = smollm2()
    batches, _ = splits(tokenizer, PROFILES[profile])
    names = [TABLE] + decoder_linear_names(model, DECODER_LAYERS[profile])
    total = rw.count_learnables(model)
    rows = [{"method": "original", "perplexity": perplexity(model, batches["test"]), "learnables": total,
             "continuation": continuation(model, tokenizer)}]
    print(rows[-1], flush=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # thin-data warnings: 8 192 tokens for 49 152 rows
        npca = rw.NeuronPCA(model, batches["calibration"], layer_names=names, loss_fn="kl", validation=None,
                            verbosity="off")
    calibration = time.perf_counter() - start
    for criterion in CRITERIA:
        start = time.perf_counter()
        net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=GOAL,
                                                         layer_names=names, criterion=criterion,
                                                         allocation="global", verbosity="off")
        seconds = time.perf_counter() - start
        table = info.layers[TABLE]
        embeddings, head = net.get_input_embeddings(), net.get_output_embeddings()
        rows.append({"method": f"rw-{criterion}-global", "criterion": criterion, "goal": GOAL,
                     "learnables": rw.count_learnables(net), "learnables_reduction": info.learnables_reduction,
                     "goal_reached": info.goal_reached, "table_rank": table.rank_out,
                     "table_learnables": [table.learnables_before, table.learnables_after],
                     "tie_kept": shared_table(embeddings) is shared_table(head),
                     "decoder_removed": sum(p.learnables_before - p.learnables_after for n, p in info.layers.items()
                                            if n != TABLE),
                     "perplexity": perplexity(net, batches["test"]), "calibration_seconds": calibration,
                     "decision_seconds": seconds, "peak_rss_gib": rss_gib()[1],
                     "continuation": continuation(net, tokenizer)})
        print({k: v for k, v in rows[-1].items()}, flush=True)
        del net
        rows += split_rows(model, npca, names, criterion, rows[-1], batches["test"])
    return {"profile": profile, "decoder_layers": list(DECODER_LAYERS[profile]), "candidates": len(names),
            "threads": torch.get_num_threads(), "network_learnables": total, "rows": rows}


def split_rows(model, npca, names, criterion, row, test):
    """Where the perplexity went: the same criterion with only the table as a candidate, removing
    what the table gave, and with only the decoder Linears, removing what they gave."""
    total, rows = rw.count_learnables(model), []
    table_removed = row["table_learnables"][0] - row["table_learnables"][1]
    for part, layer_names, removed in (("table only", [TABLE], table_removed),
                                       ("decoder only", names[1:], row["decoder_removed"])):
        if removed == 0:
            continue
        net, info = rw.compress_network_using_projection(model, npca, learnables_reduction_goal=removed / total,
                                                         layer_names=layer_names, criterion=criterion,
                                                         allocation="global", verbosity="off")
        rows.append({"method": f"rw-{criterion}-global, {part}", "learnables": rw.count_learnables(net),
                     "learnables_reduction": info.learnables_reduction, "perplexity": perplexity(net, test),
                     "table_rank": info.layers[TABLE].rank_out if TABLE in info.layers else None})
        print(rows[-1], flush=True)
    return rows


def shared_table(end):
    """The tensor an end of the tie reads: a factored end's ``table``, a dense end's ``weight``."""
    return end.table if isinstance(end, (rw.layers.TiedEmbedding, rw.layers.TiedHead)) else end.weight


def markdown(result):
    lines = ["| method | learnables | removed (of all) | table rank (learnables) | decoder Linears removed | "
             "tie kept | test perplexity | seconds (calibration + decision) | peak RSS GiB |",
             "|---|---:|---:|---|---:|---|---:|---:|---:|"]
    for row in result["rows"]:
        if row["method"] == "original":
            lines.append(f"| original | {row['learnables']:,} | - | 49152 x 576 dense | - | yes | "
                         f"{row['perplexity']:.2f} | - | - |")
            continue
        if "table_learnables" not in row:  # a split row
            lines.append(f"| {row['method']} | {row['learnables']:,} | {row['learnables_reduction']:.2%} | "
                         f"{row['table_rank'] or 'dense'} | "
                         f"| yes | {row['perplexity']:.2f} | | |")
            continue
        before, after = row["table_learnables"]
        lines.append(f"| {row['method']} | {row['learnables']:,} | {row['learnables_reduction']:.2%} | "
                     f"{row['table_rank'] or 'dense'} ({before:,} -> {after:,}) | {row['decoder_removed']:,} | "
                     f"{'yes' if row['tie_kept'] else 'NO'} | {row['perplexity']:.2f} | "
                     f"{row['calibration_seconds']:.0f} + {row['decision_seconds']:.0f} | {row['peak_rss_gib']:.1f} |")
    lines.append("")
    lines += [f"- {row['method']}: {row['continuation']!r}" for row in result["rows"] if "continuation" in row]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = run("quick" if args.quick else "full")
    name = "smollm2_tied_quick" if args.quick else "smollm2_tied"
    with open(os.path.join(RESULTS, name + ".json"), "w") as stream:
        json.dump(result, stream, indent=1)
    write_result(os.path.join(RESULTS, name + ".md"), "SmolLM2-135M: 20% of all learnables, the tie kept",
                 markdown(result))


if __name__ == "__main__":
    main()
