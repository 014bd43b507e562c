"""Charged N-body task: simulator symmetry and energy, data cache, config validation, EGNN equivariance."""

import math
import warnings

import pytest
import torch

pytest.importorskip("torch_geometric")

from torch_geometric.data import Batch, Data  # noqa: E402

import ace  # noqa: E402
from ace.tasks import nbody  # noqa: E402
from ace.tasks.egnn import EGNN, EGNNBranch, EGNNLayer  # noqa: E402
from ace.tasks.nbody_sim import energy, sample_initial_state, simulate  # noqa: E402

PROTOCOL_STEPS = 4100  # frame 40 of the EGNN protocol: (40 + 1) * 100 steps


def _orthogonal(generator: torch.Generator, reflection: bool = True) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=generator))
    if (torch.det(q) > 0) == reflection:
        q = q * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    return q


def _rotation_about(axis: int, angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    a, b = [k for k in range(3) if k != axis]
    r = torch.eye(3, dtype=torch.float64)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def _small(tmp_path=None, **kw) -> nbody.DataConfig:
    sizes = {"train_size": 6, "val_size": 4, "test_size": 4, "frame_in": 2, "frame_out": 4, "sample_freq": 10}
    return nbody.DataConfig(cache_dir=str(tmp_path or ""), **{**sizes, **kw})


# --- simulator ----------------------------------------------------------------------------------------


def test_trajectory_is_e3_equivariant():
    """x(0) -> Q x(0) + t, v(0) -> Q v(0) moves every frame the same way (Q with a reflection)."""
    g = torch.Generator().manual_seed(1)
    pos, vel, charge = sample_initial_state(100, generator=g)
    q, t = _orthogonal(g), torch.randn(3, dtype=torch.float64, generator=g)
    x, v = simulate(pos, vel, charge, PROTOCOL_STEPS, 100)
    x2, v2 = simulate(pos @ q.T + t, vel @ q.T, charge, PROTOCOL_STEPS, 100)
    # exact up to rounding; chaotic close encounters amplify rounding to ~1e-9 over the horizon
    torch.testing.assert_close(x2, x @ q.T + t, rtol=0, atol=1e-6)
    torch.testing.assert_close(v2, v @ q.T, rtol=0, atol=1e-6)


@pytest.mark.parametrize("field_strength", [0.0, 0.5])
def test_energy_conserved_where_resolved(field_strength):
    """H = K + Coulomb (- E sum q z) is conserved to 2e-2 (relative, over 4100 steps) wherever all
    particles stay > 0.2 apart. Closer encounters of opposite charges (about half the protocol's
    trajectories) are under-resolved at delta_t = 1e-3, as in the original data."""
    g = torch.Generator().manual_seed(0)
    pos, vel, charge = sample_initial_state(200, generator=g)
    x, v = simulate(pos, vel, charge, PROTOCOL_STEPS, 10, field_strength=field_strength)
    i, j = torch.triu_indices(5, 5, 1)
    resolved = (x[:, :, i] - x[:, :, j]).norm(dim=-1).amin((0, 2)) > 0.2
    h = energy(x, v, charge, field_strength=field_strength)
    drift = (h - h[0]).abs().amax(0) / h[0].abs().clamp(min=1.0)
    assert resolved.float().mean() > 0.3
    assert drift[resolved].max() < 2e-2
    assert drift[resolved].median() < 2e-3


def test_like_charges_conserve_energy():
    """All-repulsive systems never collide: every trajectory conserves H to 1e-3 relative."""
    g = torch.Generator().manual_seed(2)
    pos, vel, charge = sample_initial_state(100, generator=g)
    i, j = torch.triu_indices(5, 5, 1)
    spread = (pos[:, i] - pos[:, j]).norm(dim=-1).amin(-1) > 0.3  # no pair starts almost touching
    pos, vel, charge = pos[spread], vel[spread], charge[spread].abs()
    x, v = simulate(pos, vel, charge, PROTOCOL_STEPS, 10)
    h = energy(x, v, charge)
    assert ((h - h[0]).abs().amax(0) / h[0].abs()).max() < 1e-3


def test_field_breaks_rotations_but_not_rotations_about_z():
    g = torch.Generator().manual_seed(3)
    pos, vel, charge = sample_initial_state(50, generator=g)
    kw = {"steps": 1000, "sample_every": 1000, "field_strength": 1.0}
    x, _ = simulate(pos, vel, charge, **kw)
    for r, broken in [(_rotation_about(0, 1.0), True), (_rotation_about(2, 1.0), False)]:
        x2, _ = simulate(pos @ r.T, vel @ r.T, charge, **kw)
        error = (x2 - x @ r.T).abs().max()
        assert error > 0.1 if broken else error < 1e-8


def test_field_accelerates_net_charge_along_z():
    """Pair forces cancel in the total force: the field alone changes the momentum, by t E sum_i q_i e_z."""
    g = torch.Generator().manual_seed(4)
    pos, vel, charge = sample_initial_state(20, generator=g)
    _, v = simulate(pos, vel, charge, 500, 500, field_strength=2.0, max_force=None)
    momentum = v[-1].sum(1) - vel.sum(1)
    expected = torch.zeros_like(momentum)
    expected[:, 2] = 500 * 1e-3 * 2.0 * charge.sum((1, 2))
    torch.testing.assert_close(momentum, expected, rtol=0, atol=1e-9)


def test_clip_bounds_the_norm_or_each_component():
    """One step of dt = 1 from rest gives v = clipped force. Two like charges at distance 1/sqrt(200)
    along u = (3, 1, 0)/sqrt(10) push each other with |F| = 200: the norm rule (the default) scales F to
    norm 100; the component rule clamps -189.7 to -100 and leaves -63.2 alone."""
    u = torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(10)
    pos = torch.stack([torch.zeros(3, dtype=torch.float64), u / math.sqrt(200)])[None]
    vel, charge = torch.zeros_like(pos), torch.ones(1, 2, 1, dtype=torch.float64)

    def force(pos, **kw):
        return simulate(pos, vel, charge, steps=1, delta_t=1.0, **kw)[1][0, 0, 0]

    torch.testing.assert_close(force(pos, max_force=None), -200 * u)
    torch.testing.assert_close(force(pos), -100 * u)
    assert torch.equal(force(pos), force(pos, clip="norm"))
    component = force(pos, clip="component")
    torch.testing.assert_close(
        component, torch.tensor([-100.0, -200 / math.sqrt(10), 0.0], dtype=torch.float64)
    )
    # only the norm rule commutes with all rotations (the component rule with the cube's only)
    r = _rotation_about(2, math.pi / 4)
    torch.testing.assert_close(force(pos @ r.T), r @ force(pos))
    assert not torch.allclose(force(pos @ r.T, clip="component"), r @ component)
    with pytest.raises(ValueError, match="clip"):
        force(pos, clip="box")


# --- data set, cache and config -------------------------------------------------------------------


def test_generate_protocol_shapes_and_frames():
    cfg = _small()
    data = nbody.generate(cfg)
    assert [len(data[s]["pos"]) for s in nbody.SPLITS] == [6, 4, 4]
    split = data["train"]
    assert split["pos"].shape == (6, 5, 3) and split["charge"].shape == (6, 5, 1)
    assert set(split["charge"].unique().tolist()) <= {-1.0, 1.0}
    # frame f is the state after (f + 1) * sample_freq steps of the initial state
    pos, vel, charge = sample_initial_state(6, generator=nbody._generator(cfg, "train"))
    x, v = simulate(pos, vel, charge, 50, 10)
    torch.testing.assert_close(split["pos"], x[2])
    torch.testing.assert_close(split["vel"], v[2])
    torch.testing.assert_close(split["target"], x[4])
    # splits are independent of each other's sizes
    other = nbody.generate(_small(train_size=3), ("test",))
    torch.testing.assert_close(other["test"]["target"], data["test"]["target"])


def test_cache_hit_miss_and_no_cache(tmp_path, monkeypatch):
    cfg = _small(tmp_path)
    first = nbody.load_data(cfg)
    assert len(list(tmp_path.glob("nbody_*.pt"))) == 3

    def fail(*args, **kw):
        raise AssertionError("cache hit expected, but the data were regenerated")

    with monkeypatch.context() as m:
        m.setattr(nbody, "generate", fail)
        again = nbody.load_data(cfg)
    for s in nbody.SPLITS:
        for k in first[s]:
            assert torch.equal(first[s][k], again[s][k])
    changed = nbody.load_data(_small(tmp_path, field_strength=0.5))  # a miss: new files
    assert len(list(tmp_path.glob("nbody_*.pt"))) == 6
    assert not torch.equal(changed["test"]["target"], first["test"]["target"])
    nbody.load_data(_small())
    assert len(list(tmp_path.glob("nbody_*.pt"))) == 6
    nbody.load_data(_small(tmp_path, clip="component"))  # the clipping rule is part of the key
    assert len(list(tmp_path.glob("nbody_*.pt"))) == 9


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_params"])
def test_damaged_cache_is_regenerated_with_a_warning(tmp_path, damage):
    cfg = _small(tmp_path)
    good = nbody.load_data(cfg)
    path = next(tmp_path.glob("nbody_train_*.pt"))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file")
    else:  # a valid file, but generated with other parameters
        stored = torch.load(path, weights_only=True)
        stored["params"]["field_strength"] = 3.0
        torch.save(stored, path)
    with pytest.warns(UserWarning, match="nbody_train"):
        again = nbody.load_data(cfg)
    assert torch.equal(again["train"]["target"], good["train"]["target"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: the next load is a clean hit
        nbody.load_data(cfg)


@pytest.mark.parametrize(
    "key, value",
    [("train_size", 0), ("val_size", -1), ("test_size", 2.5), ("train_size", True), ("num_particles", 1),
     ("field_strength", "strong"), ("field_strength", None), ("field_strength", float("nan")),
     ("delta_t", 0.0), ("clip", "box")],
)  # fmt: skip
def test_data_config_rejects_bad_values(key, value):
    with pytest.raises(ValueError, match=key):
        nbody.DataConfig(**{key: value})


def test_config_rejects_an_unknown_clip_rule_by_name():
    from ace.config import ConfigError, config_from_dict

    assert nbody.DataConfig().clip == "norm"
    with pytest.raises(ConfigError, match=r"data\.clip.*'box'"):
        config_from_dict({"task": {"name": "nbody"}, "data": {"clip": "box"}})


def test_data_config_reads_yaml_style_numbers():
    cfg = nbody.DataConfig(field_strength="1e-3", delta_t="5.0e-4", max_force=None)
    assert cfg.field_strength == 1e-3 and cfg.delta_t == 5e-4 and cfg.max_force is None
    assert all("help" in f.metadata for f in nbody.DataConfig.__dataclass_fields__.values())
    assert all("help" in f.metadata for f in nbody.ModelConfig.__dataclass_fields__.values())
    with pytest.raises(ValueError, match="hidden"):
        nbody.ModelConfig(hidden=0)


def test_build_task(tmp_path):
    task = nbody.build(_small(tmp_path), nbody.ModelConfig(layers=2, hidden=16), seed=0)
    item = task.train[0]
    assert isinstance(item, Data) and item.pos.dtype == torch.get_default_dtype()
    assert item.edge_index.shape == (2, 20) and item.y.shape == (5, 3) and item.charge.shape == (5, 1)
    assert len(task.train) == 6 and len(task.val) == 4 and len(task.test) == 4
    out = task.model(task.example)
    assert out.shape == task.example.pos.shape
    assert set(task.metrics) == {"mse"} and task.loss(out, task.example.y).ndim == 0
    assert [n for n, m in task.model.named_modules() if task.relax_where(n, m)] == ["layers.0", "layers.1"]
    assert isinstance(task.relax_branch("layers.0", task.model.layers[0]), EGNNBranch)
    again = nbody.build(_small(tmp_path), nbody.ModelConfig(layers=2, hidden=16), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(task.model.parameters(), again.model.parameters()))


# --- EGNN ---------------------------------------------------------------------------------------------


def _batch(num_graphs=4, n=5, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    pos, vel, charge = sample_initial_state(num_graphs, n, generator=g)
    return Batch.from_data_list(
        [
            Data(pos=pos[k], vel=vel[k], charge=charge[k], edge_index=nbody._complete_graph(n))
            for k in range(num_graphs)
        ]
    )


def _transform(batch: Batch, q, t, perm) -> Batch:
    """Rotate/reflect and translate every system and relabel its nodes: new node k = old node perm[k]."""
    out = batch.clone()
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    out.pos, out.vel, out.charge = (batch.pos @ q.T + t)[perm], (batch.vel @ q.T)[perm], batch.charge[perm]
    out.edge_index = inverse[batch.edge_index]
    return out


def _group_element(batch: Batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = batch.num_nodes // batch.num_graphs
    perm = torch.cat([torch.randperm(n, generator=g) + k * n for k in range(batch.num_graphs)])
    return _orthogonal(g), torch.randn(3, dtype=torch.float64, generator=g) * 3, perm


def _relative_error(model, batch, seed=0) -> float:
    q, t, perm = _group_element(batch, seed)
    with torch.no_grad():
        expected = (model(batch) @ q.T + t)[perm]
        actual = model(_transform(batch, q, t, perm))
    return ((actual - expected).norm() / expected.norm()).item()


def test_egnn_is_e3_and_permutation_equivariant():
    torch.manual_seed(0)
    model = EGNN(layers=4, hidden=32).double()
    for layer in model.layers:  # the paper's tiny coordinate init would make the test too easy
        torch.nn.init.normal_(layer.coord_mlp[-1].weight, std=0.3)
    batch = _batch()
    assert (model(batch) - batch.pos).abs().max() > 0.1  # the model does move the particles
    for seed in range(3):
        assert _relative_error(model, batch, seed) < 1e-8


def test_egnn_layer_shapes_and_repr():
    layer = EGNNLayer(hidden=8)
    batch = _batch()
    h = torch.randn(batch.num_nodes, 8)
    attr = torch.randn(batch.edge_index.size(1), 2)
    h2, pos2 = layer(h, batch.pos.float(), batch.vel.float(), batch.edge_index, attr)
    assert h2.shape == h.shape and pos2.shape == (batch.num_nodes, 3)
    assert repr(layer) == "EGNNLayer(hidden=8)"


def test_relaxed_egnn_breaks_symmetry_and_strip_restores_it():
    torch.manual_seed(0)
    task_model = EGNN(layers=3, hidden=16)
    model = ace.relax(
        task_model,
        where=nbody._is_egnn_layer,
        branch=lambda name, m: EGNNBranch(m.hidden, 16),
        outputs=(0, 1),
    ).double()
    batch = _batch()
    assert set(ace.gates(model)) == {"layers.0", "layers.1", "layers.2"}
    assert _relative_error(model, batch) > 1e-3  # gamma = 1: not equivariant
    assert _relative_error(ace.strip(model), batch) < 1e-8
    with torch.no_grad():
        for gate in ace.gates(model).values():
            gate.zero_()
    assert _relative_error(model, batch) < 1e-8  # gamma = 0 is the exact EGNN
