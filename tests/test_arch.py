"""The Mamba-1 architecture spec states what capture, verification, recipes and the runtime do."""

from __future__ import annotations

import pytest
import torch

import quamba_fx
from quamba_fx.arch import MAMBA1, ArchSpec, Tap, arch_for_model, arch_for_model_type, arch_named, arch_names
from quamba_fx.arch import arch_of, register_arch
from quamba_fx.errors import QuambaError, RecipeError
from quamba_fx.graph_info import block, info, role
from quamba_fx.graph_meta import GRAPH_META_KEY, GraphMeta
from quamba_fx.recipe import block_paths
from quamba_fx.recipes import W8A8_TAPS
from quamba_fx.runtime import MambaCache

from .conftest import make_model, tiny_config


@pytest.fixture(scope="module")
def captured():
    model = make_model(tiny_config(num_hidden_layers=3, conv_kernel=3, state_size=5))
    return model, quamba_fx.capture(model)


def test_mamba1_is_registered_and_found_by_name_model_type_class_and_graph(captured):
    model, gm = captured
    assert "mamba1" in arch_names()
    assert arch_named("mamba1") is MAMBA1
    assert arch_for_model_type("mamba") is MAMBA1
    assert arch_for_model(model) is MAMBA1
    assert arch_for_model(torch.nn.Linear(2, 2)) is None
    assert arch_of(gm) is MAMBA1
    assert MAMBA1.class_names == ("MambaForCausalLM", "MambaModel")


def test_unknown_architectures_are_clear_errors():
    with pytest.raises(QuambaError, match="unknown architecture 'mamba9'"):
        arch_named("mamba9")

    class Fake:
        meta = {GRAPH_META_KEY: GraphMeta(config={"model_type": "jamba"})}

    with pytest.raises(QuambaError, match="model_type='jamba'"):
        arch_of(Fake())


def test_register_arch_refuses_a_different_spec_under_a_taken_name():
    assert register_arch(MAMBA1) is MAMBA1
    from dataclasses import replace
    with pytest.raises(ValueError, match="already registered"):
        register_arch(replace(MAMBA1, display_name="other"))


def test_every_role_module_is_the_module_capture_calls_for_that_role(captured):
    _, gm = captured
    for b, path in enumerate(block_paths(gm)):
        assert path == MAMBA1.block_path("backbone.", b)
        for name, _ in MAMBA1.modules:
            expected = MAMBA1.module_path(path, name)
            modules = {info(n)["module"] for n in gm.graph.nodes if role(n) == name and block(n) == b}
            assert modules == {expected}, name
    assert {role(n) for n in gm.graph.nodes} <= set(MAMBA1.roles)


def test_taps_are_the_recipes_w8a8_taps_and_name_real_modules(captured):
    _, gm = captured
    assert MAMBA1.taps == W8A8_TAPS
    inner = {path for _, path in MAMBA1.modules}
    assert all(tap.module in inner for tap in MAMBA1.taps)
    assert all(isinstance(tap, Tap) for tap in MAMBA1.taps)


def test_topology_roles_are_roles_of_the_block():
    topology = MAMBA1.topology
    assert {topology.conv, topology.producer, topology.consumer} <= dict(MAMBA1.modules).keys()


def test_cache_shapes_are_conv_width_minus_one_and_state_size(captured):
    _, gm = captured
    cache = MambaCache.allocate(gm, batch_size=2, device="cpu")
    for i, path in enumerate(block_paths(gm)):
        conv, ssm = MAMBA1.cache_shapes(gm, path, 2)
        assert conv == (2, 64, 2) == tuple(cache.conv_states[i].shape)
        assert ssm == (2, 64, 5) == tuple(cache.ssm_states[i].shape)


def test_config_keys_select_the_computation_fields():
    config = tiny_config()
    picked = MAMBA1.architecture(config)
    assert picked["model_type"] == "mamba" and picked["conv_kernel"] == 4
    assert "use_cache" not in picked and set(picked) <= set(MAMBA1.config_keys)


def test_a_tap_validates_its_fields():
    with pytest.raises(RecipeError, match="recipe field at"):
        Tap("mixer.conv1d", "output_scale", "somewhere")
    assert isinstance(MAMBA1, ArchSpec)


def test_class_named_maps_recorded_sources_to_classes():
    from transformers import MambaForCausalLM, MambaModel

    assert MAMBA1.class_named("MambaModel") is MambaModel
    assert MAMBA1.class_named("MambaForCausalLM") is MambaForCausalLM
    assert MAMBA1.class_named("SomethingElse") is MambaForCausalLM  # HF's default for a config without architectures


def test_a_checkpoint_of_an_unregistered_model_type_names_the_registered_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "jamba"}')
    with pytest.raises(QuambaError, match=r"model_type='jamba'; quamba-fx supports 'mamba' \(Mamba-1\), 'mamba2' \(Mamba-2\) models"):
        quamba_fx.load_model(str(tmp_path))


def test_weight_shapes_are_the_models_tensors_and_block_index_reads_their_paths(captured):
    model, _ = captured
    state = {name: list(t.shape) for name, t in model.state_dict().items()}
    expected = MAMBA1.weight_shapes(model.config, "backbone.")
    assert {name: state[name] for name in expected} == expected
    assert {name for name in state if ".layers." in name} <= set(expected) | {
        name for name in state if name.endswith("bias") or name.endswith(".D")
    }
    assert MAMBA1.block_index("backbone.", "backbone.layers.12.mixer.A_log") == 12
    assert MAMBA1.block_index("", "layers.0.norm.weight") == 0
    assert MAMBA1.block_index("backbone.", "backbone.norm_f.weight") is None
    assert MAMBA1.block_index("backbone.", "backbone.layers.x.norm.weight") is None


# Modules that read Mamba-1's facts from its spec; a literal module name or HF class in their code
# (docstrings aside) would be a second copy of the spec that a new architecture has to find.
_SPEC_READERS = ("capture", "passes/verify", "passes/hadamard", "recipe", "runtime", "checkpoint",
                 "checkpoint_format")
_MAMBA1_NAMES = ("mixer", "in_proj", "x_proj", "dt_proj", "out_proj", "A_log", "layers.", "backbone.")
_MAMBA1_CLASSES = {"MambaForCausalLM", "MambaModel", "MambaConfig"}


@pytest.mark.parametrize("module", _SPEC_READERS)
def test_spec_readers_name_no_mamba1_module_or_class_in_code(module):
    import ast
    from pathlib import Path

    path = Path(quamba_fx.__file__).parent / f"{module}.py"
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found += [f"{node.lineno}: {word!r}" for word in _MAMBA1_NAMES if word in node.value]
        elif isinstance(node, (ast.Name, ast.alias)):
            name = node.id if isinstance(node, ast.Name) else node.name
            if name in _MAMBA1_CLASSES:
                found.append(f"{getattr(node, 'lineno', '?')}: {name}")
    assert found == [], f"{module}.py names Mamba-1 specifics; read them from quamba_fx.arch instead"
