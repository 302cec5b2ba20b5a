"""MoE continual learning (theory setting): exact expert updates, metrics, reproducibility, bad input,
and the claim in miniature over 20 seeds at once."""

import numpy as np
import pytest
import torch

from forgetcore.continual.moe import forgetting_generalisation, simulate

KW = {"d": 50, "s": 10, "n_tasks": 3, "rounds": 1000, "lr": 0.05, "noise": 0.1, "beta": 5.0, "alpha": 0.1}


def test_expert_update_is_the_exact_min_norm_fit():
    r = simulate(n_experts=1, seeds=[0], d=20, s=5, n_tasks=1, rounds=2, lr=0.1)
    # One task, one expert, starting from 0: after round 0 the expert is the min-norm solution of
    # X^T w = y, whose error to the truth is ||(I - P_X) w*||^2 < ||w*||^2; round 1 only lowers it.
    assert r["err_now"][0, 1] <= r["err_now"][0, 0] + 1e-12
    assert r["expert"].max() == 0 and r["task"].max() == 0


def test_metrics_by_hand():
    now = np.array([[1.0, 2.0, 3.0]])
    end = np.array([[2.0, 2.5, 3.0]])
    F, G = forgetting_generalisation(now, end)
    assert np.allclose(F, [(1.0 + 0.5) / 2]) and np.allclose(G, [7.5 / 3])
    with pytest.raises(ValueError, match="^err_now"):
        forgetting_generalisation(now[:, :1], end[:, :1])
    with pytest.raises(ValueError, match="^err_now: expected finite"):
        forgetting_generalisation(now * np.nan, end)


def test_seeds_are_independent_of_the_batch():
    a = simulate(n_experts=3, seeds=[4, 7], **{**KW, "rounds": 50})
    b = simulate(n_experts=3, seeds=[7], **{**KW, "rounds": 50})
    assert np.array_equal(a["expert"][1], b["expert"][0])
    assert np.allclose(a["forgetting"][1], b["forgetting"][0])


def test_bad_input():
    with pytest.raises(ValueError, match="^n_experts"):
        simulate(n_experts=0, seeds=[0])
    with pytest.raises(ValueError, match="^seeds"):
        simulate(n_experts=2, seeds=[])
    with pytest.raises(ValueError, match="^s: expected fewer"):
        simulate(n_experts=2, seeds=[0], d=5, s=5)
    with pytest.raises(ValueError, match="^rounds"):
        simulate(n_experts=2, seeds=[0], rounds=1)
    with pytest.raises(ValueError, match="^lr"):
        simulate(n_experts=2, seeds=[0], lr=0.0)
    with pytest.raises(ValueError, match="^n_tasks"):
        simulate(n_experts=2, seeds=[0], d=4, s=2, n_tasks=5)


# --- the claim in miniature ----------------------------------------------------------------------
#
# The spec's setting: d = 50, s = 10, N = 3 recurring tasks, T = 1000 rounds,
# router lr 0.05 (so T1 = ceil(M / lr) = 60 for M = 3), exploration noise U[0, 0.1], signal strength
# beta = 5 against N(0, 0.1^2) noise columns, load-balancing alpha = 0.1. Settings were tried on seeds
# 0-4 (with beta = 1 the signal drowns in the summed noise columns and no router learns; with
# alpha = 0.5 the same picture, weaker); the test runs seeds 20-39, fixed before they were run.
# Measured on seeds 20-39 (CPU time about 5 s for all three arms):
#   arm                  F_T              G_T              routing purity, rounds 1-200 / last 200
#   single expert        0.264 +- 0.148   1.308 +- 0.272   1.000 / 1.000
#   MoE M=3, terminated  0.116 +- 0.087   0.694 +- 0.266   0.689 / 0.858
#   MoE M=3, router on   0.182 +- 0.084   1.278 +- 0.213   0.337 / 0.343
#   MoE below single: F_T in 14 of 20 seeds, G_T in 19 of 20.
# Holds: with termination, F_T and G_T fall to about half of one expert's, and the experts specialise
# (purity rises towards 1). Without termination the router, still pushed by load balancing, never
# settles here: routing stays at chance (1/M) from the start rather than degrading late as the paper
# describes, and G_T stays at the single expert's level. The termination rule is a fixed horizon
# T1 = ceil(M / lr) (ours: the paper's gap-based rule was not extracted).

SEEDS = range(20, 40)


def run_claim(seeds=SEEDS):
    out = {}
    for name, m, term in (("single", 1, True), ("moe-terminated", 3, True), ("moe-not-terminated", 3, False)):
        r = simulate(n_experts=m, seeds=seeds, terminate=term, **KW)
        p = r["routing_purity"]
        out[name] = {"F": r["forgetting"], "G": r["generalisation"], "purity_late": p[:, -200:].mean(1),
                     "purity_early": p[:, :200].mean(1)}
    return out


def test_claim_terminated_moe_forgets_and_errs_less_than_one_expert():
    torch.set_num_threads(1)
    r = run_claim()
    one, moe, free = r["single"], r["moe-terminated"], r["moe-not-terminated"]
    assert moe["G"].mean() < 0.75 * one["G"].mean(), (moe["G"].mean(), one["G"].mean())
    assert moe["F"].mean() < 0.7 * one["F"].mean(), (moe["F"].mean(), one["F"].mean())
    assert free["purity_late"].mean() < moe["purity_late"].mean() - 0.3  # without termination routing is lost
    assert free["G"].mean() > moe["G"].mean()


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    r = run_claim(eval(sys.argv[1]) if len(sys.argv) > 1 else SEEDS)
    for name, v in r.items():
        print(f"{name:20s} F {v['F'].mean():.4f} +- {v['F'].std():.4f}  G {v['G'].mean():.4f} +- "
              f"{v['G'].std():.4f}  purity first 200 {v['purity_early'].mean():.3f}  "
              f"last 200 {v['purity_late'].mean():.3f}")
    print("moe F < single F in", (r["moe-terminated"]["F"] < r["single"]["F"]).sum(), "seeds;",
          "G in", (r["moe-terminated"]["G"] < r["single"]["G"]).sum())
