"""Every bad input of the issue gets a clear error (and nothing half-written), or a documented conversion."""
import shutil

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.data.image import read_image_rgb
from diffseg_d2.diffusion import build_class_prompts
from diffseg_d2.pretrained.stable_diffusion import resolve_sd_weights
from diffseg_d2.vocabulary import VocabularyError, parse_vocabulary
from diffseg_d2.pretrained.weights import MissingWeightsError


# ---------------------------------------------------------------- vocabularies
@pytest.mark.parametrize("names", ["", " , ", [], ["", ""]])
def test_empty_vocabulary(names):
    with pytest.raises(VocabularyError, match="empty"):
        parse_vocabulary(names)


def test_duplicate_names_are_listed():
    with pytest.raises(VocabularyError, match=r"more than once: \['Cat'\]"):
        parse_vocabulary("cat, dog, Cat")


@pytest.mark.parametrize("name", ["\u200b", "\x00\x01", " \ufeff "])
def test_a_name_that_tokenises_to_nothing(name):
    with pytest.raises(VocabularyError, match="tokenises to nothing"):
        parse_vocabulary(["cat", name])


def test_build_class_prompts_refuses_a_name_the_tokenizer_drops(tiny_sd):
    class DroppingTokenizer:  # a tokenizer that removes unknown words, as some do
        model_max_length, pad_token_id, eos_token_id = 77, 0, 0

        def __call__(self, text, add_special_tokens=True):
            ids = [1 for w in text.split() if w.isascii()]
            return type("Out", (), {"input_ids": ids})

    with pytest.raises(VocabularyError, match="tokenises to nothing"):
        build_class_prompts(DroppingTokenizer(), ["日本"], "a photo of {}.")


def test_prompt_longer_than_the_text_encoder_context(tiny_model):
    long_name = " ".join(["very"] * 80) + " long cat"
    with pytest.raises(VocabularyError, match="more than the text encoder's context of 77"):
        tiny_model.set_vocabulary(["dog", long_name])
    assert tiny_model.vocabulary is not None and long_name not in tiny_model.vocabulary  # unchanged


def test_template_without_a_slot(tiny_sd):
    with pytest.raises(VocabularyError, match="has no '\\{\\}'"):
        build_class_prompts(tiny_sd.tokenizer, ["cat"], "a photo")


def test_subword_names_select_all_their_tokens(tiny_sd):
    prompts = build_class_prompts(tiny_sd.tokenizer, ["tvmonitor", "cat"], "a photograph of {}.")
    ids = prompts.input_ids
    n_tv = int((prompts.token_weight[0] > 0).sum())
    assert n_tv == 2  # "tv" + "monitor" sub-words
    name_ids = tiny_sd.tokenizer("tvmonitor", add_special_tokens=False).input_ids
    assert ids[0, prompts.token_index[0, :n_tv]].tolist() == name_ids
    torch.testing.assert_close(prompts.token_weight[0, :n_tv].sum(), torch.tensor(1.0))


# ---------------------------------------------------------------- weights
def test_missing_weights_folder_names_the_config_key(tiny_cfg_path, tmp_path):
    cfg = get_diffseg_cfg(tiny_cfg_path, ["MODEL.DIFFSEG.SD.WEIGHTS", str(tmp_path / "nowhere")])
    with pytest.raises(MissingWeightsError, match="MODEL.DIFFSEG.SD.WEIGHTS"):
        build_model(cfg)
    cfg = get_diffseg_cfg(tiny_cfg_path, ["MODEL.DIFFSEG.CLIP.WEIGHTS", str(tmp_path / "nowhere")])
    with pytest.raises(MissingWeightsError, match="MODEL.DIFFSEG.CLIP.WEIGHTS"):
        build_model(cfg)


def test_incomplete_weights_folder_names_what_is_missing(tiny_cfg_path, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(resolve_sd_weights("tiny").path, folder)
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    cfg = get_diffseg_cfg(tiny_cfg_path, ["MODEL.DIFFSEG.SD.WEIGHTS", str(folder)])
    with pytest.raises(MissingWeightsError, match=r"incomplete: missing unet/\*\.safetensors.*MODEL.DIFFSEG.SD.WEIGHTS|MODEL.DIFFSEG.SD.WEIGHTS.*incomplete: missing unet/\*\.safetensors"):
        build_model(cfg)


@pytest.mark.slow
def test_unreachable_hub_id_names_the_config_key(tiny_cfg_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = get_diffseg_cfg(tiny_cfg_path, ["MODEL.DIFFSEG.SD.WEIGHTS", "no-such-org/no-such-model"])
    with pytest.raises(MissingWeightsError, match="hub id 'no-such-org/no-such-model' \\(MODEL.DIFFSEG.SD.WEIGHTS\\)"):
        build_model(cfg)


def test_a_local_copy_loads_through_the_same_code(tiny_cfg_path, tmp_path):
    folder = tmp_path / "my-sd"
    shutil.copytree(resolve_sd_weights("tiny").path, folder)
    cfg = get_diffseg_cfg(tiny_cfg_path, ["MODEL.DIFFSEG.SD.WEIGHTS", str(folder), "DATASETS.TEST", "()",
                                          "MODEL.DIFFSEG.CATEGORY_FILTER.ENABLED", "False"])
    model = build_model(cfg).eval()
    out = model([{"image": torch.zeros(3, 40, 60), "vocabulary": ["cat"]}])[0]["sem_seg"]
    assert out.shape == (1, 40, 60)


# ---------------------------------------------------------------- datasets
def test_unknown_dataset_name(tiny_cfg_path):
    cfg = get_diffseg_cfg(tiny_cfg_path, ["DATASETS.TEST", "('diffseg_no_such_set',)"])
    with pytest.raises(KeyError, match="diffseg_no_such_set.*diffseg_sample_voc"):
        build_model(cfg)


# ---------------------------------------------------------------- images
def _save(tmp_path, name, array, mode=None):
    path = tmp_path / name
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return str(path)


def test_grayscale_rgba_and_16bit_images_are_converted(tmp_path):
    gray = _save(tmp_path, "g.png", np.full((6, 8), 100, np.uint8))
    assert read_image_rgb(gray).shape == (6, 8, 3) and (read_image_rgb(gray) == 100).all()

    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :4, 3] = 255  # left half opaque red, right half transparent
    out = read_image_rgb(_save(tmp_path, "a.png", rgba))
    assert out.shape == (6, 8, 3)
    assert out[0, 0].tolist() == [200, 0, 0] and out[0, 7].tolist() == [255, 255, 255]

    sixteen = np.full((6, 8), 65535, np.uint16)
    sixteen[:, :4] = 257 * 10
    path16 = str(tmp_path / "s.png")
    Image.fromarray(sixteen).save(path16)
    out = read_image_rgb(path16)
    assert out.dtype == np.uint8 and out[0, 0].tolist() == [10, 10, 10] and out[0, 7].tolist() == [255] * 3


def test_unreadable_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="Could not read the image .*broken.jpg"):
        read_image_rgb(str(bad))


@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 30, 40), (4, 30, 40), (3, 1200, 1600)])
def test_tiny_huge_and_odd_channel_images(tiny_model, shape):
    image = torch.randint(0, 256, shape, dtype=torch.uint8)
    out = tiny_model([{"image": image, "vocabulary": ["background", "cat"]}])[0]["sem_seg"]
    assert out.shape == (2, shape[1], shape[2])
    assert torch.isfinite(out).all()


def test_a_malformed_image_tensor(tiny_model):
    with pytest.raises(ValueError, match="shape \\(C, H, W\\)"):
        tiny_model([{"image": torch.zeros(2, 10, 10), "vocabulary": ["cat"]}])


def test_float16_is_cuda_only_and_bad_dtypes_are_refused(tiny_sd):
    from diffseg_d2.diffusion import FrozenStableDiffusion
    from diffseg_d2.pretrained.stable_diffusion import StableDiffusionParts

    parts = StableDiffusionParts(tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder, tiny_sd.tokenizer, tiny_sd.scheduler)
    half = FrozenStableDiffusion(parts, dtype="float16").to("cpu")
    assert half.dtype == torch.float32  # float16 on CPU: the parts stay float32 (bfloat16 is honoured)
    assert not any(p.requires_grad for p in half.parameters())
    half.train()
    assert not half.training and not half.unet.training  # frozen parts stay in eval mode
    with pytest.raises(ValueError, match="MODEL.DIFFSEG.SD.DTYPE"):
        FrozenStableDiffusion(parts, dtype="float8")
