"""Canaries for every change fedshop makes to Flower (server/flower_patches.py, client/flower_patches.py).

Each canary checks that *Flower's own* behaviour is still the one the patch works around: the day upstream
fixes it, the canary fails and the patch can go. Around them: the patches refuse another flwr release, nothing
is patched on import, and server/ never imports client/.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord
from flwr.common.secure_aggregation.secaggplus_constants import Stage
from flwr.server.workflow import SecAggPlusWorkflow as FlowerWorkflow
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg

from client import flower_patches as client_patches
from common.protocol import wire
from common.run.config import compose
from server import flower_patches as server_patches
from server.privacy import make_private
from server.strategy import build_strategy
from tests.conftest import ROOT
from tests.test_secagg import config, one_round
from tests.test_strategy import aggregator, reply, sent

SHAPES = [(300, 40), (7,)]


@pytest.mark.parametrize("flower_clip", [server_patches.FLOWER_CLIP, server_patches.FLOWER_ADAPTIVE_CLIP,
                                         client_patches.FLOWER_CLIP])
def test_canary_flowers_clipping_still_divides_by_a_zero_norm(flower_clip):
    """zero_safe_clipping: Flower's FlatClip divides by the update's norm (a zero update fails the round)."""
    with np.errstate(all="raise"), pytest.raises((ZeroDivisionError, FloatingPointError)):
        flower_clip([np.zeros(3, np.float32)], 1.0)
    from common.protocol.privacy_math import clip_inputs_inplace

    update = [np.zeros(3, np.float32)]
    clip_inputs_inplace(update, 1.0)  # fedshop's leaves it as it is
    assert not update[0].any()


@pytest.mark.parametrize("flower_masks", [server_patches.FLOWER_WORKFLOW_MASKS, client_patches.FLOWER_MOD_MASKS])
def test_canary_flowers_masks_still_depend_on_a_32_bit_fold_of_the_secret(flower_masks):
    """whole_secret_masks: two 256-bit secrets with the same XOR fold give Flower the same mask."""
    a = hashlib.sha256(b"a").digest()
    b = a[4:8] + a[:4] + a[8:]
    assert all(np.array_equal(x, y) for x, y in zip(flower_masks(a, 1 << 32, SHAPES), flower_masks(b, 1 << 32, SHAPES),
                                                    strict=True))


def test_canary_flowers_secagg_workflow_still_loses_a_round_to_an_early_dropout():
    """SecAggPlusWorkflow: with Flower's own workflow, a merchant lost at setup loses the whole round: the unmask
    stage asks the survivors for its shares, which they never received (a KeyError on the merchants)."""
    flowers, result, *_ = one_round(config(), die={101: Stage.SETUP}, workflow=FlowerWorkflow)
    assert flowers is None and result.report.too_few_replies
    reasons = {d.reason for d in result.report.dropped if d.node != 101}
    assert reasons and all("stage 'unmask'" in r and "KeyError: 101" in r for r in reasons), reasons
    ours, *_ = one_round(config(), die={101: Stage.SETUP})
    assert ours is not None


def _adaptive_round(strategy: DifferentialPrivacyServerSideAdaptiveClipping) -> tuple[float, float, float]:
    """One round of updates far inside C; (noise std, C before, C after)."""
    theta = {"w": np.zeros((400, 250), np.float32)}
    step = {"w": np.full((400, 250), 1e-5, np.float32)}
    strategy.current_arrays = wire.to_arrays(theta)
    before = strategy.clipping_norm
    np.random.seed(7)
    replies = [reply(n, step, {wire.NUM_EXAMPLES: 1}) for n in (1, 2, 3)]
    result = aggregator(strategy, wire.spec(theta), private=True).aggregate_train(sent([1, 2, 3], theta), replies)
    assert result.arrays is not None
    return float((result.arrays["w"].numpy() - step["w"]).std()), before, strategy.clipping_norm


def test_canary_flowers_adaptive_clipping_still_noises_with_the_next_rounds_norm():
    """AdaptiveNoiseFix: Flower noises the mean with the clipping norm it has just updated, not the one the
    updates were clipped to."""
    z, c0, lr, count_std = 1.0, 0.5, 3.0, 1.0
    flowers = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), z, 3, initial_clipping_norm=c0, clip_norm_lr=lr,
                                                            clipped_count_stddev=count_std)
    std, before, after = _adaptive_round(flowers)
    assert abs(after / before - 1) > 0.1  # the (noisy) clipped fraction moved C
    assert std == pytest.approx(flowers.noise_multiplier * after / 3, rel=0.02)
    cfg = compose(["task=relevance",
                   "privacy=central_adaptive", f"privacy.clipping_norm={c0}", f"privacy.noise_multiplier={z}",
                   f"privacy.clip_norm_lr={lr}", f"privacy.clipped_count_stddev={count_std}",
                   "simulation.num_merchants=3"])
    ours = make_private(build_strategy(cfg.strategy), cfg.privacy, cfg.strategy, 3)
    std, before, after = _adaptive_round(ours)  # type: ignore[arg-type]
    assert abs(after / before - 1) > 0.1
    assert std == pytest.approx(ours.noise_multiplier * before / 3, rel=0.02)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("name", "keys"), [("fedadam", {"m_t", "v_t"}), ("fedyogi", {"m_t", "v_t"}),
                                           ("fedadagrad", {"m_t", "v_t"}), ("fedavgm", {"momentum_vector"})])
def test_canary_server_optimisers_still_keep_their_state_where_it_is_saved(name, keys):
    """server_opt_state: FedOpt's moments are its m_t / v_t attributes, FedAvgM's momentum its momentum_vector;
    restored, a resumed round is identical."""
    theta = {"w": np.ones((4, 3), np.float32)}
    updates = [{"w": theta["w"] + i * 0.1} for i in (1, 2)]

    def round_of(strategy: FedAvg) -> ArrayRecord:
        current = {k: v.copy() for k, v in theta.items()}
        strategy.current_arrays = wire.to_arrays(current) if name == "fedavgm" else current  # type: ignore[attr-defined]
        result = aggregator(strategy, wire.spec(theta), private=False).aggregate_train(
            sent([1, 2], theta), [reply(i + 1, u, {wire.NUM_EXAMPLES: 5}) for i, u in enumerate(updates)])
        assert result.arrays is not None
        return result.arrays

    overrides = [f"strategy={name}", *(["strategy.server_momentum=0.9"] if name == "fedavgm" else [])]
    first = build_strategy(compose(overrides).strategy)
    round_of(first)
    state = server_patches.server_opt_state(first)
    assert set(state) == keys and all(len(v) == 1 for v in state.values())
    resumed = build_strategy(compose(overrides).strategy)
    server_patches.load_server_opt_state(resumed, state)
    np.testing.assert_array_equal(round_of(resumed)["w"].numpy(), round_of(first)["w"].numpy())


def test_canary_supernode_still_sleeps_three_seconds_between_empty_pulls():
    """fast_node_polling: Flower's SuperNode loop sleeps a hard-coded 3 s when no message was pulled."""
    from flwr.supernode import start_client_internal

    assert "time.sleep(3)" in inspect.getsource(start_client_internal)
    assert start_client_internal.time is __import__("time")  # unpatched in this process


def test_canary_object_pulls_still_back_off_one_second_first():
    """fast_object_pulls: Flower retries a missing object after 1 s, doubling up to 10 s."""
    for defaults in client_patches.FLOWER_PULL_DEFAULTS:
        assert (defaults["initial_backoff"], defaults["backoff_cap"]) == (1, 10)


def test_canary_superexec_still_builds_its_executor_with_get_executor():
    """forkserver_executor: Flower's SuperExec loop calls the module-level get_executor."""
    from flwr.supercore.superexec import run_superexec

    assert "get_executor(" in inspect.getsource(run_superexec.run_superexec)


def test_canary_the_simulation_engine_still_keeps_node_partitions_to_itself(monkeypatch):
    """record_simulated_nodes: Flower's engine maps node ids to partitions in vce_api._register_nodes, called
    through the module (so the wrapper sees it), and nothing in the ServerApp's Grid API carries a partition."""
    import flwr.server.superlink.fleet.vce.vce_api as vce
    from flwr.serverapp import Grid

    assert "_register_nodes(" in inspect.getsource(vce.start_vce)
    assert not [m for m in dir(Grid) if "partition" in m.lower()]
    monkeypatch.setattr(vce, "_register_nodes", server_patches.FLOWER_REGISTER_NODES)
    nodes = server_patches.record_simulated_nodes()
    state = vce.LinkStateFactory(vce.FLWR_IN_MEMORY_DB_NAME, vce.NoOpFederationManager(), vce.ObjectStoreFactory())
    mapping = vce._register_nodes(num_nodes=4, state_factory=state)
    assert nodes == mapping and sorted(mapping.values()) == [0, 1, 2, 3]


@pytest.mark.parametrize("apply", [server_patches.apply, client_patches.apply_clientapp, client_patches.apply_task,
                                   lambda: client_patches.apply_supernode(0.2),
                                   lambda: client_patches.use_executor(object()),
                                   server_patches.record_simulated_nodes])
def test_patches_refuse_another_flower_release(apply, monkeypatch):
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.40.0")
    with pytest.raises(RuntimeError, match=r"written for flwr 1\.39\.x, but flwr 1\.40\.0 is installed"):
        apply()


def test_importing_the_apps_patches_nothing_and_the_server_imports_no_client_code():
    """Patches are applied by entry points only; importing the server's modules pulls in neither client/ nor
    transformers (the round loop's model is built by common/, imported lazily by federation)."""
    code = """
import sys
import flwr.supercore.differential_privacy as dp
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
import server.strategy, server.privacy, server.secagg, server.grid, server.report
assert not [m for m in sys.modules if m == 'client' or m.startswith('client.')], 'server imported client/'
assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'server.strategy imported the ML stack'
import server.federation, server.server_app, client.client_app, client.secure
import flwr.server.workflow.secure_aggregation.secaggplus_workflow as wf
mod = sys.modules['flwr.client.mod.secure_aggregation.secaggplus_mod']
assert dp.clip_inputs_inplace.__module__ == 'flwr.supercore.differential_privacy', 'patched on import'
assert wf.pseudo_rand_gen is pseudo_rand_gen and mod.pseudo_rand_gen is pseudo_rand_gen, 'patched on import'
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def _imports(path: Path) -> set[str]:
    """Every module a file imports, dotted in full (`from a.b import c` gives a.b and a.b.c), lazy ones too."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def _hits(path: Path, forbidden: set[str]) -> set[str]:
    return {n for n in _imports(path) for f in forbidden if n == f or n.startswith(f + ".")}


APPS = {"client", "server", "simulation", "serving", "bench", "tests"}


@pytest.mark.parametrize("package,forbidden", [
    ("server", {"client", "simulation", "serving"}),
    ("client", {"server", "simulation", "serving"}),
    # common's floors: run below tasks below protocol; the ML (tasks) has no Flower
    ("common/run", APPS | {"common.tasks", "common.protocol", "flwr"}),
    ("common/tasks", APPS | {"common.protocol", "flwr"}),
    ("common/protocol", APPS),
    ("serving", {"client", "server", "simulation", "common.protocol", "flwr"})])
def test_import_graph(package, forbidden):
    """No floor imports a higher one; server/ and client/ never import each other (every import, lazy ones too)."""
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    for path in files:
        assert not _hits(path, forbidden), f"{path.relative_to(ROOT)} imports {_hits(path, forbidden)}"


def test_import_graph_sees_a_forbidden_import(tmp_path):
    """The check itself: a lazy import of a higher floor inside a function is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from common.protocol import wire\n    import flwr.app\n")
    assert _hits(bad, {"common.protocol", "flwr"}) == {"common.protocol", "common.protocol.wire", "flwr.app"}


def test_canary_the_fork_server_warm_up_builds_what_peft_asks_transformers_for():
    """client/executor/warm.py: transformers keeps its conversion table in a module global that is built on first
    use, and peft's LoRA injection asks for it: the fork server builds it once, every task inherits it."""
    import transformers.conversion_mapping as cm
    from peft.tuners import tuners_utils

    import client.executor.warm  # noqa: F401

    assert cm._checkpoint_conversion_mapping_cache is not None
    assert "get_model_conversion_mapping" in inspect.getsource(tuners_utils)


def test_the_fab_holds_what_the_apps_import_and_not_the_rest():
    """pyproject's fab-include: the apps' packages and conf/ are in the FAB every task unpacks; benchmarks, tests,
    serving and the README stay out."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {"client", "common", "server", "conf", "simulation", "pyproject.toml"} <= tops, tops
    assert "conf/config.yaml" in names and "common/__init__.py" in names
    assert not tops & {"bench", "tests", "serving", "README.md", ".ci"}, tops
