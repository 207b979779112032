"""Head choice at export: the cheapest candidate within tolerance, by measured time or FLOPs."""

import pytest
import torch

from export.onnx_export import export_onnx
from export.selection import choose_heads
from export.timing import relative_time, time_graphs
from modelpack.manifest import HeadCandidate


def cand(cluster: int, arch: str, accuracy: float, cost: float) -> HeadCandidate:
    return HeadCandidate(cluster=cluster, arch=arch, accuracy=accuracy, flops=1, cost=cost)


def chosen(cands: list[HeadCandidate]) -> dict[int, str]:
    out: dict[int, str] = {}
    for c in cands:
        if c.chosen:
            assert c.cluster not in out, "one head per cluster"
            out[c.cluster] = c.arch
    return out


def test_cheapest_within_tolerance_per_cluster():
    cands = [cand(0, "wide", 0.90, 3.0), cand(0, "thin", 0.895, 1.0), cand(0, "short", 0.85, 0.5),
             cand(1, "wide", 0.80, 3.0), cand(1, "thin", 0.70, 1.0)]
    assert chosen(choose_heads(cands, tolerance=0.01)) == {0: "thin", 1: "wide"}
    assert chosen(choose_heads(cands, tolerance=0.06)) == {0: "short", 1: "wide"}
    assert chosen(choose_heads(cands, tolerance=0.0)) == {0: "wide", 1: "wide"}


def test_equal_cost_prefers_the_more_accurate():
    cands = [cand(0, "a", 0.80, 1.0), cand(0, "b", 0.81, 1.0)]
    assert chosen(choose_heads(cands, tolerance=0.05)) == {0: "b"}


def test_time_and_flops_can_disagree():
    """A thin head with fewer FLOPs can take longer than a shallow one: the cost decides."""
    thin = dict(cluster=0, arch="thin", accuracy=0.8, flops=100)
    short = dict(cluster=0, arch="short", accuracy=0.8, flops=120)
    by_time = [HeadCandidate(**thin, cost=relative_time({1: 0.5, 32: 6.0}, {1: 2.0, 32: 40.0})),
               HeadCandidate(**short, cost=relative_time({1: 0.4, 32: 5.0}, {1: 2.0, 32: 40.0}))]
    by_flops = [HeadCandidate(**thin, cost=100.0), HeadCandidate(**short, cost=120.0)]
    assert chosen(choose_heads(by_time, 0.01)) == {0: "short"}
    assert chosen(choose_heads(by_flops, 0.01)) == {0: "thin"}


def test_relative_time_weighs_each_batch_size_alike():
    assert relative_time({1: 1.0, 32: 10.0}, {1: 2.0, 32: 40.0}) == pytest.approx(0.75)


def test_time_graphs_measures_every_graph_at_every_batch_size(tmp_path):
    torch.manual_seed(0)
    paths = {}
    for name, width in (("small", 4), ("big", 32)):
        net = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.ReLU(),
                                  torch.nn.Flatten(), torch.nn.LazyLinear(2))
        net(torch.zeros(1, 3, 8, 8))
        paths[name] = export_onnx(net, tmp_path / f"{name}.onnx", input_shape=(3, 8, 8)).path
    latency, info = time_graphs(paths, {n: (3, 8, 8) for n in paths}, batch_sizes=(1, 4),
                                rounds=3, warmup=1, threads=1)
    assert set(latency) == {"small", "big"}
    assert all(set(v) == {1, 4} and min(v.values()) > 0 for v in latency.values())
    assert info.batch_sizes == [1, 4] and info.repetitions == 3 and info.threads == 1
    assert info.runtime.startswith("onnxruntime")
    with pytest.raises(ValueError, match="rounds"):
        time_graphs(paths, {n: (3, 8, 8) for n in paths}, rounds=0)
