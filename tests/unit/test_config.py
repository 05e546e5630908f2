"""Job specs: presets, overrides, unknown keys, the random-weights gate."""

import glob

import pytest

from pipeline.config import SpecError, apply_overrides, load_spec, parse_override

TINY = ["clip.model=zsad-tiny", "clip.weights=null", "allow_random_weights=true"]


@pytest.mark.parametrize("path", sorted(glob.glob("jobs/*.yaml")))
def test_every_preset_validates_and_runs_tiny(path):
    from pipeline.config import TrainSpec, is_training_spec

    model = TrainSpec if is_training_spec(path) else None  # jobs/train_*.yaml are zsad train specs
    spec = load_spec(path, model=model)
    assert spec.clip.model
    tiny = load_spec(path, TINY, model=model)
    assert tiny.clip.model == "zsad-tiny" and tiny.clip.weights is None and tiny.random_weights


def test_winclip_preset_contents():
    spec = load_spec("jobs/winclip.yaml")
    assert spec.clip.model == "ViT-B-16-plus-240" and spec.clip.weights.tag == "laion400m_e31"
    assert not spec.allow_random_weights and spec.max_error_rate == 0.05
    smoke = load_spec("jobs/smoke.yaml")
    assert smoke.score == spec.score  # same job, tiny model


def test_spec_is_frozen():
    spec = load_spec("jobs/smoke.yaml")
    with pytest.raises(Exception):
        spec.max_error_rate = 0.5


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("clip: {model: zsad-tiny, weights: null}\nallow_random_weights: true\nmax_eror_rate: 0.1\n")
    with pytest.raises(SpecError) as err:
        load_spec(p)
    assert str(p) in str(err.value) and "max_eror_rate: unknown key" in str(err.value)
    with pytest.raises(SpecError, match=r"score\.temprature: unknown key"):
        load_spec("jobs/smoke.yaml", ["score.temprature=0.1"])


def test_random_weights_gate_names_the_fix():
    with pytest.raises(SpecError, match="allow_random_weights: true"):
        load_spec("jobs/winclip.yaml", ["clip.weights=null"])


def test_override_value_types_and_errors():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(SpecError, match="dotted.key=value"):
        parse_override("novalue")
    with pytest.raises(SpecError, match="not a mapping"):
        apply_overrides({"a": 1}, ["a.b=2"])
    spec = load_spec("jobs/smoke.yaml", ["max_error_rate=0.5", "score.temperature=0.07"])
    assert spec.max_error_rate == 0.5 and spec.score.temperature == 0.07


def test_bad_values_are_reported(tmp_path):
    with pytest.raises(SpecError, match="max_error_rate"):
        load_spec("jobs/smoke.yaml", ["max_error_rate=2"])
    with pytest.raises(SpecError, match="max_actors"):
        load_spec("jobs/smoke.yaml", ["resources.clip_score.min_actors=3"])
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("clip: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_redacted_hides_secrets():
    spec = load_spec("jobs/smoke.yaml", ["storage.access_key_id=AKIA", "storage.secret_access_key=shh"])
    red = spec.redacted()
    assert red["storage"]["secret_access_key"] == "***" and "shh" not in str(red)


def test_sections_without_kind_take_the_default_kind(tmp_path):
    """Issue 11, defect 7: `score:` or `pixel:` without `kind` use the documented default kinds."""
    path = tmp_path / "job.yaml"
    path.write_text("clip: {model: zsad-tiny, weights: null}\nallow_random_weights: true\n"
                    "score: {prompt_set: vvv, temperature: 0.02}\npixel: {}\n")
    spec = load_spec(path)
    assert spec.score.kind == "winclip_zero_shot" and spec.score.prompt_set == "vvv" and spec.score.temperature == 0.02
    assert spec.pixel.kind == "none"
    path.write_text("clip: {model: zsad-tiny, weights: null}\nallow_random_weights: true\npixel: {window_sizes: [2]}\n")
    with pytest.raises(SpecError, match="pixel.window_sizes: unknown key"):  # kind none has no windows
        load_spec(path)


def test_setting_a_sections_kind_replaces_its_kind_specific_keys():
    """Issue 11, defect 7: `--set pixel.kind=fade_zero_shot` on a winclip_windows preset switches the
    method (the old kind's keys go); keys set after or before the kind on the command line stay."""
    spec = load_spec("jobs/smoke.yaml", ["pixel.kind=fade_zero_shot"])
    assert spec.pixel.kind == "fade_zero_shot" and spec.pixel.scales == (240, 448, 896)
    kind, scales = "pixel.kind=fade_zero_shot", "pixel.scales=[128]"
    for order in ([scales, kind], [kind, scales]):
        spec = load_spec("jobs/smoke.yaml", order)
        assert spec.pixel.kind == "fade_zero_shot" and spec.pixel.scales == (128,)
    same = load_spec("jobs/smoke.yaml", ["pixel.kind=winclip_windows"])  # same kind: the preset's keys stay
    assert same.pixel.window_sizes == (2, 3)
    fg = load_spec("jobs/vvv.yaml", ["foreground.kind=classical", "foreground.min_inside=0.7"])
    assert fg.foreground.kind == "classical" and fg.foreground.min_inside == 0.7  # not a per-kind section: kept


def test_report_section_defaults_and_colour_range():
    spec = load_spec("jobs/smoke.yaml")
    assert (spec.report.enabled, spec.report.top, spec.report.map_range) == (True, 6, "auto")
    spec = load_spec("jobs/smoke.yaml", ["report.enabled=false", "report.top=3", "report.map_range=0.2,0.9"])
    assert (spec.report.enabled, spec.report.top, spec.report.map_range) == (False, 3, "0.2,0.9")
    for bad in ("0.9,0.2", "low,high", "0.5"):
        with pytest.raises(SpecError, match="map_range"):
            load_spec("jobs/smoke.yaml", [f"report.map_range={bad}"])
    with pytest.raises(SpecError, match="top"):
        load_spec("jobs/smoke.yaml", ["report.top=0"])


def test_mutual_presets_and_rules(tmp_path):
    """MuSc presets: the reference's backbones, blocks, sizes and RsCIN windows; the rules binding
    pixel.kind, score.kind and the mutual section; the defaults the pixel kind implies."""
    musc, fast = load_spec("jobs/musc.yaml"), load_spec("jobs/musc_fast.yaml")
    assert (musc.clip.model, musc.clip.weights.tag, musc.pixel.layers, musc.pixel.image_size) == (
        "ViT-L-14-336", "openai", (6, 12, 18, 24), 518)
    assert (fast.clip.model, fast.clip.weights.tag, fast.pixel.layers, fast.pixel.image_size) == (
        "ViT-B-16-plus-240", "laion400m_e31", (3, 6, 9, 12), 240)
    for spec in (musc, fast):
        assert spec.pixel.degrees == (1, 3, 5) and spec.mutual.pool_size == 200 and spec.mutual.rscin
        assert spec.mutual.k_list is None and spec.mutual.windows("mvtec") == (1, 2, 3)  # by the layout, as MuSc
        assert spec.mutual.windows("visa") == (1, 8, 9) and spec.score.kind == "mutual"
        assert spec.map_range() == (0.0, 2.0)
    p = tmp_path / "job.yaml"
    p.write_text("clip: {model: zsad-tiny, weights: null}\nallow_random_weights: true\npixel: {kind: mutual}\n")
    implied = load_spec(str(p))
    assert implied.score.kind == "mutual" and implied.mutual.pool_size == 200 and implied.mutual.score == "rscin"
    bad = {
        "score.kind=winclip_zero_shot": "needs pixel.kind: mutual, score.kind: mutual",
        "mutual.rscin=false": "mutual.score rscin needs mutual.rscin",
        "pixel.degrees=[1,2]": "odd",
        "mutual.k_list=[0,2]": "k_list",
        "mutual.pool_size=3": "pool_size",
    }
    for override, text in bad.items():
        with pytest.raises(SpecError, match=text):
            load_spec("jobs/musc.yaml", [override])
    assert load_spec("jobs/musc.yaml", ["mutual.rscin=false", "mutual.score=raw"]).mutual.score == "raw"
    with pytest.raises(SpecError, match="needs pixel.kind: mutual"):
        load_spec("jobs/smoke.yaml", ["score.kind=mutual"])
    with pytest.raises(SpecError, match="remove the few_shot section"):
        load_spec("jobs/musc.yaml", ["few_shot.k=1"])


@pytest.mark.parametrize("path", sorted(glob.glob("jobs/*.yaml")))
def test_tiny_puts_every_model_section_of_a_preset_on_the_tiny_models(path):
    """--tiny (config.tiny_overrides): zsad-tiny CLIP with random weights, SAM tiny, adapter and map
    layers within zsad-tiny's 8 blocks at 128 px, FADE on small scales, no GPU request anywhere."""
    from pipeline.config import AprilGanAdapters, FadeZeroShot, MutualMaps, TrainSpec, is_training_spec

    training = is_training_spec(path)
    spec = load_spec(path, model=TrainSpec if training else None, tiny=True)
    assert spec.clip.model == "zsad-tiny" and spec.clip.weights is None and spec.clip.image_size is None
    assert spec.random_weights and spec.allow_random_weights
    assert all(getattr(spec.resources, name).num_gpus == 0 for name in type(spec.resources).model_fields)
    if training:
        assert list(spec.adapters.layers) == [2, 4, 6, 8] and spec.adapters.image_size == 128
        assert spec.train.use_gpu is False and "GPU" not in spec.train.resources_per_worker
        return
    assert spec.maps.map_size == 64
    if isinstance(spec.pixel, (AprilGanAdapters, MutualMaps)):
        assert list(spec.pixel.layers) == [2, 4, 6, 8] and spec.pixel.image_size == 128
    if isinstance(spec.pixel, AprilGanAdapters):
        assert spec.pixel.weights is None and "pixel.weights" in spec.random_models()
    if isinstance(spec.pixel, FadeZeroShot):
        assert max(spec.pixel.scales) <= 160 and spec.pixel.grid == 8 and spec.pixel.gem_depth == 2
    if spec.sam is not None:
        assert spec.sam.model == "tiny" and spec.sam.weights is None
    if spec.tiling is not None:
        assert spec.tiling.min_tile == 96 and spec.tiling.tile_map_size == 32
    # everything else is the preset's own
    full = load_spec(path)
    assert spec.score == full.score
    assert spec.few_shot == full.few_shot and spec.mutual == full.mutual and spec.sam_refine == full.sam_refine


def test_tiny_comes_before_the_commands_own_overrides():
    spec = load_spec("jobs/musc.yaml", ["pixel.layers=[2,4]", "maps.map_size=48", "resources.clip_score.num_gpus=0.5"],
                     tiny=True)
    assert list(spec.pixel.layers) == [2, 4] and spec.maps.map_size == 48 and spec.resources.clip_score.num_gpus == 0.5
    assert spec.clip.model == "zsad-tiny"


def test_runtime_executor_key():
    assert load_spec("jobs/smoke.yaml").runtime.executor == "ray"
    assert load_spec("jobs/smoke.yaml", ["runtime.executor=local"]).runtime.executor == "local"
    with pytest.raises(SpecError, match="runtime.executor"):
        load_spec("jobs/smoke.yaml", ["runtime.executor=dask"])


def test_presets_equal_the_reference_they_name():
    """Issue 29: winclip_fewshot is anomalib's WinClipModel (temperature 0.07, its 21 templates, the
    mean of the raw embeddings, the raw category name); aprilgan_fewshot draws as APRIL-GAN's
    published few-shot script (k 4, seed 42, torch.randint); fade_fewshot draws as FADE's run_fade.py
    (k 1, seed 0, its shuffling DataLoader); musc runs fp16 as MuSc's forward."""
    win = load_spec("jobs/winclip_fewshot.yaml")
    assert (win.score.temperature, win.score.prompt_set, win.score.aggregation, win.score.object_names.policy) == (
        0.07, "winclip_anomalib", "mean_raw", "raw")
    april = load_spec("jobs/aprilgan_fewshot.yaml").few_shot
    assert (april.k, april.seed, april.with_replacement, april.sampler) == (4, 42, True, "torch_randint")
    fade = load_spec("jobs/fade_fewshot.yaml").few_shot
    assert (fade.k, fade.seed, fade.with_replacement, fade.sampler) == (1, 0, False, "torch_shuffle")
    assert load_spec("jobs/musc.yaml").clip.precision == "fp16"


def test_spec_error_is_a_zsad_error_with_exit_code_2():
    """Issue 30: one error base; a spec that cannot be used exits 2 (and is still a ValueError)."""
    from pipeline.errors import ZsadError

    with pytest.raises(SpecError) as caught:
        load_spec("jobs/smoke.yaml", ["clip.weigths=null"])
    assert isinstance(caught.value, ZsadError) and isinstance(caught.value, ValueError)
    assert caught.value.exit_code == 2 and "clip.weigths: unknown key" in str(caught.value)
