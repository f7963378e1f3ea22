"""benchmarks/parity.py: its header names the federated recipe of the config it ran, and the paired bootstrap."""

import numpy as np

import benchmark_module
from dsl_fed.config import load_config

bench = benchmark_module.load("parity")


def test_the_header_recipe_comes_from_the_config():
    fed = load_config(bench.CONFIG, ["data.manifest=x.csv"]).federated
    assert bench.schedule(fed) == (f"federated {fed.phase1_rounds} + {fed.phase2_rounds} rounds, fedadam (eta "
                                   f"{fed.server_learning_rate:g}, beta_2 0.999, tau 1e-07), one gradient step per "
                                   f"sampled client, fraction_train {fed.fraction_train:g}")
    fedavg = load_config(bench.CONFIG, ["data.manifest=x.csv", "federated.local_update=train",
                                        "federated.strategy=fedavg", "federated.local_epochs=2"]).federated
    assert "fedavg, 2 local epochs per sampled client" in bench.schedule(fedavg)


def test_the_paired_bootstrap_sees_a_real_gap_and_no_gap_between_equal_modes():
    rng = np.random.default_rng(0)
    speakers = np.repeat(np.arange(8), 10)
    labels = np.tile(np.arange(2), 40)
    right = labels.copy()
    wrong = np.where(rng.random(80) < 0.3, 1 - labels, labels)  # 30 % of clips flipped
    runs = {"a": [(labels, right, speakers)], "b": [(labels, wrong, speakers)], "c": [(labels, right, speakers)]}
    boot = bench.pooled_bootstrap(runs, n=300)
    gap = np.quantile(boot["b"] - boot["a"], [0.025, 0.975])
    assert gap[1] < 0  # b is worse in every plausible resample
    assert np.all(boot["c"] == boot["a"])  # the same clips in every draw: equal modes never differ
