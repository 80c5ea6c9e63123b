"""The program's environment variables become explicit library settings in one place."""

import pytest

from visionmoe.cli.environment import apply_environment
from visionmoe.moe import native


@pytest.fixture
def restore_native():
    mode, root = native._MODE, native._CACHE_ROOT
    yield
    native._MODE, native._CACHE_ROOT = mode, root


def test_native_mode_and_cache_come_from_the_environment(restore_native, tmp_path):
    apply_environment({"VISIONMOE_NATIVE": "0", "VISIONMOE_CACHE": str(tmp_path), "VISIONMOE_MALLOC": "default"})
    assert native.mode() == "0" and native.cache_dir().parent == tmp_path / "native"
    assert "native mode 0" in native.status() or native.status().startswith("not built")
    apply_environment({"VISIONMOE_MALLOC": "default"})  # unset: the defaults again
    assert native.mode() == "auto" and native.cache_dir().parent.parent.name == "visionmoe"


@pytest.mark.parametrize("env, named", [({"VISIONMOE_NATIVE": "yes"}, "VISIONMOE_NATIVE='yes'"),
                                        ({"VISIONMOE_MALLOC": "defualt", "VISIONMOE_NATIVE": "0"},
                                         "VISIONMOE_MALLOC='defualt'")])
def test_a_mistyped_value_is_named_and_changes_nothing(restore_native, env, named):
    native.set_mode("1")
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        apply_environment({**env, "VISIONMOE_MALLOC": env.get("VISIONMOE_MALLOC", "default")})
    assert native.mode() == "1"
