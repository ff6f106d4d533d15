"""Mesh shapes and the logical-axis rules: the errors name the problem; an indivisible dimension is replicated
and `describe` says so."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxreason import sharding
from jaxreason.sharding import MeshConfig


def test_one_minus_one_takes_the_remaining_devices():
    assert MeshConfig(-1, 2, 2).shape(8) == (2, 2, 2)
    assert MeshConfig(2, -1, 1).shape(8) == (2, 4, 1)
    assert sharding.make_mesh(MeshConfig(2, 2, 2)).shape == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("config, devices, message", [
    (MeshConfig(-1, -1, 1), 8, "at most one axis may be -1"),
    (MeshConfig(2, 2, 1), 8, "product 4 != 8 devices"),
    (MeshConfig(4, 4, 1), 8, "product 16 != 8 devices"),
    (MeshConfig(-1, 3, 1), 8, "8 devices are not divisible by 3"),
])
def test_bad_mesh_shapes_are_named(config, devices, message):
    with pytest.raises(ValueError, match=message) as e:
        config.shape(devices)
    assert str(config) in str(e.value)


def test_make_mesh_checks_the_device_count():
    with pytest.raises(ValueError, match="product 3 != 2 devices"):
        sharding.make_mesh(MeshConfig(3, 1, 1), devices=jax.devices()[:2])


def test_unknown_logical_axis_is_an_error():
    mesh = sharding.make_mesh(MeshConfig(2, 4, 1))
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'experts'"):
        sharding.logical_to_spec(("embed", "experts"), (32, 4), mesh)
    with pytest.raises(ValueError, match=r"logical names \('embed',\) do not match shape \(32, 4\)"):
        sharding.logical_to_spec(("embed",), (32, 4), mesh)


def test_rules_divisibility_and_one_use_per_mesh_axis():
    mesh = sharding.make_mesh(MeshConfig(1, 4, 2))
    assert sharding.logical_to_spec(("embed", "mlp"), (32, 64), mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("embed", "mlp"), (30, 64), mesh) == P(None, "tensor")  # 30 % 4
    assert sharding.logical_to_spec(("mlp", "heads"), (64, 3), mesh) == P("tensor", None)  # tensor used once
    assert sharding.logical_to_spec(("layers", None, "head_dim"), (2, 5, 8), mesh) == P(None, None, None)


class _Odd(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.zeros((30, 64)), out_sharding=("embed", "mlp"), eager_sharding=False)
        self.b = nnx.Param(jnp.zeros((64,)), out_sharding=("mlp",), eager_sharding=False)


def test_indivisible_dimension_is_replicated_and_described():
    mesh = sharding.make_mesh(MeshConfig(2, 4, 1))
    state = nnx.state(_Odd())
    shardings = sharding.state_shardings(state, mesh)
    assert shardings["w"].get_value().spec == P(None, "tensor")
    lines = sharding.describe(state, mesh)
    assert lines == [
        "b (64,) ('mlp',) -> P('tensor',)",
        "w (30, 64) ('embed', 'mlp') -> P(None, 'tensor'); embed (30) not divisible by fsdp=4, replicated",
    ]
