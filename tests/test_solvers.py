"""The eigensolvers of the decisions: precision within the stated bound, the thread policy, the
thin factorisation of expanding layers (rankwise/solvers.py, rankwise/threads.py, Spectrum.factored)."""

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.moments import Spectrum
from rankwise.solvers import (FLOAT32_FROM_WIDTH, ROUNDOFF32, descending_eigh, eigen_bound, solver_dtype,
                              thin_left_singular)
from rankwise.threads import ENVIRONMENT, solver_thread_count, solving


def covariance(width: int, rank: int, seed: int = 0) -> torch.Tensor:
    """A float64 covariance of a decaying spectrum, rank ``rank`` plus a small isotropic floor."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64, generator=generator))[0]
    spectrum = torch.cat([torch.logspace(1, -3, rank, dtype=torch.float64),
                          torch.full((width - rank,), 1e-6, dtype=torch.float64)])
    return basis @ torch.diag(spectrum) @ basis.T


def test_float32_eigenvalues_within_the_stated_bound():
    matrix = covariance(300, 120)
    exact, _ = descending_eigh(matrix, torch.float64)
    approx, _ = descending_eigh(matrix, torch.float32)
    delta = eigen_bound(matrix)
    assert delta == pytest.approx(300 * ROUNDOFF32 * float(exact[0]), rel=1e-9)
    assert float((approx - exact).abs().max()) <= delta


def test_float32_basis_keeps_the_variance_within_the_stated_bound():
    matrix = covariance(320, 200, seed=1)
    exact, _ = descending_eigh(matrix, torch.float64)
    _, vectors = descending_eigh(matrix, torch.float32)
    delta = eigen_bound(matrix)
    for rank in (1, 10, 50, 150):
        basis = vectors[:, :rank]
        kept = float(torch.einsum("ij,ik,kj->", basis, matrix, basis))
        assert float(exact[:rank].sum()) - kept <= 3 * rank * delta
        assert kept <= float(exact[:rank].sum()) + 3 * rank * delta


def test_float32_only_where_the_sampling_error_dominates():
    assert solver_dtype(FLOAT32_FROM_WIDTH - 1, 10_000) is torch.float64
    assert solver_dtype(768, 2048) is torch.float32
    assert solver_dtype(768, 10 ** 9) is torch.float64  # d 2^-24 > sqrt(d / n) / 100
    assert solver_dtype(768, 0) is torch.float64


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_thin_factorisation_matches_the_full_eigendecomposition(dtype):
    generator = torch.Generator().manual_seed(2)
    factor = torch.randn(300, 40, dtype=torch.float64, generator=generator)
    full, full_vectors = descending_eigh(factor @ factor.T, torch.float64)
    values, vectors = thin_left_singular(factor, dtype)
    assert values.shape == (300,) and vectors.shape == (300, 40)
    assert torch.all(values[40:] == 0)
    bound = 2 * eigen_bound(factor @ factor.T) if dtype is torch.float32 else 1e-9 * float(full[0])
    assert float((values - full).abs().max()) <= bound
    overlap = (vectors[:, :10].T @ full_vectors[:, :10]).abs()  # same top directions (distinct eigenvalues)
    torch.testing.assert_close(overlap.diagonal(), torch.ones(10, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("regularization", ["auto", 0.0, 0.3])
def test_expanding_linear_spectrum_from_its_factorisation(regularization):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 5))
    data = [torch.randn(32, 12) for _ in range(4)]
    npca = rw.NeuronPCA(model, data, verbosity="off", regularization=regularization, validation=None, loss_fn=None)
    for name in ("0", "2"):
        thin = npca.spectrum(name, "output")
        assert npca.statistics(name, settle=False).factored  # the decisions' path formed no d_out^2 moments
        stats = npca.statistics(name).settled()
        full = Spectrum.shrunk(stats.output.covariance, stats.output.mean, thin.regularization,
                               stats.input.power * stats.weight_gram_output)
        # the full route forms W S W^T / n - mu mu^T: cancellation of order 1e-8 of the largest
        torch.testing.assert_close(thin.eigenvalues, full.eigenvalues, atol=1e-7 * float(full.eigenvalues[0]), rtol=0)
        torch.testing.assert_close(thin.mean, full.mean)
        rank = int((full.eigenvalues > 1e-6 * full.eigenvalues[0]).sum())
        projector = thin.eigenvectors[:, :rank] @ thin.eigenvectors[:, :rank].T
        torch.testing.assert_close(projector, full.eigenvectors[:, :rank] @ full.eigenvectors[:, :rank].T,
                                   atol=1e-7, rtol=0)
    assert npca.spectrum("0", "output").eigenvectors.shape == (48, 12)  # rank <= d_in columns


def test_thread_policy_from_the_environment_and_restored(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv(ENVIRONMENT, "1")
    assert solver_thread_count() == 1
    with solving() as threads:
        assert threads == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_thread_policy_overridden_by_the_context_manager(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT, "1")
    with rw.solver_threads(2):
        assert solver_thread_count() == 2
    assert solver_thread_count() == 1
    monkeypatch.setenv(ENVIRONMENT, "auto")
    assert 1 <= solver_thread_count() <= torch.get_num_threads()


def test_thread_policy_used_by_the_solvers(monkeypatch):
    seen = []
    original = torch.linalg.eigh

    def spy(matrix):
        seen.append(torch.get_num_threads())
        return original(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    with rw.solver_threads(1):
        descending_eigh(covariance(20, 5), torch.float64)
    assert seen == [1]


@pytest.mark.parametrize("setting", ["0", "-2", "two", "1.5"])
def test_bad_thread_settings_name_the_variable(monkeypatch, setting):
    monkeypatch.setenv(ENVIRONMENT, setting)
    with pytest.raises(ValueError, match=ENVIRONMENT):
        solver_thread_count()


@pytest.mark.parametrize("setting", [0, "many", 1.5])
def test_bad_thread_argument_names_it(setting):
    with pytest.raises(ValueError, match="solver_threads"):
        with rw.solver_threads(setting):
            pass
