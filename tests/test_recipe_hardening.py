"""Recipes that are broken or nonsense fail up front with a RecipeError (the CLI: exit 2, one message).

Item 3: unreadable recipe files and values (wrong `base`, non-UTF-8, absurd nesting, huge integers).
Item 4: values that validate but mean nothing (NaN, true as a number, out-of-range betas, seeds, ...).
Last: a bounded, seeded fuzz over --set overrides and recipe files.
"""

import math
import random
import subprocess
import sys

import pytest

from clipforge.config import (
    Recipe,
    RecipeError,
    _valid_keys,
    available_recipes,
    load_recipe,
    recipe_to_toml,
)

HUGE = "1" + "0" * 400  # 10**400: fits in Python, overflows torch / numpy / C
HUGER = "1" + "0" * 5000  # past Python's 4300-digit int/str conversion limit


def recipe_error(*overrides, recipe="tiny-shapes") -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, list(overrides))
    return str(e.value)


def file_error(path) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(str(path))
    return str(e.value)


# ----------------------------------------------------------------------------- item 3: recipe files
@pytest.mark.parametrize("base", ["3", '["tiny-shapes"]', "{ name = 'tiny-shapes' }", "true", '""'])
def test_base_must_be_a_name(tmp_path, base):
    path = tmp_path / "bad.toml"
    path.write_text(f"base = {base}\n")
    msg = file_error(path)
    assert str(path) in msg and "'base' must be" in msg


def test_non_utf8_file_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'base = "tiny-shapes"\ndescription = "caf\xe9"\n')
    msg = file_error(path)
    assert str(path) in msg and "not UTF-8" in msg and "0xe9" in msg and "line 2" in msg


def test_non_utf8_override_is_refused():
    # undecodable command-line bytes arrive as lone surrogates; they used to pass validation and
    # crash the run when it wrote recipe.toml
    msg = recipe_error("description=caf\udce9")
    assert "description" in msg and "UTF-8" in msg


@pytest.mark.parametrize("body", [
    "a = " + "[" * 10_000 + "]" * 10_000,                       # nested arrays: tomllib recursion
    "a = " + "{ b = " * 3_000 + "1" + " }" * 3_000,             # nested inline tables
    "[" + ".".join(["a"] * 10_000) + "]\nx = 1",                # 10,000 nested tables (merged with base)
])
def test_absurd_nesting_in_file(tmp_path, body):
    path = tmp_path / "deep.toml"
    path.write_text('base = "tiny-shapes"\n' + body + "\n")
    msg = file_error(path)
    assert str(path) in msg and "nest" in msg and "32 levels" in msg


def test_absurd_nesting_in_override():
    msg = recipe_error("data.batch_size=" + "[" * 5_000 + "]" * 5_000)
    assert "--set data.batch_size" in msg and "nest" in msg
    assert "nest" in recipe_error(".".join(["a"] * 5_000) + "=1")


def test_override_into_a_list_item_value():
    # clip-vit-b32 sets optim.betas as a list; indexing into its float used to raise TypeError
    msg = recipe_error("optim.betas.0.x=1", recipe="clip-vit-b32")
    assert "'optim.betas.0' is a value, not a section" in msg


def test_odd_imports_names():
    for name in ['""', '"..x"', '"a..b"', '"a/b"']:
        assert "imports" in recipe_error(f"imports=[{name}]")


def test_huge_integers_in_file(tmp_path):
    path = tmp_path / "huge.toml"
    path.write_text(f'base = "tiny-shapes"\n[data]\nbatch_size = {HUGE}\n')
    msg = file_error(path)
    assert str(path) in msg and "'data.batch_size'" in msg and "2**63" in msg and "401 digits" in msg
    path.write_text(f'base = "tiny-shapes"\n[data]\nbatch_size = {HUGER}\n')
    msg = file_error(path)
    assert str(path) in msg and "4300 digits" in msg


@pytest.mark.parametrize("override,key,problem", [
    (f"data.batch_size={HUGE}", "data.batch_size", "2**63"),
    (f"train.steps=-{HUGE}", "train.steps", "2**63"),
    (f"optim.lr={HUGE}", "optim.lr", "finite"),
    (f"data.batch_size='{HUGE}'", "data.batch_size", "2**63"),  # quoted: pydantic parses the string
    (f"objective.terms.0.weight={HUGE}", "objective.terms.0.weight", "finite"),
    (f"data.batch_size={HUGER}", "data.batch_size", "4300 digits"),
])
def test_huge_integers_in_override(override, key, problem):
    msg = recipe_error(override)
    assert key in msg and problem in msg
    assert len(msg) < 400  # the value is abbreviated, not printed in full


def test_cli_exits_2_naming_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("base = 3\n")
    out = subprocess.run([sys.executable, "-m", "clipforge", "train", str(path), "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "error:" in out.stderr and "bad.toml" in out.stderr and "'base'" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_exits_2_for_bool_batch_size(tmp_path):
    # used to train (loss 0) on a batch of one
    out = subprocess.run([sys.executable, "-m", "clipforge", "train", "tiny-shapes", "--run-dir", str(tmp_path / "run"),
                          "--set", "data.batch_size=true", "--set", "train.steps=1", "--set", "train.device=cpu"],
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "'data.batch_size'" in out.stderr and "true/false" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- item 4: nonsense values
@pytest.mark.parametrize("override,key", [
    ("optim.lr=nan", "optim.lr"),
    ("optim.eps=inf", "optim.eps"),
    ("optim.lr='nan'", "optim.lr"),
    ("model.logit_scale_init=nan", "model.logit_scale_init"),  # unbounded: used to pass
    ("model.logit_bias_init=-inf", "model.logit_bias_init"),
    ("model.image_mean=[0.5, nan, 0.5]", "model.image_mean"),
    ("optim.betas=[nan, 0.9]", "optim.betas"),
    ("train.max_minutes=inf", "train.max_minutes"),
    ("objective.terms.0.weight=inf", "objective.terms.0.weight"),
])
def test_nan_and_inf_rejected(override, key):
    msg = recipe_error(override)
    assert f"'{key}'" in msg and "finite" in msg


def test_nan_rejected_in_method_and_term_configs():
    msg = recipe_error("method.simclr_temperature=inf", recipe="aclip-shapes")  # gt=0 let inf through
    assert "'method.simclr_temperature'" in msg and "finite" in msg


@pytest.mark.parametrize("override,key", [
    ("data.batch_size=true", "data.batch_size"),
    ("train.steps=false", "train.steps"),
    ("optim.lr=true", "optim.lr"),
    ("optim.grad_clip=true", "optim.grad_clip"),
    ("data.num_workers=false", "data.num_workers"),
    ("model.image_std=[true, 0.2, 0.2]", "model.image_std"),
    ("objective.terms.0.weight=true", "objective.terms.0.weight"),  # a term config (not a Section)
    ("objective.terms.0.label_smoothing=false", "objective.terms.0.label_smoothing"),
])
def test_booleans_are_not_numbers(override, key):
    msg = recipe_error(override)
    assert f"'{key}'" in msg and "true/false" in msg


def test_booleans_are_not_numbers_in_files_and_methods(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text('base = "tiny-shapes"\n[optim]\nweight_decay = true\n')
    assert "'optim.weight_decay'" in file_error(path)
    msg = recipe_error("method.simclr_hidden=true", recipe="aclip-shapes")
    assert "'method.simclr_hidden'" in msg and "true/false" in msg


def test_plain_values_still_coerce():
    r = load_recipe("tiny-shapes", ["train.fsdp=true", "data.augment.hflip=true", "train.steps='12'", "optim.lr=1",
                                    "train.compile=true", "optim.betas=[0, 0.999]", "train.seed=4294967295"])
    assert r.train.fsdp and r.data.augment.hflip and r.train.steps == 12 and r.optim.lr == 1.0 and r.train.compile
    assert r.optim.betas == (0.0, 0.999) and r.train.seed == 2**32 - 1


@pytest.mark.parametrize("betas", ["[0.9, 1.0]", "[1.5, 0.9]", "[-0.1, 0.98]", "[0.9, 1]"])
def test_betas_in_unit_interval(betas):
    msg = recipe_error(f"optim.betas={betas}")
    assert "optim.betas" in msg and "[0, 1)" in msg


@pytest.mark.parametrize("value", ["-1", "0", "0.5"])
def test_logit_scale_max_at_least_one(value):
    # the model clamps ln t to [0, ln logit_scale_max]: <= 0 crashes math.log mid-run, < 1 inverts the clamp
    msg = recipe_error(f"model.logit_scale_max={value}")
    assert "'model.logit_scale_max'" in msg and "1.0 <= logit_scale_max" in msg


@pytest.mark.parametrize("std", ["[0.2, 0.0, 0.2]", "[-0.2, 0.2, 0.2]"])
def test_image_std_positive(std):
    msg = recipe_error(f"model.image_std={std}")
    assert "model.image_std" in msg and "> 0" in msg


@pytest.mark.parametrize("override,allowed", [
    ("model.vision_layers=1001", "1 <= vision_layers <= 1000"),
    ("model.text_layers=1000000", "1 <= text_layers <= 1000"),
    ("model.vision_heads=2048", "1 <= vision_heads <= 1024"),
    ("model.text_heads=4096", "1 <= text_heads <= 1024"),
    ("data.num_workers=1025", "0 <= num_workers <= 1024"),
    ("train.threads=100000", "1 <= threads <= 1024"),
])
def test_absurd_counts(override, allowed):
    msg = recipe_error(override)
    assert f"'{override.split('=')[0]}'" in msg and f"allowed: {allowed}" in msg


@pytest.mark.parametrize("override", ["data.seed=-1", f"train.seed={2**32}", "train.seed=-3",
                                      "data.shapes.holdout_seed=-5", f"data.shapes.holdout_seed={2**40}"])
def test_seeds_in_numpy_range(override):
    msg = recipe_error(override)
    assert f"'{override.split('=')[0]}'" in msg and "0 <= " in msg and "<= 4294967295" in msg


@pytest.mark.parametrize("template", ["{c}", "{} {}", "{0.x} {}", "a {} {", "a {}}", "{{}}", "{} {:d}", "{}{0}"])
def test_caption_template_must_format(template):
    msg = recipe_error(f"data.caption_template={template!r}")
    assert "data.caption_template" in msg and "'{}'" in msg


@pytest.mark.parametrize("template", ["a photo of a {}.", "{{literal}} {}", "«{}» 100%"])
def test_caption_template_fine(template):
    assert load_recipe("tiny-shapes", [f"data.caption_template={template!r}"]).data.caption_template == template


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", ".", ""])
def test_name_is_not_a_path(name):
    msg = recipe_error(f"name={name!r}")
    assert "name" in msg and "runs/<name>" in msg


def test_plain_name_fine():
    assert load_recipe("tiny-shapes", ["name='my-run_1.5 b'"]).name == "my-run_1.5 b"


def test_shipped_recipes_load_and_round_trip(tmp_path):
    # the stricter schema must still read every shipped recipe and the recipe.toml a run saves
    for name in available_recipes():
        r = load_recipe(name)
        saved = tmp_path / f"{name}.toml"
        saved.write_text(recipe_to_toml(r))
        assert load_recipe(str(saved)).model_copy(update={"name": name}) == r


def test_saved_recipe_with_control_characters_reads_back(tmp_path):
    # a multi-line description used to be written raw into recipe.toml, which is then not TOML
    r = load_recipe("tiny-shapes", ['description="line one\\nline two\\u0001 \\"q\\" \\\\"'])
    saved = tmp_path / "resolved.toml"
    saved.write_text(recipe_to_toml(r))
    assert load_recipe(str(saved)).description == r.description


# ----------------------------------------------------------------------------- fuzz
_ODD = [
    "nan", "-nan", "inf", "-inf", "'nan'", "'-inf'", "true", "false", "'true'", "none", "0", "-1", "-0.0", "1e-320",
    "1e400", HUGE, "-" + HUGE, HUGER, str(2**32), str(2**32 - 1), str(2**63), str(-2**63 - 1), str(2**64), "1.5",
    "''", "'x'", "'{}'", "'{c}'", "'{} {}'", "'{{}}'", "'../x'", "'a/b'", "'..'", "'\\u0000'", "' '", "'caf\udce9'",
    "'wds:pipe:true'", "'shapes'", "'0.5*shapes'", "'0*shapes + x:y'", "[]", "[1]", "[0.9, 0.98]", "[true, 0.5]",
    "[nan, 0.9]", "[[1, 2]]", "[" * 3000 + "]" * 3000, "{}", "{a = 1}", "{name = 'clip'}", "[{name = 'siglip'}]",
    "[{name = 'ema', kind = 'ema'}]", "[{match = 'x', lr_scale = nan}]", "1979-05-27T07:32:00Z", "07:32:00",
    "0x7fffffff", "1_000", "{", "[1,", "'unterminated", "=", "a=b", "\x00",
]
_PLAUSIBLE = ["1", "2", "8", "64", "0", "0.5", "0.1", "1e-4", "'cosine'", "'constant'", "'random'", "true", "false",
              "[0.9, 0.95]", "[0.5, 0.5, 0.5]", "'shapes'", "'a {} b'", "'run-2'"]
_EXTRA_KEYS = [
    "objective.terms.0.weight", "objective.terms.0.label_smoothing", "objective.terms.0.chunk",
    "objective.terms.0.name", "objective.terms.1", "method.name", "method.simclr_weight", "method.crop_scale",
    "teachers.0.momentum", "teachers.0.name", "teachers", "optim.groups", "optim.groups.0.lr_scale", "optim.betas.0",
    "model.image_std.1", "data.augment.scale.0", "model.init_from.map", "a..b", "model", "data",
]


def _random_value(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.4:
        return rng.choice(_ODD)
    if r < 0.55:  # plausible values, so that some recipes load
        return rng.choice(_PLAUSIBLE)
    if r < 0.65:
        return str(rng.choice([-1, 1]) * rng.randrange(10 ** rng.randrange(1, 30)))
    if r < 0.75:
        return repr(rng.uniform(-1, 1) * 10 ** rng.randrange(-10, 30))
    if r < 0.9:
        text = "".join(rng.choice("ab{}/\\.:*+0 9'\"[]=#\n\t\x00é") for _ in range(rng.randrange(12)))
        return text if rng.random() < 0.5 else repr(text)
    depth = rng.randrange(60)
    return "[" * depth + rng.choice(["1", "true", "'x'", "nan", ""]) + "]" * depth


def test_fuzz_overrides_and_files(tmp_path):
    """Random --set pairs over the real keys, and random recipe files: loading succeeds (and the saved
    recipe reads back) or raises RecipeError; never another exception. Seeded, ~5 s."""
    rng = random.Random(20240611)
    keys = [k for k in _valid_keys(Recipe) if k != "imports"] + _EXTRA_KEYS  # imports would import modules
    bases = list(available_recipes())
    failures, loaded = [], 0

    def attempt(what, load):
        nonlocal loaded
        try:
            r = load()
        except RecipeError:
            return
        except Exception as e:  # noqa: BLE001 - the point of the test
            failures.append(f"{what}: {type(e).__name__}: {str(e)[:200]}")
            return
        loaded += 1
        saved = tmp_path / "saved.toml"  # what a run writes as recipe.toml must read back
        saved.write_text(recipe_to_toml(r))
        try:
            load_recipe(str(saved))
        except Exception as e:  # noqa: BLE001
            failures.append(f"{what}: the saved recipe does not read back: {str(e)[:200]}")

    for _ in range(2500):
        overrides = [f"{rng.choice(keys)}={_random_value(rng)}" for _ in range(rng.randrange(1, 4))]
        base = rng.choice(bases)
        attempt(f"{base} --set {[o[:60] for o in overrides]}", lambda: load_recipe(base, overrides))

    for i in range(300):
        lines = [f"base = {rng.choice([repr(rng.choice(bases)), _random_value(rng)])}"] if rng.random() < 0.8 else []
        for _ in range(rng.randrange(1, 6)):
            key = rng.choice(keys)
            if rng.random() < 0.3 and "." in key:  # the same key as a [table] header
                section, leaf = key.rsplit(".", 1)
                lines.append(f"[{section}]")
                key = leaf
            lines.append(f"{key} = {_random_value(rng)}")
        data = "\n".join(lines).encode("utf-8", "surrogatepass")
        if rng.random() < 0.15:  # a stray non-UTF-8 byte
            at = rng.randrange(len(data) + 1)
            data = data[:at] + bytes([rng.randrange(0x80, 0x100)]) + data[at:]
        path = tmp_path / f"fuzz{i}.toml"
        path.write_bytes(data)
        attempt(f"file {data[:120]!r}", lambda: load_recipe(str(path)))

    assert not failures, f"{len(failures)} unexpected exceptions, e.g.:\n" + "\n".join(failures[:10])
    assert loaded > 30, loaded  # the fuzz also reaches recipes that load, not only errors


def test_fuzz_values_are_finite_numbers_after_loading():
    # what loads holds no NaN/inf and no bool where a number is meant, whatever the override
    rng = random.Random(7)
    keys = ["optim.lr", "optim.eps", "model.logit_scale_init", "data.batch_size", "train.steps", "train.seed"]
    for _ in range(300):
        key = rng.choice(keys)
        try:
            r = load_recipe("tiny-shapes", [f"{key}={_random_value(rng)}"])
        except RecipeError:
            continue
        section, leaf = key.split(".")
        value = getattr(getattr(r, section), leaf)
        assert not isinstance(value, bool) and math.isfinite(value)
        assert not isinstance(value, int) or -2**63 <= value < 2**63
