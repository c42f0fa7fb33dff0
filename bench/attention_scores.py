"""Attention-aware query/key ranks on all-MiniLM-L6-v2 (issue 13, "Attention-aware choice").

In a BERT self-attention the query and key maps matter only through the scores of each head
``h``, ``S_h = Q_h K_h^T / sqrt(d_h)``. Every layer's ``query`` and ``key`` ``nn.Linear``
(384 -> 384, 12 heads of ``d_h = 32``) is replaced by a factored pair
``Linear(384, R, bias=False) -> Linear(R, 384)`` with ``R = 12 r`` (``r`` per head, the same in
every head and layer; every other layer dense), so every method below has the SAME learnables
``2 * 384 * R + 384`` per map. The methods differ only in which rank-``R`` maps they choose:

- ``pca-map`` (rankwise's own-output choice, as ``compress_network_using_projection`` builds an
  output projection): ``P`` = the top ``R`` eigenvectors of the map's whole output covariance
  from ``rw.NeuronPCA`` (``npca.spectrum(name)``, default ``regularization="auto"``),
  ``q' = P P^T (W x + b - mu) + mu``: first factor ``P^T W``, second ``P`` with bias
  ``P P^T (b - mu) + mu``.
- ``pca-head``: the same, one PCA per head: ``P_h`` = top ``r`` eigenvectors of the head's
  ``32 x 32`` block of the same (regularised) covariance; ``P`` is block diagonal.
- ``score-indep``: the scores' error as the objective, in the line of Eigen Attention (Saxena et
  al. 2024, arXiv:2408.05646: attention in a low-rank space, one basis for queries and keys from
  an SVD of their calibration representations) and Palu (Chang et al. 2024, arXiv:2407.21118:
  SVD of the projections per group of heads, Fisher-based rank search); neither paper's exact
  recipe, but the objective both approximate: per head, minimise
  ``E[(q^T (I - A) k)^2]`` over ``A = L R^T`` of rank ``r``. Treating ``q`` and ``k`` as
  independent the objective is ``tr((I-A)^T C_q (I-A) C_k) = |G_q^T (I-A) G_k|_F^2`` with the
  uncentred second moments ``C_q = E[q q^T] = G_q G_q^T`` (Cholesky, jittered by
  ``1e-6 tr(C)/d``), so ``A = G_q^-T [G_q^T G_k]_r G_k^-1`` (truncated SVD
  ``U_r Sigma_r V_r^T`` of ``G_q^T G_k``): ``L = G_q^-T U_r Sigma_r``, ``R = G_k^-T V_r``.
- ``score-exact``: the same objective with the exact cross statistics over the real
  (query token, key token) pairs of each calibration sentence,
  ``E[(q^T M k)^2] = sum M_ba M_dc H[b,a,d,c]``, ``H = sum_sentences C_q^(s)[b,d] C_k^(s)[a,c]``
  (the per-sentence Grams: the pairs of one sentence share it); no closed form, solved by
  alternating least squares in ``L`` and ``R`` from the ``score-indep`` optimum (each step a
  linear solve of ``32 r`` unknowns, never increasing the objective).

- ``score-indep-alloc`` / ``score-exact-alloc``: the same at the same total rank ``12 r`` per
  layer, shared among the heads by the ``12 r`` largest ``sigma^2`` of the layer's
  ``G_q^T G_k`` (optimal for the summed independent objective; ``pca-map`` shares its rank
  among the heads too, through its one basis).

The score-aware ``A`` is realised with the model's widths: ``q_new = B L^T q``,
``k_new = B R^T k`` with ``B = [I_r; 0]`` (any ``32 x r`` orthonormal ``B`` gives
``q_new^T k_new = q^T L R^T k``), i.e. first factor ``L_h^T W_h`` per head, second factor ``B`` per
head with bias ``B L_h^T b_h``: the bias is kept exactly (the uncentred moments include it).
Learnables are counted twice: as the factor pair built here (the same for every method at a
given ``r``; at ``r = 16`` it is break-even, ``2 * 384 * 192 + 384 = 384 * 385``), and in each
method's smallest exact form: for ``score-*`` the second factor ``B`` is a fixed zero-padding,
so the map is the query/key Linear with all but ``R`` output rows zero, ``385 R`` learnables
(the PCA maps need their learnt second factor ``P``).

Measured on held-apart sentences (bench/pretrained_data.py's splits): the relative score error
of each layer, ``|S - S'|_F / |S|_F`` over all heads and the real token pairs of each sentence
(padding masked), with both scores computed from the ORIGINAL network's hidden states (the
local error each method optimises); and the mean cosine of the compressed network's mean-pooled
sentence embeddings to the original's (as bench/pretrained.py). Nothing is tuned: every
setting is fixed above; validation and test are both reported.

    python bench/attention_scores.py --threads 1      # -> bench/results/attention_scores.{json,md}
"""

import argparse
import copy
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import pretrained_data as data
import rankwise as rw
from environment import write_result

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RANKS = (2, 4, 8, 16)
METHODS = ("pca-map", "pca-head", "score-indep", "score-exact", "score-indep-alloc", "score-exact-alloc")
HEADS, HEAD_DIM = 12, 32
ALS_STEPS = 10


def attention_layers(model):
    """``{index: BertSelfAttention}`` of the encoder."""
    return {i: layer.attention.self for i, layer in enumerate(model.encoder.layer)}


def heads(rows):
    """``(..., 384)`` -> ``(..., 12, 32)``."""
    return rows.unflatten(-1, (HEADS, HEAD_DIM))


def jittered_cholesky(gram):
    """Lower Cholesky factors of ``(H, d, d)`` Grams plus ``1e-6 tr(C)/d I``."""
    jitter = 1e-6 * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
    return torch.linalg.cholesky(gram + jitter * torch.eye(gram.shape[-1], dtype=gram.dtype))


def calibration_grams(model, batches):
    """Per layer, the per-sentence per-head uncentred Grams ``sum_t q_t q_t^T`` of query and key,
    ``{i: {"query": (S, H, 32, 32), "key": ...}}`` (float64), one sentence per batch."""
    grams = {i: {"query": [], "key": []} for i in attention_layers(model)}
    hooks = []
    for i, attention in attention_layers(model).items():
        for part in ("query", "key"):
            def hook(module, inputs, output, i=i, part=part):
                rows = heads(output[0].double())  # (T, H, d): one sentence, no padding
                grams[i][part].append(torch.einsum("thb,thd->hbd", rows, rows))
            hooks.append(getattr(attention, part).register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in hooks:
        handle.remove()
    return {i: {part: torch.stack(g) for part, g in parts.items()} for i, parts in grams.items()}


def score_spectrum(gram_q, gram_k):
    """Cholesky factors and the SVD ``U Sigma V^T`` of ``G_q^T G_k`` per head."""
    chol_q, chol_k = jittered_cholesky(gram_q), jittered_cholesky(gram_k)
    u, sigma, vh = torch.linalg.svd(chol_q.mT @ chol_k)
    return chol_q, chol_k, u, sigma, vh


def head_ranks(sigma, rank, allocate):
    """Rank of each head: ``rank`` everywhere, or (``allocate``) the ``12 rank`` largest
    ``sigma^2`` of the whole layer, which minimises the summed independent objective
    ``sum_h sum_{i > r_h} sigma_{h,i}^2`` at the same total rank."""
    if not allocate:
        return [rank] * HEADS
    order = sigma.square().flatten().argsort(descending=True)[:HEADS * rank]
    return torch.bincount(order // HEAD_DIM, minlength=HEADS).tolist()


def independent_factors(spectrum, ranks):
    """Per head, ``L_h, R_h`` (``(d, r_h)``) minimising ``tr((I - L R^T)^T C_q (I - L R^T) C_k)``:
    ``L = G_q^-T U_r Sigma_r``, ``R = G_k^-T V_r``."""
    chol_q, chol_k, u, sigma, vh = spectrum
    lefts, rights = [], []
    for h, r in enumerate(ranks):
        lefts.append(torch.linalg.solve_triangular(chol_q[h].T, u[h, :, :r] * sigma[h, :r], upper=True))
        rights.append(torch.linalg.solve_triangular(chol_k[h].T, vh[h, :r].T, upper=True))
    return lefts, rights


def pair_tensor(grams_q, grams_k):
    """``H[h, b, a, d, c] = sum_s C_q^(s)[h,b,d] C_k^(s)[h,a,c]``: the quadratic form of
    ``sum over the pairs of each sentence (q^T M k)^2 = sum M_ba M_dc H[b,a,d,c]``."""
    d = HEAD_DIM
    flat_q = grams_q.permute(1, 0, 2, 3).reshape(HEADS, -1, d * d)   # (H, S, (b,d))
    flat_k = grams_k.permute(1, 0, 2, 3).reshape(HEADS, -1, d * d)   # (H, S, (a,c))
    outer = (flat_q.mT @ flat_k).view(HEADS, d, d, d, d)             # [h, b, d, a, c]
    return outer.permute(0, 1, 3, 2, 4).contiguous()


def pair_objective(form, matrix):
    """``sum M_ba M_dc H[b,a,d,c]`` for one head."""
    return float(torch.einsum("ba,badc,dc->", matrix, form, matrix))


def solve_ridged(normal, rhs):
    """``normal^-1 rhs`` with a ``1e-10`` relative ridge for conditioning."""
    ridge = 1e-10 * normal.diagonal().mean()
    return torch.linalg.solve(normal + ridge * torch.eye(normal.shape[0], dtype=normal.dtype), rhs)


def exact_head_factors(form, left, right):
    """Alternating least squares on ``vec(I - L R^T)^T H vec(I - L R^T)`` for one head: with
    ``R`` fixed the objective is quadratic in ``L`` (normal matrix
    ``sum_ac R_at H[b,a,d,c] R_cs`` over ``(b,t),(d,s)``, right side ``sum_a R_at H[b,a,d,d]``),
    and symmetrically in ``R``; each step can only lower it."""
    d, rank = left.shape
    if rank == 0:
        return left, right
    diagonal = torch.einsum("badd->ba", form)
    for _ in range(ALS_STEPS):
        normal = torch.einsum("at,badc,cs->btds", right, form, right).reshape(d * rank, d * rank)
        left = solve_ridged(normal, torch.einsum("at,ba->bt", right, diagonal).reshape(-1)).view(d, rank)
        normal = torch.einsum("bt,badc,ds->atcs", left, form, left).reshape(d * rank, d * rank)
        right = solve_ridged(normal, torch.einsum("bt,ba->at", left, diagonal).reshape(-1)).view(d, rank)
    return left, right


def exact_factors(form, lefts, rights):
    """Per head, ALS from the independent optimum; the summed pair objective before and after."""
    eye = torch.eye(HEAD_DIM, dtype=form.dtype)
    start = sum(pair_objective(form[h], eye - lefts[h] @ rights[h].T) for h in range(HEADS))
    solved = [exact_head_factors(form[h], lefts[h], rights[h]) for h in range(HEADS)]
    lefts, rights = [s[0] for s in solved], [s[1] for s in solved]
    end = sum(pair_objective(form[h], eye - lefts[h] @ rights[h].T) for h in range(HEADS))
    return lefts, rights, start, end


def factored(first, second, bias):
    """``Linear(384, R, bias=False) -> Linear(R, 384)`` with the given float64 weights."""
    down = nn.Linear(first.shape[1], first.shape[0], bias=False)
    up = nn.Linear(second.shape[1], second.shape[0])
    with torch.no_grad():
        down.weight.copy_(first)
        up.weight.copy_(second)
        up.bias.copy_(bias)
    return nn.Sequential(down, up)


def block_diagonal(blocks):
    """Per-head ``(d, r_h)`` blocks -> the ``(H d, sum r_h)`` block-diagonal matrix."""
    return torch.block_diag(*blocks)


def projection_map(linear, basis, mean):
    """``q' = P P^T (W x + b - mu) + mu`` as a factored pair (``P``: ``(384, R)`` orthonormal)."""
    weight, bias = linear.weight.double(), linear.bias.double()
    return factored(basis.T @ weight, basis, basis @ (basis.T @ (bias - mean)) + mean)


def score_map(linear, factors):
    """``q_new = B_h F_h^T (W_h x + b_h)`` per head, ``F_h`` the ``(d, r_h)`` factor,
    ``B_h = [I_r; 0]`` (``d x r_h``)."""
    weight, bias = linear.weight.double(), linear.bias.double()
    down = block_diagonal(factors).T                              # (sum r_h, 384)
    up = block_diagonal([torch.eye(HEAD_DIM, f.shape[1], dtype=torch.float64) for f in factors])
    return factored(down @ weight, up, up @ (down @ bias))


def pca_bases(npca, name, rank, per_head):
    """Orthonormal ``(384, 12 r)`` basis of the map's output: top eigenvectors of the
    regularised covariance, of the whole map or of each head's diagonal block."""
    spectrum = npca.spectrum(name)
    if not per_head:
        return spectrum.eigenvectors[:, :HEADS * rank].double(), spectrum.mean.double()
    vectors, values = spectrum.eigenvectors.double(), spectrum.eigenvalues.double()
    covariance = heads((vectors * values) @ vectors.T)             # (384, H, d)
    blocks = torch.stack([covariance[h * HEAD_DIM:(h + 1) * HEAD_DIM, h] for h in range(HEADS)])
    block_vectors = torch.linalg.eigh(blocks).eigenvectors.flip(-1)[..., :rank]
    return block_diagonal(block_vectors), spectrum.mean.double()


def compressed_maps(model, method, rank, npca, grams):
    """``{(layer, part): new module}`` for one method at per-head rank ``rank``; and notes
    (per layer: the head ranks, and for ``score-exact*`` the pair objective before/after ALS)."""
    maps, notes = {}, {}
    for i, attention in attention_layers(model).items():
        names = {part: f"encoder.layer.{i}.attention.self.{part}" for part in ("query", "key")}
        if method.startswith("pca"):
            for part, name in names.items():
                basis, mean = pca_bases(npca, name, rank, per_head=method == "pca-head")
                maps[i, part] = projection_map(getattr(attention, part), basis, mean)
            continue
        spectrum = score_spectrum(grams[i]["query"].sum(0), grams[i]["key"].sum(0))
        ranks = head_ranks(spectrum[3], rank, allocate=method.endswith("-alloc"))
        lefts, rights = independent_factors(spectrum, ranks)
        notes[i] = {"head_ranks": ranks}
        if method.startswith("score-exact"):
            lefts, rights, before, after = exact_factors(pair_tensor(grams[i]["query"], grams[i]["key"]),
                                                         lefts, rights)
            notes[i].update(pair_objective_independent=before, pair_objective_als=after)
        maps[i, "query"] = score_map(attention.query, lefts)
        maps[i, "key"] = score_map(attention.key, rights)
    return {key: module.float() for key, module in maps.items()}, notes


def with_maps(model, maps):
    """A copy of ``model`` whose query/key Linears are replaced by ``maps``."""
    compressed = copy.deepcopy(model)
    for (i, part), module in maps.items():
        setattr(attention_layers(compressed)[i], part, module)
    return compressed


def hidden_inputs(model, batches):
    """Per batch, the input of every layer's query (= key) Linear, ``{i: (N, T, 384)}``."""
    captured, hooks = [], []
    current = {}
    for i, attention in attention_layers(model).items():
        hooks.append(attention.query.register_forward_hook(
            lambda module, inputs, output, i=i: current.__setitem__(i, inputs[0].detach())))
    with torch.no_grad():
        for batch in batches:
            current = {}
            model(**batch)
            captured.append(current)
    for handle in hooks:
        handle.remove()
    return captured


def scores(query, key, x):
    """``(N, H, T, T)`` scores ``Q K^T / sqrt(d_h)`` of hidden states ``x`` (float64)."""
    q = heads(query(x).double()).transpose(1, 2)
    k = heads(key(x).double()).transpose(1, 2)
    return q @ k.mT / math.sqrt(HEAD_DIM)


def score_errors(model, maps, inputs, batches):
    """Per layer, ``|S - S'|_F / |S|_F`` over heads and real token pairs (padding masked)."""
    errors = {}
    with torch.no_grad():
        for i, attention in attention_layers(model).items():
            lost = total = 0.0
            for hidden, batch in zip(inputs, batches):
                mask = batch["attention_mask"].double()
                pairs = (mask[:, :, None] * mask[:, None, :])[:, None]
                original = scores(attention.query, attention.key, hidden[i])
                approximate = scores(maps[i, "query"], maps[i, "key"], hidden[i])
                lost += float(((original - approximate).square() * pairs).sum())
                total += float((original.square() * pairs).sum())
            errors[i] = math.sqrt(lost / total)
    return errors


def cosine(model, reference, batches):
    """Mean cosine of the mean-pooled embeddings to ``reference``."""
    with torch.no_grad():
        outputs = torch.cat([data.mean_pooled(model, batch) for batch in batches])
    return float(F.cosine_similarity(outputs, reference, dim=1).mean())


def learnables_removed(model, maps, method):
    """Learnables of the dense query/key maps minus those of the replacements: as the factor
    pair built here, and in the method's smallest exact form: for ``score-*`` the second factor
    is the fixed zero-padding ``B = [I_r; 0]``, so each map is just ``Linear(384, R)`` (the
    query/key Linear with all but ``R`` output rows identically zero; ``R`` = its rank)."""
    dense = sum(rw.count_learnables(getattr(attention_layers(model)[i], part)) for i, part in maps)
    pair = sum(rw.count_learnables(module) for module in maps.values())
    rows_only = sum(rw.count_learnables(module[0]) + module[0].out_features for module in maps.values())
    return dense - pair, dense - (rows_only if method.startswith("score") else pair), dense


def table(rows, split, key):
    lines = ["| r per head (of 32) | method | score error | cosine | learnables removed: factor pair "
             "| smallest exact form |", "|---:|---|---:|---:|---:|---:|"]
    for row in sorted(rows, key=key):
        res = row[split]
        lines.append(f"| {row['rank']} | {row['method']} | {res['score_error_mean']:.4f} | "
                     f"{res['cosine']:.4f} | {row['learnables_removed']:,} ({row['removed_of_network']:.1%}) | "
                     f"{row['learnables_removed_smallest']:,} ({row['smallest_removed_of_network']:.1%}) |")
    return "\n".join(lines)


def tables(rows, split):
    """The rows by rank, then by learnables removed in each method's smallest form."""
    return (f"**{split} split**, by rank. Score error: mean over the 6 layers of `|S - S'|_F / |S|_F` "
            "(per layer in the JSON); cosine: mean-pooled embeddings to the original's; learnables "
            "removed out of the 12 query/key maps' 1,774,080 (percent of the network's).\n\n"
            + table(rows, split, lambda row: row["rank"])
            + f"\n\n**{split} split**, at equal learnables in each method's smallest exact form "
              "(sorted by learnables removed):\n\n"
            + table(rows, split, lambda row: (row["learnables_removed_smallest"], row["method"])))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--validation", type=int, default=128)
    parser.add_argument("--test", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    model, tokenizer = data.minilm()
    counts = {"calibration": args.calibration, "validation": args.validation, "test": args.test}
    sentences = {split: data.sentence_split(split, count, seed=i) for i, (split, count) in enumerate(counts.items())}
    calibration = data.tokenize(tokenizer, sentences["calibration"], 1)
    splits = {split: data.tokenize(tokenizer, sentences[split], 32) for split in ("validation", "test")}
    names = [f"encoder.layer.{i}.attention.self.{part}" for i in range(6) for part in ("query", "key")]
    npca = rw.NeuronPCA(model, calibration, layer_names=names, verbosity="off")
    grams = calibration_grams(model, calibration)
    with torch.no_grad():
        reference = {split: torch.cat([data.mean_pooled(model, b) for b in batches])
                     for split, batches in splits.items()}
    inputs = {split: hidden_inputs(model, batches) for split, batches in splits.items()}
    network = rw.count_learnables(model)
    rows = []
    for rank in RANKS:
        for method in METHODS:
            maps, notes = compressed_maps(model, method, rank, npca, grams)
            compressed = with_maps(model, maps)
            removed, smallest, dense = learnables_removed(model, maps, method)
            row = {"rank": rank, "method": method, "learnables_removed": removed,
                   "learnables_removed_smallest": smallest, "dense_query_key_learnables": dense,
                   "removed_of_network": removed / network, "smallest_removed_of_network": smallest / network,
                   "notes": notes}
            for split, batches in splits.items():
                errors = score_errors(model, maps, inputs[split], batches)
                row[split] = {"score_error_per_layer": errors,
                              "score_error_mean": sum(errors.values()) / len(errors),
                              "cosine": cosine(compressed, reference[split], batches)}
            rows.append(row)
            print(f"r={rank} {method:12} test score error {row['test']['score_error_mean']:.4f} "
                  f"cosine {row['test']['cosine']:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "attention_scores.json"), "w") as stream:
        json.dump({"sentences": counts, "network_learnables": network, "seconds": seconds, "rows": rows},
                  stream, indent=1)
    body = (f"all-MiniLM-L6-v2, every layer's query and key at r per head (12 heads of 32), everything "
            f"else dense; {counts['calibration']} calibration sentences (one per batch), "
            f"{counts['validation']} validation, {counts['test']} test (batches of 32, padding masked); "
            f"{seconds:.0f} s in all. Methods: see the docstring of bench/attention_scores.py.\n\n"
            + tables(rows, "test") + "\n\n" + tables(rows, "validation"))
    write_result(os.path.join(RESULTS, "attention_scores.md"), "Attention-aware query/key ranks", body)


if __name__ == "__main__":
    main()
