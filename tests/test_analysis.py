"""melora analyze: spectra, effective ranks and block diversity, checked against matrices whose spectra and
subspaces are known by construction, against dense SVDs of the live models' updates, and through the command.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from melora import MELoRAConfig, save_adapter
from melora.adapter_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from melora.analysis import analysis_table, analyze_adapter, layer_index
from melora.errors import UserError
from melora.spectra import (
    block_column_spans,
    block_frobenius_norms,
    block_row_spans,
    coefficient_of_variation,
    diagonal_energy_fraction,
    effective_block_count,
    energy_shares,
    entropy_effective_rank,
    lora_singular_values,
    mean_subspace_overlap,
    melora_singular_values,
    principal_angle_cosines,
    random_subspace_overlap,
    rank_above,
)
from melora.tuner.layer import MELoRALayer
from tests.tiny_models import TinyMLP

REPO = Path(__file__).resolve().parents[1]
PREFIX = "base_model.model."


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, cols) with orthonormal columns, float64."""
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64)).Q


def dense_block_diagonal(blocks: list[torch.Tensor]) -> torch.Tensor:
    """The block-diagonal matrix, assembled by slicing (independent of melora.functional)."""
    rows, cols = sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)
    dense = torch.zeros(rows, cols, dtype=torch.float64)
    i = j = 0
    for block in blocks:
        dense[i : i + block.shape[0], j : j + block.shape[1]] = block
        i, j = i + block.shape[0], j + block.shape[1]
    return dense


def entropy_by_hand(values: list[float]) -> float:
    total = sum(values)
    return math.exp(-sum(v / total * math.log(v / total) for v in values if v > 0))


# ---- singular values --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("r", "d_out", "d_in", "scaling"), [(3, 10, 7, 2.0), (5, 4, 9, -0.5), (1, 6, 6, 1.0), (4, 12, 20, 0.25)]
)
def test_lora_singular_values_equal_a_dense_svd(r, d_out, d_in, scaling):
    g = torch.Generator().manual_seed(r * 100 + d_out)
    A, B = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    dense = torch.linalg.svdvals(scaling * B.double() @ A.double())
    values = lora_singular_values(A, B, scaling)
    assert values.dtype == torch.float64 and values.shape == (min(r, d_out, d_in),)
    torch.testing.assert_close(values, dense[: values.numel()], rtol=1e-10, atol=1e-10)
    assert dense[values.numel() :].abs().sum() < 1e-10  # the rest of dW's spectrum is zero


@pytest.mark.parametrize(("n", "r", "o", "k"), [(4, 2, 3, 5), (2, 3, 6, 4), (1, 2, 5, 5), (3, 1, 2, 7)])
def test_melora_singular_values_equal_a_dense_svd_of_the_block_diagonal_update(n, r, o, k):
    g = torch.Generator().manual_seed(n * 1000 + r * 10 + o)
    A, B = torch.randn(n, r, k, generator=g), torch.randn(n, o, r, generator=g)
    scaling = 1.5
    dense = dense_block_diagonal([scaling * B[i].double() @ A[i].double() for i in range(n)])
    expected = torch.linalg.svdvals(dense)  # (min(n*o, n*k),)
    values = melora_singular_values(A, B, scaling)
    assert values.shape == (n * r,)
    assert torch.all(values[:-1] >= values[1:])  # descending
    torch.testing.assert_close(values, expected[: n * r], rtol=1e-10, atol=1e-10)
    assert expected[n * r :].abs().sum() < 1e-10


# ---- effective rank on spectra known by construction ------------------------------------------------------


def lora_with_spectrum(
    values: list[float], d_out: int, d_in: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors with B A = U diag(values) V^T: A = V^T (r, d_in), B = U diag(values) (d_out, r)."""
    g = torch.Generator().manual_seed(seed)
    r = len(values)
    U, V = orthonormal(d_out, r, g), orthonormal(d_in, r, g)
    return V.T, U * torch.tensor(values, dtype=torch.float64)


def test_four_equal_singular_values_have_effective_rank_four():
    A, B = lora_with_spectrum([1, 1, 1, 1, 0, 0], d_out=12, d_in=10, seed=0)
    values = lora_singular_values(A, B, scaling=3.0)
    torch.testing.assert_close(
        values, torch.tensor([3.0, 3, 3, 3, 0, 0], dtype=torch.float64), atol=1e-12, rtol=0
    )
    assert entropy_effective_rank(values) == pytest.approx(4.0, abs=1e-9)
    assert rank_above(values) == 4 and rank_above(values, 0.0) == 4


def test_effective_rank_of_one_and_a_half_is_the_entropy_computed_by_hand():
    A, B = lora_with_spectrum([1.0, 0.5], d_out=7, d_in=9, seed=1)
    values = lora_singular_values(A, B, scaling=1.0)
    p = [2 / 3, 1 / 3]
    by_hand = math.exp(-(p[0] * math.log(p[0]) + p[1] * math.log(p[1])))  # = 3 / 2^(2/3) = 1.8899...
    assert by_hand == pytest.approx(3 / 2 ** (2 / 3))
    assert entropy_effective_rank(values) == pytest.approx(by_hand, rel=1e-12)
    assert rank_above(values, 0.4) == 2 and rank_above(values, 0.6) == 1


def test_the_effective_rank_of_a_melora_update_is_that_of_the_union_of_its_blocks_spectra():
    g = torch.Generator().manual_seed(2)
    per_block = [[3.0, 1.0], [2.0, 0.0], [1.0, 1.0]]  # n = 3 blocks of rank r = 2
    o, k = 5, 4
    B = torch.stack(
        [orthonormal(o, 2, g) * torch.tensor(s, dtype=torch.float64) for s in per_block]
    )  # (3, 5, 2)
    A = torch.stack([orthonormal(k, 2, g).T for _ in per_block])  # (3, 2, 4)
    values = melora_singular_values(A, B, scaling=0.5)
    union = [3.0, 2.0, 1.0, 1.0, 1.0, 0.0]
    torch.testing.assert_close(values, 0.5 * torch.tensor(union, dtype=torch.float64), atol=1e-12, rtol=0)
    by_hand = math.exp(-(3 / 8 * math.log(3 / 8) + 2 / 8 * math.log(2 / 8) + 3 * (1 / 8) * math.log(1 / 8)))
    assert entropy_effective_rank(values) == pytest.approx(by_hand, rel=1e-12)
    assert rank_above(values, 0.5) == 2  # 1.5 and 1.0 of largest 1.5: only values above 0.75


def test_effective_rank_edge_cases():
    assert entropy_effective_rank(torch.zeros(5)) == 0.0
    assert entropy_effective_rank(torch.tensor([])) == 0.0
    assert entropy_effective_rank(torch.tensor([7.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert entropy_effective_rank(torch.full((6,), 0.3)) == pytest.approx(6.0)
    assert rank_above(torch.zeros(3)) == 0
    with pytest.raises(ValueError, match=r"rank_above: fraction=1.5; choose a value in \[0, 1\)"):
        rank_above(torch.ones(3), 1.5)


# ---- block diversity by construction ----------------------------------------------------------------------


def test_identical_blocks_overlap_fully_and_count_as_n_equal_blocks():
    g = torch.Generator().manual_seed(3)
    n, r, o, k = 4, 2, 6, 5
    A = torch.randn(r, k, generator=g).expand(n, r, k)
    B = torch.randn(o, r, generator=g).expand(n, o, r)
    assert mean_subspace_overlap(list(block_row_spans(A, B))) == pytest.approx(1.0)
    assert mean_subspace_overlap(list(block_column_spans(A, B))) == pytest.approx(1.0)
    shares = energy_shares(block_frobenius_norms(A, B, 2.0))
    torch.testing.assert_close(shares, torch.full((n,), 0.25, dtype=torch.float64))
    assert effective_block_count(shares) == pytest.approx(n)
    assert coefficient_of_variation(block_frobenius_norms(A, B, 2.0)) == pytest.approx(0.0, abs=1e-12)


def test_blocks_sharing_a_row_space_through_different_spanning_sets_overlap_fully():
    """A_i = M_i A_0 with M_i invertible: one row space, spanned by non-orthonormal rows that differ per block
    (an overlap computed without orthonormalising the bases is not 1 here); B_i random: column spaces differ."""
    g = torch.Generator().manual_seed(4)
    n, r, o, k = 3, 2, 7, 6
    A0 = torch.randn(r, k, generator=g, dtype=torch.float64)
    A = torch.stack(
        [(torch.randn(r, r, generator=g, dtype=torch.float64) + 2 * torch.eye(r)) @ A0 for _ in range(n)]
    )
    B = torch.randn(n, o, r, generator=g, dtype=torch.float64)
    assert mean_subspace_overlap(list(block_row_spans(A, B))) == pytest.approx(1.0, abs=1e-9)
    column = mean_subspace_overlap(list(block_column_spans(A, B)))
    cosines = [principal_angle_cosines(B[i], B[j]) for i in range(n) for j in range(i + 1, n)]
    assert column == pytest.approx(sum(float((c**2).mean()) for c in cosines) / len(cosines), rel=1e-9)
    assert column < 0.99


def test_blocks_on_orthogonal_coordinates_do_not_overlap():
    """A_i's rows are multiples of e_{2i}, e_{2i+1} of the block's input slice; B_i's columns of its output
    slice likewise: every pair of blocks has orthogonal row and column spaces."""
    n, r, o, k = 3, 2, 8, 7
    A, B = torch.zeros(n, r, k), torch.zeros(n, o, r)
    for i in range(n):
        for j in range(r):
            A[i, j, i * r + j] = 1.0 + i + j  # scaled unit rows, not orthonormal
            B[i, i * r + j, j] = 0.5 + j
    assert mean_subspace_overlap(list(block_row_spans(A, B))) == pytest.approx(0.0, abs=1e-12)
    assert mean_subspace_overlap(list(block_column_spans(A, B))) == pytest.approx(0.0, abs=1e-12)
    assert random_subspace_overlap([r] * n, k) == pytest.approx(r / k)


def test_a_single_non_zero_block_carries_all_the_energy():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(4, 2, 3, generator=g)
    B = torch.zeros(4, 5, 2)
    B[2] = torch.randn(5, 2, generator=g)
    norms = block_frobenius_norms(A, B, 1.0)
    shares = energy_shares(norms)
    torch.testing.assert_close(shares, torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    assert effective_block_count(shares) == pytest.approx(1.0)
    assert coefficient_of_variation(norms) == pytest.approx(math.sqrt(3))  # one x and three 0: std/mean
    assert math.isnan(mean_subspace_overlap(list(block_row_spans(A, B))))  # no pair of non-zero blocks


def test_energy_shares_of_blocks_with_chosen_norms():
    """Block i = c_i u_i v_i^T (unit u, v): ||s B_i A_i||_F = |s| c_i."""
    g = torch.Generator().manual_seed(6)
    c = [1.0, 2.0, 2.0]
    A = torch.stack([orthonormal(4, 1, g).T for _ in c])  # (3, 1, 4)
    B = torch.stack([orthonormal(3, 1, g) * ci for ci in c])  # (3, 3, 1)
    norms = block_frobenius_norms(A, B, -0.5)
    torch.testing.assert_close(norms, torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64))
    shares = energy_shares(norms)
    torch.testing.assert_close(shares, torch.tensor([1 / 9, 4 / 9, 4 / 9], dtype=torch.float64))
    assert effective_block_count(shares) == pytest.approx(entropy_by_hand([1 / 9, 4 / 9, 4 / 9]))
    mean = 2.5 / 3
    std = math.sqrt(((0.5 - mean) ** 2 + 2 * (1.0 - mean) ** 2) / 3)
    assert coefficient_of_variation(norms) == pytest.approx(std / mean)


def test_principal_angles_of_planes_at_a_known_angle():
    t = 0.7
    e = torch.eye(4, dtype=torch.float64)
    U = torch.stack([2 * e[0] + e[1], 3 * e[1]], dim=1)  # spans e0, e1 (not orthonormal)
    V = torch.stack([e[0], math.cos(t) * e[1] + math.sin(t) * e[2]], dim=1)
    torch.testing.assert_close(
        principal_angle_cosines(U, V), torch.tensor([1.0, math.cos(t)], dtype=torch.float64)
    )
    assert mean_subspace_overlap([U, V]) == pytest.approx((1 + math.cos(t) ** 2) / 2)
    assert mean_subspace_overlap([U, V, U]) == pytest.approx((2 * (1 + math.cos(t) ** 2) / 2 + 1) / 3)


def test_random_subspaces_overlap_as_the_stated_baseline():
    assert random_subspace_overlap([2, 2, 2], 8) == pytest.approx(0.25)
    assert random_subspace_overlap([1, 3], 8) == pytest.approx(3 / 8)
    assert math.isnan(random_subspace_overlap([2], 8))
    g = torch.Generator().manual_seed(7)
    spans = [torch.randn(6, 2, generator=g) for _ in range(40)]  # 780 pairs of random planes in R^6
    assert mean_subspace_overlap(spans) == pytest.approx(random_subspace_overlap([2] * 40, 6), abs=0.03)


def test_diagonal_energy_fraction_by_construction():
    g = torch.Generator().manual_seed(8)
    blocks_A = [torch.randn(1, 3, generator=g) for _ in range(2)]
    blocks_B = [torch.randn(4, 1, generator=g) for _ in range(2)]
    A_diag, B_diag = torch.block_diag(*blocks_A), torch.block_diag(*blocks_B)  # (2, 6), (8, 2)
    assert diagonal_energy_fraction(A_diag, B_diag, 2) == pytest.approx(1.0)
    A_off = torch.cat([torch.zeros(1, 3), torch.randn(1, 3, generator=g)], dim=1)  # only input slice 1
    B_off = torch.cat([torch.randn(4, 1, generator=g), torch.zeros(4, 1)])  # only output slice 0
    assert diagonal_energy_fraction(A_off, B_off, 2) == pytest.approx(0.0)
    # B A = [[3, 1], [6, 2]]: the diagonal holds 3^2 + 2^2 = 13 of 9 + 1 + 36 + 4 = 50
    assert diagonal_energy_fraction(
        torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0], [2.0]]), 2
    ) == pytest.approx(13 / 50)
    with pytest.raises(ValueError, match="n=3 does not divide d_out=8 and d_in=6"):
        diagonal_energy_fraction(A_diag, B_diag, 3)


def test_layer_index_reads_the_layer_number_of_a_module_name():
    assert layer_index("model.layers.3.self_attn.q_proj") == 3
    assert layer_index("bert.encoder.layer.11.attention.self.query") == 11
    assert layer_index("lin0") is None


# ---- adapter folders, end to end ---------------------------------------------------------------------------


def live_deltas(model: torch.nn.Module, layer_type: type) -> dict[str, torch.Tensor]:
    """{module name in the base model: the tuner's dense dW in float64}."""
    return {
        name.removeprefix(PREFIX): module.get_delta_weight("default").detach().double()
        for name, module in model.named_modules()
        if isinstance(module, layer_type)
    }


def assert_spectra_match(result: dict, deltas: dict[str, torch.Tensor]) -> None:
    assert [m["name"] for m in result["modules"]] == sorted(deltas)
    for module in result["modules"]:
        dense = torch.linalg.svdvals(deltas[module["name"]])
        values = torch.tensor(module["singular_values"], dtype=torch.float64)
        assert len(values) == module["nominal_rank"]
        torch.testing.assert_close(values, dense[: len(values)], rtol=1e-5, atol=1e-5)
        assert dense[len(values) :].abs().sum() < 1e-5
        assert module["frobenius_norm"] == pytest.approx(float(deltas[module["name"]].norm()), rel=1e-5)
        assert module["spectral_norm"] == pytest.approx(float(dense[0]), rel=1e-5)
        assert module["entropy_effective_rank"] == pytest.approx(entropy_by_hand(dense.tolist()), rel=1e-4)


@pytest.fixture(scope="module")
def melora_run(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A run folder holding adapter/: MELoRA on a tiny MLP (lin0 32 -> 48 n=4, lin1 48 -> 48 n=2 alpha 3)."""
    torch.manual_seed(0)
    config = MELoRAConfig(
        r=2,
        n=4,
        alpha=8,
        target_modules=["lin0", "lin1"],
        n_pattern={"lin1": 2},
        alpha_pattern={"lin1": 3},
        init_weights=False,
    )
    model = get_peft_model(TinyMLP(), config)
    run = tmp_path_factory.mktemp("melora") / "run"
    save_adapter(model, run / "adapter")
    (run / "results.json").write_text("{}")
    return run, model


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(1)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["lin0", "lin1"],
        rank_pattern={"lin1": 2},
        alpha_pattern={"lin1": 5},
        init_lora_weights=False,
    )
    model = get_peft_model(TinyMLP(), config)
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    save_adapter(model, folder)
    return folder, model


def test_a_melora_adapters_spectra_equal_those_of_the_live_models_updates(melora_run):
    run, model = melora_run
    result = analyze_adapter(run / "adapter")
    assert result["method"] == "melora" and (result["r"], result["n"]) == (2, 4)
    assert_spectra_match(result, live_deltas(model, MELoRALayer))
    lin0, lin1 = result["modules"]
    assert (lin0["n"], lin0["scaling"], lin1["n"], lin1["scaling"]) == (4, 8 / 2, 2, 3 / 2)
    # energy shares of the diagonal blocks, sliced out of the dense update
    dense = live_deltas(model, MELoRALayer)["lin0"]  # (48, 32), blocks of 12 x 8
    energies = torch.stack(
        [dense[12 * i : 12 * (i + 1), 8 * i : 8 * (i + 1)].square().sum() for i in range(4)]
    )
    torch.testing.assert_close(torch.tensor(lin0["block_energy_shares"]), (energies / energies.sum()).float())
    assert lin0["effective_block_count"] == pytest.approx(entropy_by_hand(energies.tolist()), rel=1e-5)
    assert (lin0["random_overlap_row"], lin0["random_overlap_col"]) == (
        pytest.approx(2 / 8),
        pytest.approx(2 / 12),
    )
    # a run folder resolves to its adapter/, and the result names the path as given
    from_run = analyze_adapter(str(run))
    assert from_run["adapter"] == str(run) and from_run["modules"] == result["modules"]
    table = analysis_table(result)
    assert table.count("\n| lin") == 2 and "| **mean** |" in table and "row overlap" in table


def test_identical_a_blocks_show_in_the_row_overlap_not_the_column_overlap(tmp_path):
    """Block diversity through the whole reader: every A_i set to A_0 (one row space, equal A norms), B random."""
    torch.manual_seed(2)
    model = get_peft_model(TinyMLP(), MELoRAConfig(r=2, n=4, target_modules=["lin0"], init_weights=False))
    layer = model.base_model.model.lin0
    with torch.no_grad():
        layer.melora_A["default"].copy_(layer.melora_A["default"][:1].expand(4, -1, -1))
    save_adapter(model, tmp_path / "a")
    (module,) = analyze_adapter(tmp_path / "a")["modules"]
    assert module["row_space_overlap"] == pytest.approx(1.0)
    assert module["column_space_overlap"] < 0.9
    with torch.no_grad():  # and all B_i equal too: n identical blocks
        layer.melora_B["default"].copy_(layer.melora_B["default"][:1].expand(4, -1, -1))
    save_adapter(model, tmp_path / "a")
    (module,) = analyze_adapter(tmp_path / "a")["modules"]
    assert module["column_space_overlap"] == pytest.approx(1.0)
    assert module["effective_block_count"] == pytest.approx(4.0)
    assert module["block_norm_cv"] == pytest.approx(0.0, abs=1e-6)


def test_a_lora_adapters_spectra_and_scaling_follow_its_patterns(lora_adapter):
    folder, model = lora_adapter
    result = analyze_adapter(folder, blocks_for_lora=4)
    assert result["method"] == "lora" and result["n"] == 4
    deltas = live_deltas(model, LoraLayer)
    assert_spectra_match(result, deltas)
    lin0, lin1 = result["modules"]
    assert (lin0["nominal_rank"], lin0["scaling"], lin1["nominal_rank"], lin1["scaling"]) == (4, 2.0, 2, 2.5)
    dense = deltas["lin1"]  # (48, 48), 4 diagonal blocks of 12 x 12
    diagonal = sum(
        float(dense[12 * i : 12 * (i + 1), 12 * i : 12 * (i + 1)].square().sum()) for i in range(4)
    )
    assert lin1["diagonal_energy_fraction"] == pytest.approx(diagonal / float(dense.square().sum()), rel=1e-5)
    assert "diagonal_energy_fraction" not in analyze_adapter(folder)["modules"][0]


def test_rslora_scales_by_alpha_over_the_square_root_of_r(tmp_path):
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["lin1"], use_rslora=True, init_lora_weights=False)
    model = get_peft_model(TinyMLP(), config)
    save_adapter(model, tmp_path / "a")
    result = analyze_adapter(tmp_path / "a")
    assert result["use_rslora"] is True and result["modules"][0]["scaling"] == pytest.approx(6 / 2)
    assert_spectra_match(result, live_deltas(model, LoraLayer))


def test_an_untrained_adapter_analyses_to_zeros_and_undefined_diversity(tmp_path):
    """B = 0 at initialisation: no spectrum, no energy to share, no pair of blocks to compare (None in JSON)."""
    save_adapter(get_peft_model(TinyMLP(), MELoRAConfig(r=2, n=4, target_modules=["lin0"])), tmp_path / "a")
    (module,) = analyze_adapter(tmp_path / "a")["modules"]
    assert module["singular_values"] == [0.0] * 8 and module["spectral_norm"] == 0.0
    assert (
        module["entropy_effective_rank"],
        module["rank_above_fraction"],
        module["effective_block_count"],
    ) == (0, 0, 0)
    assert module["row_space_overlap"] is None and module["random_overlap_col"] is None


def write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS))
    return folder


def test_a_hand_written_lora_adapter_gives_its_known_spectra_per_layer(tmp_path):
    """layers.0.q: s = 2 * [1, 1] (erank 2); layers.1.q: s = 2 * [1, 0.5] (erank 3 / 2^(2/3)); scaling 4 / 2."""
    tensors = {}
    for layer, values in ((0, [1.0, 1.0]), (1, [1.0, 0.5])):
        A, B = lora_with_spectrum(values, d_out=6, d_in=8, seed=layer)
        tensors[f"{PREFIX}layers.{layer}.q.lora_A.weight"] = A.float()
        tensors[f"{PREFIX}layers.{layer}.q.lora_B.weight"] = B.float()
    folder = write_adapter(tmp_path / "a", {"peft_type": "LORA", "r": 2, "lora_alpha": 4}, tensors)
    result = analyze_adapter(folder, fraction=0.3)
    q0, q1 = result["modules"]
    assert q0["singular_values"] == pytest.approx([2.0, 2.0]) and q1["singular_values"] == pytest.approx(
        [2.0, 1.0]
    )
    assert q0["entropy_effective_rank"] == pytest.approx(2.0)
    assert q1["entropy_effective_rank"] == pytest.approx(3 / 2 ** (2 / 3))
    assert [layer["layer"] for layer in result["layers"]] == [0, 1]
    assert result["layers"][1]["mean_entropy_effective_rank"] == pytest.approx(3 / 2 ** (2 / 3))
    assert result["summary"]["total_squared_frobenius_norm"] == pytest.approx(8.0 + 5.0)
    assert result["summary"]["mean_rank_above_fraction"] == 2


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (
            lambda f: (f / ADAPTER_CONFIG).unlink(),
            r"holds no adapter_config.json, nor does .*adapter; pass a saved",
        ),
        (
            lambda f: (f / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "IA3"})),
            r"has peft_type 'IA3'; analyze reads MELoRA \('MELORA'\) and LoRA \('LORA'\) adapters",
        ),
        (
            lambda f: (f / ADAPTER_WEIGHTS).rename(f / "adapter_model.bin"),
            r"adapter_model.safetensors does not exist. Only safetensors are read",
        ),
    ],
    ids=["no-config", "other-method", "pickle-weights"],
)
def test_bad_adapter_folders_are_user_errors_naming_the_path(lora_adapter, tmp_path, break_it, message):
    folder = Path(shutil.copytree(lora_adapter[0], tmp_path / "broken"))
    break_it(folder)
    with pytest.raises(UserError, match=message) as caught:
        analyze_adapter(folder)
    assert str(folder) in str(caught.value) and "\n" not in str(caught.value)


def test_bad_options_are_user_errors(lora_adapter):
    with pytest.raises(UserError, match=r"fraction=1.0; choose a value in \[0, 1\)"):
        analyze_adapter(lora_adapter[0], fraction=1.0)
    with pytest.raises(UserError, match=r"--blocks 5 does not divide lin0 \(48 x 32\)"):
        analyze_adapter(lora_adapter[0], blocks_for_lora=5)


# ---- the command -------------------------------------------------------------------------------------------


def test_the_command_writes_json_equal_to_the_function_a_table_and_figures(
    melora_run, lora_adapter, tmp_path
):
    run, lora = str(melora_run[0]), str(lora_adapter[0])
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "melora.cli", "analyze", run, lora, "--out", str(out), "--blocks", "4"],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads((out / "analysis.json").read_text())["adapters"]
    expected = [analyze_adapter(run, blocks_for_lora=4), analyze_adapter(lora, blocks_for_lora=4)]
    assert _close(written, expected)
    tables = (out / "analysis.md").read_text()
    assert tables == analysis_table(expected[0]) + "\n" + analysis_table(expected[1])
    assert tables in done.stdout
    assert (out / "figures" / "spectra.png").stat().st_size > 0
    assert (out / "figures" / "effective_rank.png").stat().st_size > 0


def _close(got, expected) -> bool:
    """Equal JSON trees, floats to 1e-9 relative."""
    if isinstance(expected, dict):
        return (
            isinstance(got, dict)
            and got.keys() == expected.keys()
            and all(_close(got[k], v) for k, v in expected.items())
        )
    if isinstance(expected, list):
        return isinstance(got, list) and len(got) == len(expected) and all(map(_close, got, expected))
    if isinstance(expected, float):
        return got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    return got == expected


def test_the_command_without_matplotlib_writes_everything_but_figures(
    lora_adapter, tmp_path, monkeypatch, capsys
):
    from melora.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["analyze", str(lora_adapter[0]), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "no figures: plots need matplotlib (pip install 'melora[lab]')" in err
    assert (tmp_path / "out" / "analysis.json").is_file() and not (tmp_path / "out" / "figures").exists()


def test_the_command_refuses_a_folder_without_an_adapter_in_one_line(tmp_path, capsys):
    from melora.cli import main

    assert main(["analyze", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(
        f"melora analyze: error: melora.analysis: {tmp_path} holds no adapter_config.json"
    )
    assert len(err) == 2 and "--debug" in err[1]
