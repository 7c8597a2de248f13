"""Caption augmentation with a tiny random BLIP saved to a temp folder and loaded like a real one."""

import pytest
import torch
from detectron2.modeling import build_model

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.pretrained.blip import BlipCaptioner

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "cat", "dog", "people", "sitting"]


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("blip")
    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = transformers.BertTokenizer(str(root / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    processor = transformers.BlipProcessor(
        image_processor=transformers.BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    config = transformers.BlipConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, bos_token_id=5, pad_token_id=0, sep_token_id=3, eos_token_id=3,
                         encoder_hidden_size=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    folder = root / "tiny-blip"
    transformers.BlipForConditionalGeneration(config).save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return str(folder)


def test_captioner_loads_from_a_folder_and_writes_words_of_its_vocabulary(blip_folder):
    captioner = BlipCaptioner.from_weights(blip_folder, max_new_tokens=4)
    caption = captioner(torch.randint(0, 256, (3, 40, 50)).float())
    assert caption and set(caption.split()) <= set(WORDS[6:])


def _spy_prompts(monkeypatch):
    # the cross-attention families' substrate builds DiffSegmenter's class prompts
    from diffseg_d2.diffusion import cross_attention_substrate as substrate

    seen = []
    original = substrate.build_class_prompts

    def spy(*args, **kwargs):
        prompts = original(*args, **kwargs)
        seen.extend(prompts.prompts)
        return prompts

    monkeypatch.setattr(substrate, "build_class_prompts", spy)
    return seen


def _model(tiny_cfg_path, blip_folder, conditioned):
    cfg = get_diffseg_cfg(tiny_cfg_path, [
        "MODEL.DIFFSEG.CAPTION.ENABLED", "True", "MODEL.DIFFSEG.CAPTION.WEIGHTS", blip_folder,
        "MODEL.DIFFSEG.CAPTION.MAX_NEW_TOKENS", "4", "MODEL.DIFFSEG.CAPTION.CONDITIONED", str(conditioned),
        "MODEL.DIFFSEG.CATEGORY_FILTER.ENABLED", "False", "MODEL.DIFFSEG.PROMPT_TEMPLATE", "a photo of {}",
        "DATASETS.TEST", "()",
    ])
    return build_model(cfg).eval()


def test_each_class_prompt_is_continued_by_a_caption_generated_from_it(tiny_cfg_path, blip_folder, monkeypatch):
    """The reference: BLIP captions the image starting from each class prompt; what it adds
    (the decoded caption minus the prompt's length) follows the class word."""
    model = _model(tiny_cfg_path, blip_folder, conditioned=True)
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    full = [model.captioner._generate(model.captioner._inputs(image.float(), f"a photo of {n}")) for n in ("cat", "dog")]
    assert all(f.startswith(f"a photo of {n}") for f, n in zip(full, ("cat", "dog")))
    seen = _spy_prompts(monkeypatch)
    out = model([{"image": image, "vocabulary": ["background", "cat", "dog"]}])[0]["sem_seg"]
    assert out.shape == (3, 60, 80)
    assert seen[-2:] == full  # prompt + continuation, i.e. the whole generated caption
    assert any(len(f) > len("a photo of dog") for f in full)  # BLIP did add words


def test_one_unconditioned_caption_is_appended_to_every_class_prompt(tiny_cfg_path, blip_folder, monkeypatch):
    model = _model(tiny_cfg_path, blip_folder, conditioned=False)
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    caption = model.captioner(image.float())
    seen = _spy_prompts(monkeypatch)
    out = model([{"image": image, "vocabulary": ["background", "cat", "dog"]}])[0]["sem_seg"]
    assert out.shape == (3, 60, 80)
    assert seen[-2:] == [f"a photo of cat {caption}", f"a photo of dog {caption}"]
