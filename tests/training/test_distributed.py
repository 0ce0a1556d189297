"""The collective primitives of ``nnunet_ext.training.distributed`` with 2 ``gloo`` ranks on the CPU.

nnU-Net's DDP launcher needs CUDA, so the primitives are tested directly: one spawn of 2 processes (file init)
runs every scenario once and saves what each rank saw; the tests compare both ranks with each other and with one
process computing on the concatenated data (values and gradients). The identity behaviour without a process
group is tested in the pytest process itself.
"""
from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist
from helpers_distributed import run_ranks
from torch import nn

from nnunet_ext.training import distributed as D
from nnunet_ext.training.ema import ema_update

WORLD = 2
SPAWN_TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is unavailable in this torch build")


# ---------------------------------------------------------------------------------------------- data per rank
# Deterministic per-rank inputs, re-created by the reference computations in the pytest process.
CONCAT_ROWS = (3, 5)          # uneven first dimensions
EMPTY_ROWS = (0, 2)           # rank 0 has no entries this step
GRAD_ROWS = (2, 3)            # features for the differentiable gather
GRAD_EMPTY_ROWS = (0, 3)
FEATURES, EMBED = 4, 3
OBJECTS = (["case_a", "case_b"], ["case_c"])
EMA_STEPS, EMA_BATCH, EMA_MOMENTUM, QUEUE_LENGTH = 3, 2, 0.9, 7


def rank_rows(rank: int, rows: tuple[int, ...], width: int = FEATURES, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * seed + rank)
    return torch.randn(rows[rank], width, generator=generator, dtype=torch.float64)


def shared_weight() -> torch.Tensor:
    return torch.randn(FEATURES, EMBED, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def prototype_loss(local: torch.Tensor, all_features: torch.Tensor) -> torch.Tensor:
    """A per-rank loss of the CFCML kind: local features pulled to the prototype of all ranks' features."""
    prototype = all_features.mean(dim=0)
    return ((local - prototype) ** 2).sum(dim=1).exp().sum() / 10.0


def global_loss(all_features: torch.Tensor) -> torch.Tensor:
    """A loss every rank computes identically on the gathered features."""
    weights = torch.arange(1, all_features.shape[0] * all_features.shape[1] + 1, dtype=all_features.dtype)
    return (all_features.flatten() ** 2 * weights).sum().sqrt()


def make_student(seed: int) -> nn.Module:
    """A module with parameters and BatchNorm buffers (for the broadcast)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, EMBED), nn.BatchNorm1d(EMBED)).double()


def make_mlp(seed: int) -> nn.Module:
    """Student/teacher of the EMA scenario. Like nnU-Net's networks (InstanceNorm without running statistics) it
    has no buffers: DDP would otherwise leave rank-dependent running statistics until its next forward."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, EMBED), nn.Tanh(), nn.Linear(EMBED, EMBED)).double()


def ema_batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(EMA_BATCH, FEATURES, generator=torch.Generator().manual_seed(100 * step + rank),
                       dtype=torch.float64)


def enqueue(queue: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """First-in-first-out queue of the newest QUEUE_LENGTH rows (newest last)."""
    return torch.cat([queue, entries], dim=0)[-QUEUE_LENGTH:]


# ---------------------------------------------------------------------------------------------- scenarios
def _error(fn) -> str:
    try:
        fn()
    except ValueError as error:
        return f"ValueError: {error}"
    return "no error"


def scenario_gather_concat(rank: int) -> dict:
    floats = rank_rows(rank, CONCAT_ROWS).t().t()  # a view: contiguity is handled by the primitive
    other_dtype = (torch.float32, torch.int8)[rank]
    return {
        "uneven": D.all_gather_concat(floats),
        "empty_one_rank": D.all_gather_concat(rank_rows(rank, EMPTY_ROWS)),
        "empty_all": D.all_gather_concat(torch.zeros(0, 2, 3)),
        "int_3d": D.all_gather_concat(torch.arange(CONCAT_ROWS[rank] * 6, dtype=torch.int64).view(-1, 2, 3) + rank),
        "trailing_mismatch": _error(lambda: D.all_gather_concat(torch.zeros(2, 3 + rank))),
        "dtype_mismatch": _error(lambda: D.all_gather_concat(torch.zeros(2, 3, dtype=other_dtype))),
        "ndim_mismatch": _error(lambda: D.all_gather_concat(torch.zeros((2, 3) if rank == 0 else (2, 3, 1)))),
        "requires_grad": D.all_gather_concat(rank_rows(rank, CONCAT_ROWS).requires_grad_()).requires_grad,
    }


def _gather_with_grad_case(rank: int, rows: tuple[int, ...]) -> dict:
    weight = shared_weight().requires_grad_()
    inputs = rank_rows(rank, rows, seed=1)
    local = inputs @ weight
    gathered = D.all_gather_with_grad(local)
    prototype_loss(local, gathered).backward()
    weight_grad = D.all_reduce_mean_(weight.grad.clone())  # what DDP does with parameter gradients

    leaf = rank_rows(rank, rows, width=EMBED, seed=2).requires_grad_()
    global_loss(D.all_gather_with_grad(leaf)).backward()
    return {"gathered": gathered.detach(), "weight_grad": weight_grad, "leaf_grad": leaf.grad.clone()}


def scenario_gather_with_grad(rank: int) -> dict:
    no_grad_on_rank_0 = torch.ones(2, 3, requires_grad=rank == 1)
    return {"uneven": _gather_with_grad_case(rank, GRAD_ROWS), "empty": _gather_with_grad_case(rank, GRAD_EMPTY_ROWS),
            "grad_mismatch": _error(lambda: D.all_gather_with_grad(no_grad_on_rank_0)),
            "no_grad_anywhere": D.all_gather_with_grad(torch.full((rank + 1, 2), float(rank)))}


def scenario_reduce(rank: int) -> dict:
    values = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)
    counts = torch.tensor([rank, 10 * rank + 1])
    mean = values.clone()
    returned = D.all_reduce_mean_(mean)
    return {
        "mean": mean,
        "mean_returns_its_argument": returned is mean,
        "sum": D.all_reduce_sum_(counts),
        "mean_int": _error(lambda: D.all_reduce_mean_(counts.clone())),
        "not_contiguous": _error(lambda: D.all_reduce_sum_(torch.zeros(3, 4).t())),
    }


def gradient_parameters() -> list[nn.Parameter]:
    """Parameters a (float64, 6 elements), b (float32), c (float64), d (float32) of the averaging scenario."""
    return [nn.Parameter(torch.zeros(2, 3, dtype=torch.float64)), nn.Parameter(torch.zeros(4)),
            nn.Parameter(torch.zeros(3, dtype=torch.float64)), nn.Parameter(torch.zeros(2))]


def local_gradients(rank: int) -> list[torch.Tensor | None]:
    """Rank r's gradients: b only on rank 1 (a head skipped on rank 0), c on no rank."""
    generator = torch.Generator().manual_seed(300 + rank)
    a = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    b = torch.randn(4, generator=generator) if rank == 1 else None
    d = torch.randn(2, generator=generator)
    return [a, b, None, d]


def scenario_average_gradients(rank: int) -> dict:
    params = gradient_parameters()
    for p, g in zip(params, local_gradients(rank)):
        p.grad = None if g is None else g.clone()
    D.average_gradients_(params, bucket_numel=3)  # small buckets: several all-reduces per dtype

    # manual averaging after a forward of the unwrapped network == DDP's own gradient averaging
    plain, wrapped = make_mlp(seed=0), nn.parallel.DistributedDataParallel(make_mlp(seed=0))
    batch = ema_batch(rank, step=9)
    plain(batch).pow(2).mean().backward()
    D.average_gradients_(plain.parameters())
    wrapped(batch).pow(2).mean().backward()

    # the trainers' case: the network is DDP-wrapped (nnU-Net does it) but the training forward uses the unwrapped
    # module (feature taps): DDP's reducer must stay out of the way for several steps, the manual mean does the work
    bypassed = nn.parallel.DistributedDataParallel(make_mlp(seed=0))
    optimizer = torch.optim.SGD(bypassed.parameters(), lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        bypassed.module(ema_batch(rank, step)).pow(2).mean().backward()
        D.average_gradients_(bypassed.parameters())
        optimizer.step()
    with torch.no_grad():
        bypassed.eval()
        validation_output = bypassed(ema_batch(rank, step=5))  # validation goes through the wrapper
    return {
        "grads": [None if p.grad is None else p.grad.clone() for p in params],
        "manual": {name: p.grad.clone() for name, p in plain.named_parameters()},
        "ddp": {name: p.grad.clone() for name, p in wrapped.module.named_parameters()},
        "bypassed": {name: p.detach().clone() for name, p in bypassed.module.named_parameters()},
        "validation_output": validation_output,
        "count_mismatch": _error(lambda: D.average_gradients_(gradient_parameters()[: rank + 1])),
    }


def scenario_broadcast(rank: int) -> dict:
    module = make_student(seed=rank)
    module.register_buffer("scratch", torch.full((2,), float(rank)), persistent=False)
    module.train()
    module(rank_rows(rank, (4, 4)))  # rank-dependent BatchNorm statistics
    before = {k: v.clone() for k, v in list(module.named_parameters()) + list(module.named_buffers())}
    D.broadcast_module_(module, src=0)
    after_src0 = {k: v.detach().clone() for k, v in list(module.named_parameters()) + list(module.named_buffers())}
    other = make_student(seed=10 + rank)
    D.broadcast_module_(other, src=1)
    return {
        "before": before,
        "after_src0": after_src0,
        "after_src1": {k: v.detach().clone() for k, v in other.state_dict().items()},
        "mismatch": _error(lambda: D.broadcast_module_(nn.Linear(FEATURES, EMBED + rank))),
        "bad_src": _error(lambda: D.broadcast_module_(make_student(0), src=WORLD)),
    }


def scenario_objects(rank: int) -> dict:
    return {"keys": D.all_gather_objects(OBJECTS[rank]), "empty_one_rank": D.all_gather_objects([] if rank else ["x"])}


def scenario_ema_queue(rank: int) -> dict:
    """A miniature of the planned wiring: DDP student, EMA teacher made identical by broadcast and updated from the
    synchronised student, an embedding queue fed with all ranks' teacher embeddings."""
    student = make_mlp(seed=rank)          # rank-dependent on purpose: DDP broadcasts rank 0's at wrap time
    teacher = make_mlp(seed=50 + rank)     # rank-dependent on purpose: broadcast_module_ makes it rank 0's
    ddp = nn.parallel.DistributedDataParallel(student)
    D.broadcast_module_(teacher, src=0)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    queue = torch.zeros(0, EMBED, dtype=torch.float64)
    for step in range(EMA_STEPS):
        batch = ema_batch(rank, step)
        loss = ddp(batch).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema_update(teacher, ddp, EMA_MOMENTUM)
        with torch.no_grad():
            queue = enqueue(queue, D.all_gather_concat(teacher(batch)))
    return {"student": {k: v.clone() for k, v in ddp.module.state_dict().items()},
            "teacher": {k: v.clone() for k, v in teacher.state_dict().items()}, "queue": queue}


SCENARIOS = {
    "gather_concat": scenario_gather_concat,
    "gather_with_grad": scenario_gather_with_grad,
    "reduce": scenario_reduce,
    "average_gradients": scenario_average_gradients,
    "broadcast": scenario_broadcast,
    "objects": scenario_objects,
    "ema_queue": scenario_ema_queue,
}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {"world_size": D.world_size(), "rank": D.rank(), "is_distributed": D.is_distributed()}
    try:
        for name, scenario in SCENARIOS.items():
            results[name] = scenario(rank)
    except Exception:  # saved so that the test shows the rank's traceback instead of a bare exit code
        results["crash"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks saw, after one spawn running every scenario."""
    out_dir = tmp_path_factory.mktemp("distributed")
    return run_ranks(_worker, (str(out_dir / "init"), str(out_dir)), out_dir, WORLD, SPAWN_TIMEOUT_S)


def assert_same_on_ranks(ranks: list[dict], *path: str):
    values = []
    for result in ranks:
        for key in path:
            result = result[key]
        values.append(result)
    for value in values[1:]:
        if isinstance(value, dict):
            assert value.keys() == values[0].keys()
            for k in value:
                assert torch.equal(value[k], values[0][k]), (path, k)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, values[0]), path
        else:
            assert value == values[0], path
    return values[0]


# ---------------------------------------------------------------------------------------------- tests
def test_process_group_facts(ranks):
    assert [(r["world_size"], r["rank"], r["is_distributed"]) for r in ranks] == [(2, 0, True), (2, 1, True)]


@pytest.mark.parametrize("case, expected", [
    ("uneven", lambda: torch.cat([rank_rows(r, CONCAT_ROWS) for r in range(WORLD)])),
    ("empty_one_rank", lambda: rank_rows(1, EMPTY_ROWS)),
    ("empty_all", lambda: torch.zeros(0, 2, 3)),
    ("int_3d", lambda: torch.cat([torch.arange(CONCAT_ROWS[r] * 6).view(-1, 2, 3) + r for r in range(WORLD)])),
])
def test_all_gather_concat_equals_concatenation(ranks, case, expected):
    gathered = assert_same_on_ranks(ranks, "gather_concat", case)
    reference = expected()
    assert gathered.shape == reference.shape and gathered.dtype == reference.dtype
    assert torch.equal(gathered, reference)


def test_all_gather_concat_is_detached(ranks):
    assert [r["gather_concat"]["requires_grad"] for r in ranks] == [False, False]


@pytest.mark.parametrize("case, message", [
    ("trailing_mismatch", "differ only in the first dimension"),
    ("ndim_mismatch", "differ only in the first dimension"),
    ("dtype_mismatch", "one supported dtype"),
])
def test_all_gather_concat_mismatch_is_an_error_on_every_rank(ranks, case, message):
    for result in ranks:
        assert result["gather_concat"][case].startswith("ValueError") and message in result["gather_concat"][case]


@pytest.mark.parametrize("case, rows", [("uneven", GRAD_ROWS), ("empty", GRAD_EMPTY_ROWS)])
def test_all_gather_with_grad_matches_one_process(ranks, case, rows):
    weight = shared_weight().requires_grad_()
    inputs = [rank_rows(r, rows, seed=1) for r in range(WORLD)]
    features = torch.cat(inputs) @ weight
    local = features.split(list(rows))
    # one process: the mean over ranks of the per-rank losses, on the concatenated batch
    (sum(prototype_loss(local[r], features) for r in range(WORLD)) / WORLD).backward()
    gathered = assert_same_on_ranks(ranks, "gather_with_grad", case, "gathered")
    assert torch.allclose(gathered, features.detach(), atol=1e-12)
    weight_grad = assert_same_on_ranks(ranks, "gather_with_grad", case, "weight_grad")
    assert torch.allclose(weight_grad, weight.grad, rtol=1e-10, atol=1e-12)

    # every rank computing the same global loss: each rank's slice gets WORLD x its gradient, which DDP's
    # averaging of parameter gradients turns back into the one-process gradient
    leaves = torch.cat([rank_rows(r, rows, width=EMBED, seed=2) for r in range(WORLD)]).requires_grad_()
    global_loss(leaves).backward()
    for r, expected in enumerate(leaves.grad.split(list(rows))):
        got = ranks[r]["gather_with_grad"][case]["leaf_grad"]
        assert got.shape == expected.shape
        assert torch.allclose(got, WORLD * expected, rtol=1e-10, atol=1e-12)


def test_all_gather_with_grad_requires_grad_on_all_ranks_or_none(ranks):
    for result in ranks:
        assert "requires grad on some ranks only" in result["gather_with_grad"]["grad_mismatch"]
    plain = assert_same_on_ranks(ranks, "gather_with_grad", "no_grad_anywhere")
    assert torch.equal(plain, torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))


def test_all_reduce(ranks):
    mean = assert_same_on_ranks(ranks, "reduce", "mean")
    assert torch.allclose(mean, torch.tensor([1.0, 2.0, 3.0]) * 1.5)
    assert [r["reduce"]["mean_returns_its_argument"] for r in ranks] == [True, True]
    assert torch.equal(assert_same_on_ranks(ranks, "reduce", "sum"), torch.tensor([1, 12]))
    for result in ranks:
        assert "floating point" in result["reduce"]["mean_int"]
        assert "contiguous" in result["reduce"]["not_contiguous"]


def test_average_gradients_mean_over_ranks(ranks):
    grads = [r["average_gradients"]["grads"] for r in ranks]
    local = [local_gradients(r) for r in range(WORLD)]
    for name, index in (("a", 0), ("d", 3)):
        expected = (local[0][index] + local[1][index]) / WORLD
        for r in range(WORLD):
            assert torch.allclose(grads[r][index], expected), name
    for r in range(WORLD):
        assert torch.allclose(grads[r][1], local[1][1] / WORLD)  # rank 0 skipped b: it counts as zero
        assert grads[r][2] is None  # no rank produced a gradient: stays None (optimisers skip it)
        assert "different numbers of parameters" in ranks[r]["average_gradients"]["count_mismatch"]


def test_average_gradients_equals_ddp(ranks):
    manual = assert_same_on_ranks(ranks, "average_gradients", "manual")
    ddp = assert_same_on_ranks(ranks, "average_gradients", "ddp")
    assert manual.keys() == ddp.keys()
    for name in manual:
        assert torch.allclose(manual[name], ddp[name], rtol=1e-12, atol=1e-14), name


def test_average_gradients_with_a_bypassed_ddp_wrapper_matches_one_process(ranks):
    bypassed = assert_same_on_ranks(ranks, "average_gradients", "bypassed")
    single = make_mlp(seed=0)
    optimizer = torch.optim.SGD(single.parameters(), lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        single(torch.cat([ema_batch(r, step) for r in range(WORLD)])).pow(2).mean().backward()
        optimizer.step()
    for name, value in single.named_parameters():
        assert torch.allclose(bypassed[name], value.detach(), rtol=1e-12, atol=1e-14), name
    with torch.no_grad():
        for r in range(WORLD):
            expected = single.eval()(ema_batch(r, step=5))
            assert torch.allclose(ranks[r]["average_gradients"]["validation_output"], expected, atol=1e-12)


def test_broadcast_module_copies_parameters_and_buffers(ranks):
    before = [r["broadcast"]["before"] for r in ranks]
    assert not torch.equal(before[0]["0.weight"], before[1]["0.weight"])  # the scenario starts from different state
    after = assert_same_on_ranks(ranks, "broadcast", "after_src0")
    assert set(after) == set(before[0]) and {"1.running_mean", "1.num_batches_tracked", "scratch"} <= set(after)
    for name, value in after.items():
        assert torch.equal(value, before[0][name]), name
    after_src1 = assert_same_on_ranks(ranks, "broadcast", "after_src1")
    reference = make_student(seed=11).state_dict()
    for name, value in after_src1.items():
        assert torch.equal(value, reference[name]), name


def test_broadcast_module_mismatch_is_an_error_on_every_rank(ranks):
    for result in ranks:
        assert "hold different modules" in result["broadcast"]["mismatch"]
        assert "src must be a rank" in result["broadcast"]["bad_src"]


def test_all_gather_objects_in_rank_order(ranks):
    assert assert_same_on_ranks(ranks, "objects", "keys") == ["case_a", "case_b", "case_c"]
    assert assert_same_on_ranks(ranks, "objects", "empty_one_rank") == ["x"]


def test_ema_teacher_and_queue_identical_and_equal_to_one_process(ranks):
    student = assert_same_on_ranks(ranks, "ema_queue", "student")
    teacher = assert_same_on_ranks(ranks, "ema_queue", "teacher")
    queue = assert_same_on_ranks(ranks, "ema_queue", "queue")

    # one process on the concatenated batch: with equal per-rank batches the mean loss over the concatenation
    # has DDP's averaged gradient
    single, single_teacher = make_mlp(seed=0), make_mlp(seed=50)
    optimizer = torch.optim.SGD(single.parameters(), lr=0.1)
    single_queue = torch.zeros(0, EMBED, dtype=torch.float64)
    for step in range(EMA_STEPS):
        batch = torch.cat([ema_batch(r, step) for r in range(WORLD)])
        loss = single(batch).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema_update(single_teacher, single, EMA_MOMENTUM)
        with torch.no_grad():
            single_queue = enqueue(single_queue, single_teacher(batch))
    assert not torch.equal(teacher["0.weight"], make_mlp(seed=50).state_dict()["0.weight"])  # the teacher moved
    for name, value in single.state_dict().items():
        assert torch.allclose(student[name], value, rtol=1e-10, atol=1e-12), name
    for name, value in single_teacher.state_dict().items():
        assert torch.allclose(teacher[name], value, rtol=1e-10, atol=1e-12), name
    assert queue.shape == (min(QUEUE_LENGTH, EMA_STEPS * WORLD * EMA_BATCH), EMBED)
    assert torch.allclose(queue, single_queue, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- no process group
def test_identity_without_process_group():
    assert not dist.is_initialized()
    assert (D.is_distributed(), D.world_size(), D.rank()) == (False, 1, 0)
    assert D.split_batch_size(3) == 3
    x = torch.randn(3, 2, requires_grad=True)
    gathered = D.all_gather_concat(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    assert D.all_gather_with_grad(x) is x
    values = torch.tensor([1.0, 2.0])
    assert D.all_reduce_mean_(values) is values and torch.equal(values, torch.tensor([1.0, 2.0]))
    counts = torch.tensor([3])
    assert D.all_reduce_sum_(counts) is counts and counts.item() == 3
    module = nn.Linear(2, 2)
    weight = module.weight.detach().clone()
    assert D.broadcast_module_(module) is module and torch.equal(module.weight, weight)
    keys = ["a", "b"]
    gathered_keys = D.all_gather_objects(keys)
    assert gathered_keys == keys and gathered_keys is not keys
    empty = torch.zeros(0, 4)
    assert D.all_gather_concat(empty).shape == (0, 4)
    grad = torch.randn(2, 2)
    module.weight.grad = grad.clone()
    D.average_gradients_(module.parameters())
    assert torch.equal(module.weight.grad, grad) and module.bias.grad is None


@pytest.mark.parametrize("global_batch, num_ranks, shares", [
    (2, 1, [2]),
    (4, 2, [2, 2]),
    (5, 2, [3, 2]),
    (7, 3, [3, 2, 2]),
    (3, 3, [1, 1, 1]),
])
def test_split_batch_size(global_batch, num_ranks, shares):
    got = [D.split_batch_size(global_batch, num_ranks, r) for r in range(num_ranks)]
    assert got == shares and sum(got) == global_batch


@pytest.mark.parametrize("call, error, message", [
    (lambda: D.split_batch_size(1, 2, 0), ValueError, "cannot be split"),
    (lambda: D.split_batch_size(4, 2, 2), ValueError, "not in a group"),
    (lambda: D.all_reduce_mean_(torch.tensor([1, 2])), ValueError, "floating point"),
    (lambda: D.all_gather_objects(("a",)), TypeError, "takes a list"),
    (lambda: D.average_gradients_([nn.Parameter(torch.zeros(2))], bucket_numel=0), ValueError, "bucket_numel"),
    (lambda: D.average_gradients_([_sparse_grad_parameter()]), ValueError, "sparse"),
])
def test_bad_arguments_without_process_group(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _sparse_grad_parameter() -> nn.Parameter:
    embedding = nn.Embedding(4, 2, sparse=True)
    embedding(torch.tensor([1])).sum().backward()
    return embedding.weight
