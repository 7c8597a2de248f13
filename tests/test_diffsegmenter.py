"""DiffSegmenter on the tiny preset: outputs, vocabularies, batching, refinement, predictor."""
import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor

from conftest import patched  # tests/conftest.py
from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.data.datasets.register_sample import sample_image_path
from diffseg_d2.data.image import read_image_rgb
from diffseg_d2.diffusion import AttentionStore
from diffseg_d2.modeling.meta_arch.diffsegmenter import DROPPED_SCORE

VOCAB = ["background", "person", "chair", "bottle", "dining table"]


@pytest.fixture(scope="module")
def sample_rgb():
    return read_image_rgb(sample_image_path())  # (375, 500, 3) uint8, a real VOC photo


def _image(rgb):
    return torch.as_tensor(rgb).permute(2, 0, 1)


def _count_unet_calls(model, monkeypatch):
    calls = []
    original = model.diffusion.denoise  # the denoiser call every family's substrate has

    def counting(latents, step, context, **kwargs):
        calls.append(latents.shape[0])
        return original(latents, step, context, **kwargs)

    monkeypatch.setattr(model.diffusion, "denoise", counting)
    return calls


def test_default_predictor_returns_sem_seg_for_a_real_image(tiny_cfg_path, sample_rgb, model_device):
    cfg = get_diffseg_cfg(tiny_cfg_path, ["DATASETS.TEST", "()", "MODEL.DIFFSEG.VOCABULARY", str(VOCAB),
                                          "MODEL.DEVICE", model_device])
    predictor = DefaultPredictor(cfg)
    out = predictor(np.ascontiguousarray(sample_rgb[:, :, ::-1]))  # BGR, like cv2.imread
    sem_seg = out["sem_seg"]
    assert sem_seg.shape == (len(VOCAB), 375, 500)
    assert sem_seg.device.type == torch.device(model_device).type
    assert torch.all(sem_seg[0] == cfg.MODEL.DIFFSEG.BACKGROUND_THRESHOLD)
    kept = sem_seg[1:].flatten(1).max(dim=1).values > DROPPED_SCORE
    assert kept.any()
    for channel in sem_seg[1:][kept]:  # per-class min-max normalised maps
        assert channel.min() == 0 and abs(float(channel.max()) - 1) < 1e-5


def test_vocabulary_comes_from_the_test_dataset_metadata(tiny_model):
    from detectron2.data import MetadataCatalog

    assert tiny_model.vocabulary == MetadataCatalog.get("diffseg_sample_voc").stuff_classes
    assert len(tiny_model.vocabulary) == 21


def test_output_is_deterministic_and_at_the_requested_size(tiny_model, sample_rgb):
    x = {"image": _image(sample_rgb), "height": 150, "width": 200, "vocabulary": VOCAB}
    a = tiny_model([x])[0]["sem_seg"]
    b = tiny_model([x])[0]["sem_seg"]
    assert a.shape == (5, 150, 200)
    torch.testing.assert_close(a, b)


def test_call_time_vocabulary_overrides_the_model_vocabulary(tiny_model, sample_rgb):
    out = tiny_model([{"image": _image(sample_rgb), "vocabulary": ["cat", "dog"]}])[0]["sem_seg"]
    assert out.shape == (2, 375, 500)  # no background class given -> no background channel
    assert len(tiny_model.vocabulary) == 21  # the model's own vocabulary is unchanged


def test_one_unet_call_per_image_whatever_the_number_of_classes(tiny_model, sample_rgb, monkeypatch):
    calls = _count_unet_calls(tiny_model, monkeypatch)
    with patched(tiny_model, category_filter=None, conditioning="shared"):
        for n in (1, 5, 20):
            names = tiny_model.vocabulary[1 : 1 + n]
            tiny_model([{"image": _image(sample_rgb), "vocabulary": names}])
    assert calls == [1, 1, 1]


def test_per_class_conditioning_batches_prompts_in_chunks(tiny_model, sample_rgb, monkeypatch):
    calls = _count_unet_calls(tiny_model, monkeypatch)
    x = {"image": _image(sample_rgb), "vocabulary": tiny_model.vocabulary[1:]}  # 20 classes
    with patched(tiny_model, category_filter=None, conditioning="per_class", class_chunk_size=8):
        chunked = tiny_model([x])[0]["sem_seg"]
    assert calls == [8, 8, 4]
    with patched(tiny_model, category_filter=None, conditioning="per_class", class_chunk_size=20):
        whole = tiny_model([x])[0]["sem_seg"]
    assert calls[3:] == [20]
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)


def test_combination_weights_and_self_attention_refinement(tiny_model):
    """_combine = sum_f w_f * minmax(upsampled map_f), then M = S c."""
    model = tiny_model
    store = AttentionStore((16, 16), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    torch.manual_seed(0)
    per_factor = {f: torch.rand(2, *store.resolution(f)) for f in model.cross_attn_factors}
    for f, maps in per_factor.items():
        store.add_cross(f, slice(0, 2), maps.flatten(1))
    attn = torch.softmax(torch.randn(256, 256), dim=-1)
    store.add_self(1, attn, count=1)

    def minmax(m):
        lo = m.flatten(1).min(1).values[:, None, None]
        hi = m.flatten(1).max(1).values[:, None, None]
        return (m - lo) / (hi - lo)

    c = sum(
        w * minmax(torch.nn.functional.interpolate(per_factor[f][None], size=(16, 16), mode="bilinear")[0])
        for f, w in zip(model.cross_attn_factors, model.cross_attn_weights)
    )
    expected = torch.einsum("ij,kj->ki", attn, c.flatten(1)).view(2, 16, 16)
    torch.testing.assert_close(model._combine(store), expected, atol=1e-5, rtol=1e-5)


def test_refinement_changes_the_maps(tiny_model, sample_rgb, monkeypatch):
    x = {"image": _image(sample_rgb), "vocabulary": ["person", "chair"]}
    with patched(tiny_model, category_filter=None):
        refined = tiny_model([x])[0]["sem_seg"]
        with patched(tiny_model, refine=False):
            raw = tiny_model([x])[0]["sem_seg"]
    assert not torch.allclose(refined, raw)


def test_category_filter_drops_classes(tiny_model, sample_rgb):
    with patched(tiny_model.category_filter, top_k=1, threshold=0.0):
        out = tiny_model([{"image": _image(sample_rgb), "vocabulary": VOCAB}])[0]["sem_seg"]
    dropped = [k for k in range(1, 5) if torch.all(out[k] == DROPPED_SCORE)]
    assert len(dropped) == 3  # exactly one prompted class is kept
    assert set(out.argmax(0).unique().tolist()) <= {0} | (set(range(1, 5)) - set(dropped))


def test_reference_mode_runs_unet_passes_only_for_kept_classes(tiny_model, sample_rgb, monkeypatch):
    """As the reference, which loops over each image's listed classes only: one pass per kept class."""
    batch_sizes = _count_unet_calls(tiny_model, monkeypatch)
    assert (tiny_model.conditioning, tiny_model.refinement) == ("per_class", "own")
    with patched(tiny_model.category_filter, top_k=2, threshold=0.0):
        out = tiny_model([{"image": _image(sample_rgb), "vocabulary": VOCAB}])[0]["sem_seg"]
    assert sum(batch_sizes) == 2
    assert sum(bool(torch.all(out[k] == DROPPED_SCORE)) for k in range(1, 5)) == 2


def test_category_filter_threshold_and_top_k(tiny_model, sample_rgb):
    flt = tiny_model.category_filter
    names = tiny_model.vocabulary[1:]
    probs = flt.clip.class_probabilities(_image(sample_rgb).float()[None], names)[0]
    assert torch.isclose(probs.sum(), torch.tensor(1.0))
    keep = flt(_image(sample_rgb).float(), names)
    expected = probs >= flt.threshold
    expected[probs.argmax()] = True
    assert torch.equal(keep, expected)


def test_text_embeddings_are_cached_per_vocabulary(tiny_model, sample_rgb, monkeypatch):
    calls = []
    original = tiny_model.diffusion.encode_text

    def counting(ids, *args):
        calls.append(ids.shape[0])
        return original(ids, *args)

    monkeypatch.setattr(tiny_model.diffusion, "encode_text", counting)
    x = {"image": _image(sample_rgb), "vocabulary": ["lamp", "table", "window"]}
    with patched(tiny_model, category_filter=None, conditioning="shared"):
        tiny_model([x])
        tiny_model([x])
    # class prompts (3) and the one-prompt carrier (1) are encoded once for both images
    assert calls == [3, 1]


def test_every_registered_vocabulary_is_valid_and_promptable(tiny_model):
    """Each dataset's classes are unique, and each name sits whole in its prompt under the CLIP tokenizer."""
    from detectron2.data import MetadataCatalog

    from diffseg_d2.data.datasets import registered_diffseg_datasets
    from diffseg_d2.vocabulary import background_index, parse_vocabulary

    for name in registered_diffseg_datasets():
        classes = MetadataCatalog.get(name).stuff_classes
        assert parse_vocabulary(classes) == list(classes), name
        bg = background_index(classes)
        prompted = tuple(c for i, c in enumerate(classes) if i != bg)
        prompts, context = tiny_model._vocabulary_prompts(prompted)
        assert context.shape[0] == len(prompted) and (prompts.token_weight.sum(1) - 1).abs().max() < 1e-5


def test_a_150_class_vocabulary_in_one_pass(tiny_model, sample_rgb, monkeypatch):
    from detectron2.data import MetadataCatalog

    calls = _count_unet_calls(tiny_model, monkeypatch)
    names = MetadataCatalog.get("diffseg_ade150_val").stuff_classes
    with patched(tiny_model, category_filter=None, conditioning="shared"):
        out = tiny_model([{"image": _image(sample_rgb), "vocabulary": names}])[0]["sem_seg"]
    assert out.shape == (150, 375, 500) and calls == [1]


def test_a_seed_draws_the_same_noise_whatever_the_models_device(tiny_model, sample_rgb, monkeypatch):
    """The VAE sample and the noise come from a CPU generator and are moved, as diffusers draws its
    latents: a generator on the model's device would give other numbers on CUDA than on the CPU for
    the same SEED. Shown by reporting another device for the model: the draws do not change."""
    from diffseg_d2.modeling.meta_arch.diffsegmenter import DiffSegmenter

    image = torch.from_numpy(sample_rgb).permute(2, 0, 1).float()
    expected = tiny_model.noisy_latents(image)
    monkeypatch.setattr(DiffSegmenter, "device", property(lambda self: torch.device("meta")))
    torch.testing.assert_close(tiny_model.noisy_latents(image), expected, rtol=0, atol=0)


def test_the_carrier_template_has_one_default():
    from diffseg_d2.config import CARRIER_TEMPLATE
    from diffseg_d2.modeling.meta_arch.diffsegmenter import DiffSegmenter

    cfg = get_diffseg_cfg()
    assert cfg.MODEL.DIFFSEG.CARRIER_TEMPLATE == CARRIER_TEMPLATE
    assert DiffSegmenter.__init__.__wrapped__.__kwdefaults__["carrier_template"] == CARRIER_TEMPLATE


def _write_class_lists(path, entries):
    import json

    path.write_text(json.dumps(entries, indent=4))
    return path


def test_the_references_class_lists_choose_the_prompted_classes(tiny_cfg_path, sample_rgb, tmp_path, monkeypatch):
    """CATEGORY_FILTER.CLASS_LISTS: the reference's label file (tables of image -> prompt words),
    matched by the input's file name; its prompt words ("people", "table") map back to the classes
    through PROMPT_NAMES; the image and text tables are joined; only listed classes are prompted."""
    from detectron2.modeling import build_model

    lists = _write_class_lists(tmp_path / "predict_syn_txt_0.8_img_0.97.json", {
        "synonym_matching": {"/data/VOC2012/JPEGImages/2007_000129.jpg": ["bicycle", "people", "dog"]},
        "image_similarity": {"/data/VOC2012/JPEGImages/2007_000129.jpg": ["people"],
                             "/data/VOC2012/JPEGImages/2007_000033.jpg": ["plane"]},
        "text_similarity": {"/data/VOC2012/JPEGImages/2007_000129.jpg": ["table", "people"],
                            "/data/VOC2012/JPEGImages/2007_000033.jpg": []},
    })
    cfg = get_diffseg_cfg(tiny_cfg_path, ["MODEL.DIFFSEG.CATEGORY_FILTER.CLASS_LISTS", str(lists),
                                          "MODEL.DIFFSEG.PROMPT_NAMES", "['person=people', 'dining table=table']"])
    model = build_model(cfg).eval()
    assert model.category_filter is None  # the CLIP filter is not even loaded
    names = ["background", "person", "dining table", "dog", "bicycle"]
    calls = _count_unet_calls(model, monkeypatch)
    image = _image(sample_rgb)
    out = model([{"image": image, "file_name": "elsewhere/2007_000129.jpg", "vocabulary": names}])[0]["sem_seg"]
    assert sum(calls) == 2  # person and dining table: the image and text tables, not synonym_matching
    dropped = [k for k in range(len(names)) if torch.all(out[k] == DROPPED_SCORE)]
    assert dropped == [3, 4]
    with pytest.raises(ValueError, match="no entry for the image '2008_000002.jpg'"):
        model([{"image": image, "file_name": "2008_000002.jpg", "vocabulary": names}])
    with pytest.raises(ValueError, match="need each input's 'file_name'"):
        model([{"image": image, "vocabulary": names}])


def test_a_class_list_file_that_cannot_be_used_is_named(tiny_cfg_path, tmp_path):
    from detectron2.modeling import build_model

    from diffseg_d2.modeling.meta_arch.class_lists import ClassListError

    for content, message in (("{not json", "cannot be read as JSON"),
                             ('{"image_similarity": {}}', "no table \\['text_similarity'\\]"),
                             ('{"image_similarity": {"a.jpg": "dog"}, "text_similarity": {}}', "not a list of class words")):
        path = tmp_path / "lists.json"
        path.write_text(content)
        with pytest.raises(ClassListError, match=message):
            build_model(get_diffseg_cfg(tiny_cfg_path, ["MODEL.DIFFSEG.CATEGORY_FILTER.CLASS_LISTS", str(path)]))
