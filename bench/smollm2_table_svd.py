"""A check of the tied table's basis on SmolLM2-135M: perplexity with only the tied table factored
at a rank ``r``, its basis ``P`` the top right singular vectors of the table ``E`` (plain truncated
SVD, data-free: ``E P P^T`` is then the best rank-``r`` approximation of ``E`` in Frobenius norm)
against the basis rankwise's loss criterion chose at that rank (in ``smollm2_tied``).

    python bench/smollm2_table_svd.py --rank 332     # prints the test perplexity (1 torch thread)
"""

import argparse

import torch

from rankwise.layers import TiedEmbedding
from smollm2 import perplexity, smollm2, splits
from smollm2_tied import PROFILES


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=332)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = smollm2()
    batches, _ = splits(tokenizer, PROFILES["full"])
    table = model.model.embed_tokens
    basis = torch.linalg.svd(table.weight.detach().double(), full_matrices=False)[2].T[:, :args.rank]
    tied = TiedEmbedding.from_dense(table, basis, "lm_head")
    model.model.embed_tokens, model.lm_head = tied, tied.head_end(None, "model.embed_tokens")
    print(f"rank {args.rank}, plain SVD basis: test perplexity {perplexity(model, batches['test']):.2f}")


if __name__ == "__main__":
    main()
