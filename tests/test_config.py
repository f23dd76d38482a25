import math
import subprocess
import sys

import pytest

from clipforge.config import (
    RecipeError,
    available_recipes,
    load_recipe,
    parse_override,
    recipe_to_toml,
    validate_recipe,
)


def test_shipped_recipes_all_validate():
    names = available_recipes()
    assert "tiny-shapes" in names
    for name, description in names.items():
        assert description, f"recipe {name} has no description"
        assert load_recipe(name).name == name


def test_override_coerces_types():
    r = load_recipe("tiny-shapes", ["optim.lr=3e-4", "data.batch_size=64", "schedule.kind=constant",
                                    "optim.grad_clip=none", "optim.betas=[0.9, 0.95]"])
    assert r.optim.lr == 3e-4 and r.data.batch_size == 64 and r.schedule.kind == "constant"
    assert r.optim.grad_clip is None and r.optim.betas == (0.9, 0.95)
    # a quoted number is still coerced to the field's type
    assert load_recipe("tiny-shapes", ["train.steps='12'"]).train.steps == 12


def test_override_list_index_and_inline_table():
    r = load_recipe("tiny-shapes", ["objective.terms.0.label_smoothing=0.1"])
    assert r.objective.terms[0].label_smoothing == 0.1
    r = load_recipe("tiny-shapes", ['objective.terms=[{name="siglip"}]', "model.logit_bias_init=-10",
                                    f"model.logit_scale_init={math.log(10)}"])
    assert r.objective.terms[0].name == "siglip"
    with pytest.raises(RecipeError, match="logit_scale_init = 2.302585"):  # CLIP's t = 14.3 start, silently
        load_recipe("tiny-shapes", ['objective.terms=[{name="siglip"}]', "model.logit_bias_init=-10"])


def test_unknown_key_suggests_closest():
    with pytest.raises(RecipeError) as e:
        load_recipe("tiny-shapes", ["optim.lrr=1e-3"])
    assert "unknown key 'optim.lrr'" in str(e.value) and "did you mean 'optim.lr'" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe("tiny-shapes", ["optimm.lr=1e-3"])
    assert "unknown key 'optimm'" in str(e.value) and "'optim'" in str(e.value)


def test_bad_value_names_key_and_expected():
    with pytest.raises(RecipeError) as e:
        load_recipe("tiny-shapes", ["optim.lr=fast"])
    assert "'optim.lr'" in str(e.value) and "number" in str(e.value) and "'fast'" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe("tiny-shapes", ["schedule.kind=cosin"])
    assert "'schedule.kind'" in str(e.value) and "'cosine', 'constant' or 'cooldown'" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe("tiny-shapes", ["model.patch_size=7"])
    assert "multiple of model.patch_size" in str(e.value)


def test_set_without_equals_and_unknown_recipe():
    with pytest.raises(RecipeError, match="key=value"):
        parse_override("optim.lr")
    with pytest.raises(RecipeError) as e:
        load_recipe("tiny-shape")
    assert "unknown recipe 'tiny-shape'" in str(e.value) and "tiny-shapes" in str(e.value)


def test_siglip_needs_bias():
    with pytest.raises(RecipeError, match="logit_bias_init"):
        load_recipe("tiny-shapes", ['objective.terms=[{name="siglip"}]'])


def test_user_file_with_base_and_round_trip(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('base = "tiny-shapes"\ndescription = "mine"\n[optim]\nlr = 2e-4\n')
    r = load_recipe(str(path))
    assert r.name == "mine" and r.optim.lr == 2e-4 and r.model.vision_layers == 6
    # the resolved TOML we save in run dirs reads back to the same recipe
    saved = tmp_path / "resolved.toml"
    saved.write_text(recipe_to_toml(r))
    assert load_recipe(str(saved)) == r


def test_cli_reports_errors_without_traceback():
    out = subprocess.run([sys.executable, "-m", "clipforge", "train", "tiny-shapes", "--set", "optim.lrr=1"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "did you mean 'optim.lr'" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "clipforge", "train", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "Available:" in out.stderr and "tiny-shapes" in out.stderr


def test_cli_lists_recipes():
    out = subprocess.run([sys.executable, "-m", "clipforge", "recipes"], capture_output=True, text=True, check=True)
    assert any(line.startswith("tiny-shapes") for line in out.stdout.splitlines())


def test_validate_rejects_wrong_section_type():
    with pytest.raises(RecipeError, match="'optim'"):
        validate_recipe({"optim": 3})
