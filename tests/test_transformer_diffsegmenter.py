"""DiffSegmenter on the diffusion transformers (SD3's MMDiT, FLUX.1): through DefaultPredictor from the weights
key alone, class maps equal to the materialised attention of each class's own pass, row blocks, and the
configuration errors."""
import numpy as np
import pytest
import torch

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.diffusion import JointAttentionStore, minmax_per_map

TINY_DIFFSEG = "configs/tiny/diffsegmenter.yaml"
# The block each test reads: SD3's second joint block, FLUX's last single-stream block (one concatenated
# sequence, text first).
BLOCK = {"tiny-sd3": "transformer_blocks.1", "tiny-flux": "single_transformer_blocks.1"}
NAMES = ["cat", "dog", "red car"]


def _cfg(weights, *opts):
    return get_diffseg_cfg(TINY_DIFFSEG, ["MODEL.DIFFSEG.SD.WEIGHTS", weights, "DATASETS.TEST", "()",
                                          "MODEL.DIFFSEG.CATEGORY_FILTER.ENABLED", "False", *opts])


def _model(weights, *opts):
    from detectron2.modeling import build_model

    return build_model(_cfg(weights, "MODEL.DIFFSEG.TRANSFORMER.BLOCKS", f"['{BLOCK[weights]}']",
                            "MODEL.DIFFSEG.TRANSFORMER.REFINE_BLOCKS", f"['{BLOCK[weights]}']", *opts)).eval()


def _spy_records(monkeypatch) -> list:
    """Every ``JointAttentionStore.record`` call from now on, as ``(query, key, image, text, store)`` (copies of
    the tensors); the recording itself runs unchanged."""
    seen = []
    record = JointAttentionStore.record

    def spy(self, name, query, key, image, text):
        seen.append((query.clone(), key.clone(), image, text, self))
        return record(self, name, query, key, image, text)

    monkeypatch.setattr(JointAttentionStore, "record", spy)
    return seen


def _image(seed=0, shape=(3, 64, 64)):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8))


@pytest.mark.parametrize("weights, family", [("tiny-sd3", "sd3"), ("tiny-flux", "flux-dev")])
def test_diffsegmenter_segments_with_each_transformer_family_through_default_predictor(weights, family):
    from detectron2.engine import DefaultPredictor

    cfg = _cfg(weights, "MODEL.DIFFSEG.VOCABULARY", "['background', 'cat', 'dog']",
               "MODEL.DIFFSEG.TRANSFORMER.REFINE_BLOCKS", f"['{BLOCK[weights]}']")
    predictor = DefaultPredictor(cfg)
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)  # not square
    scores = predictor(image)["sem_seg"]
    assert scores.shape == (3, 48, 80) and torch.isfinite(scores).all()
    assert predictor.model.diffusion.family.name == family
    # Every joint-attention block is read when none is named.
    assert len(predictor.model.transformer_blocks) == {"sd3": 2, "flux-dev": 4}[family]
    # Each prompted class's scores span [0, 1] (min-max after upsampling); background is the constant.
    assert torch.all(scores[0] == 0.4)
    torch.testing.assert_close(scores[1:].amax((1, 2)), torch.ones(2))


@pytest.mark.parametrize("weights", ["tiny-sd3", "tiny-flux"])
def test_class_maps_are_each_class_pass_attention_materialised(weights, monkeypatch):
    """The maps equal what the full (B, H, S, S) softmax of the read block gives: class k's word tokens'
    probabilities for every image query (normalised over ALL keys, mean over heads), min-max normalised,
    then multiplied by the image-to-image part of the same pass's attention. Two chunks (2 + 1 classes)
    check that each class is read and refined from its own batch element."""
    model = _model(weights, "MODEL.DIFFSEG.CLASS_CHUNK_SIZE", "2", "MODEL.DIFFSEG.TOKEN_SELECTION", "mean")
    seen = _spy_records(monkeypatch)
    with torch.no_grad():
        maps = model.class_maps(_image(), NAMES, [0, 1, 2])
    assert len(seen) == 2  # one record per chunk's pass: the block is read once per call
    prompts, _ = model._vocabulary_prompts(tuple(NAMES))
    expected = []
    for query, key, image, text, _ in seen:
        probs = (query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5).softmax(-1)  # (B, H, S, S)
        for b in range(query.shape[0]):
            k = len(expected)
            cols = prompts.token_index[k] + text.start
            m = (probs[b][:, image][:, :, cols] * prompts.token_weight[k]).sum(-1).mean(0)
            m = minmax_per_map(m[None])[0]
            expected.append(probs[b][:, image][:, :, image].mean(0) @ m)
    torch.testing.assert_close(maps.flatten(1), torch.stack(expected), rtol=1e-5, atol=1e-6)
    # The read positions are the class words' own T5 pieces, in the T5 part of the text sequence.
    d = model.diffusion
    t5 = d.text_layout.segments["t5"]
    for k, name in enumerate(NAMES):
        idx = prompts.token_index[k][prompts.token_weight[k] > 0]
        assert idx.min() >= t5.start and idx.max() < t5.stop
        pieces = d.t5_tokenizer.convert_ids_to_tokens(prompts.input_ids.sequence[k, idx].tolist())
        assert "".join(pieces).replace("\u2581", " ").strip() == name


def test_sd3_reads_the_clip_segment_when_asked():
    model = _model("tiny-sd3", "MODEL.DIFFSEG.TRANSFORMER.TEXT_SEGMENT", "clip")
    prompts, _ = model._vocabulary_prompts(tuple(NAMES))
    clip = model.diffusion.text_layout.segments["clip"]
    assert prompts.token_index.max() < clip.stop
    tokenizer = model.diffusion.clip_tokenizers[0]
    first = tokenizer.convert_ids_to_tokens(prompts.input_ids.sequence[0, prompts.token_index[0, 0]].item())
    assert first == "cat</w>"


def test_shared_conditioning_reads_every_class_from_one_prompt(monkeypatch):
    model = _model("tiny-flux", "MODEL.DIFFSEG.CONDITIONING", "shared")
    seen = _spy_records(monkeypatch)
    with torch.no_grad():
        maps = model.class_maps(_image(), NAMES, [0, 1, 2])
    assert [q.shape[0] for q, *_ in seen] == [1] and maps.shape == (3, 8, 8)
    assert not torch.allclose(maps[0], maps[1])


def test_transformer_settings_are_checked_with_the_blocks_named():
    from detectron2.modeling import build_model

    with pytest.raises(ValueError, match=r"TRANSFORMER.BLOCKS names \['transformer_blocks.9'\].*single_transformer_blocks.1"):
        build_model(_cfg("tiny-flux", "MODEL.DIFFSEG.TRANSFORMER.BLOCKS", "['transformer_blocks.9']"))
    with pytest.raises(ValueError, match=r"TEXT_SEGMENT = 'clip'.*\['t5'\]"):
        build_model(_cfg("tiny-flux", "MODEL.DIFFSEG.TRANSFORMER.TEXT_SEGMENT", "clip"))
    with pytest.raises(ValueError, match="DIRECTION must be one of"):
        build_model(_cfg("tiny-sd3", "MODEL.DIFFSEG.TRANSFORMER.DIRECTION", "sideways"))
    with pytest.raises(ValueError, match="IMAGE_SIZE = 120 must be a positive multiple of 16"):
        build_model(_cfg("tiny-sd3", "MODEL.DIFFSEG.IMAGE_SIZE", "120"))


@pytest.mark.parametrize("weights", ["tiny-sd3", "tiny-flux"])
def test_daam_sums_every_blocks_attention_over_its_timesteps(weights, monkeypatch):
    """DAAM on a transformer: one prompt naming every class; each class's map is the mean over blocks and heads
    of its words' image-to-text probabilities (the materialised softmax of each block), summed over the
    timesteps, each a noising of the same latents with the same noise sample."""
    from detectron2.modeling import build_model

    cfg = _cfg(weights, "MODEL.META_ARCHITECTURE", "DAAM", "MODEL.DIFFSEG.DAAM.TIMESTEPS", "[700, 300]")
    model = build_model(cfg).eval()
    seen = _spy_records(monkeypatch)
    with torch.no_grad():
        maps = model.class_maps(_image(), NAMES, [0, 1, 2])
    layers = len(model.transformer_blocks)
    assert len(seen) == 2 * layers and all(q.shape[0] == 1 for q, *_ in seen)
    prompts, _ = model._vocabulary_prompts(tuple(NAMES))
    assert len(set(prompts.prompts)) == 1 and all(n in prompts.prompts[0] for n in NAMES)
    expected = 0
    for query, key, image, text, _ in seen:
        probs = (query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5).softmax(-1)[0]
        cols = prompts.token_index + text.start  # (K, T)
        expected = expected + (probs[:, image][:, :, cols] * prompts.token_weight).sum(-1).mean(0).T / layers
    torch.testing.assert_close(maps.flatten(1), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weights", ["tiny-sd3", "tiny-flux"])
def test_freeda_bank_builder_localises_nouns_on_each_transformer_family(weights, monkeypatch):
    """The bank builder generates with the transformer and reads each noun's T5 tokens from the prompted half
    of every step's call: the noun maps are the blocks' and steps' mean image-to-text attention."""
    from diffseg_d2.freeda.builder import PrototypeBankBuilder

    builder = PrototypeBankBuilder.from_config(get_diffseg_cfg("configs/tiny/freeda.yaml", [
        "MODEL.DIFFSEG.SD.WEIGHTS", weights, "MODEL.DIFFSEG.FREEDA.BUILD.NOUNS", "list",
        "MODEL.DIFFSEG.FREEDA.BUILD.NOUN_LIST", "configs/tiny/freeda_nouns.txt", "MODEL.DIFFSEG.FREEDA.BUILD.STEPS", "2",
        "MODEL.DIFFSEG.FREEDA.BUILD.IMAGE_SIZE", "128"])).eval()
    seen = _spy_records(monkeypatch)
    rows = builder.caption_prototypes(0, "a dog on a sofa")
    assert rows.nouns == ["dog", "sofa"] and rows.image.shape == (3, 128, 128)
    assert torch.isfinite(rows.prototypes).all() and torch.isfinite(rows.keys).all()
    # SD3 guides with classifier-free guidance (a batch of 2, read from element 0); FLUX dev reads its guidance.
    blocks = len(builder.transformer_blocks)
    assert [(q.shape[0], store.per_element) for q, _, _, _, store in seen] == \
        [(2 if weights == "tiny-sd3" else 1, False)] * (2 * blocks)
    ids, kept, positions = builder._noun_tokens("a dog on a sofa", ["dog", "sofa", "whale"])
    assert kept == ["dog", "sofa"]
    t5 = builder.diffusion.text_layout.segments["t5"]
    assert all(t5.start <= p < t5.stop for pos in positions for p in pos)
    assert builder.spec(["a dog on a sofa"])["build"]["transformer_blocks"] == builder.transformer_blocks


def test_odise_refuses_a_diffusion_transformer_before_loading_it():
    """Refused from the weights string (quoted in the message), before the model is loaded; a transformer
    substrate handed to the backbone directly is refused by its family."""
    from detectron2.modeling import build_model

    from diffseg_d2.diffusion import load_diffusion
    from diffseg_d2.modeling.backbone.diffusion_unet import DiffusionUNetBackbone

    with pytest.raises(ValueError, match=r"ODISE's backbone taps a UNet's decoder blocks.*'tiny-flux' is a diffusion "
                                         r"transformer.*Use Stable Diffusion 1\.x, 2\.x or XL weights"):
        build_model(get_diffseg_cfg("configs/tiny/odise.yaml", ["MODEL.DIFFSEG.SD.WEIGHTS", "tiny-flux"]))
    with pytest.raises(ValueError, match=r"= FLUX\.1 \[dev\] is a diffusion transformer"):
        DiffusionUNetBackbone(diffusion=load_diffusion("tiny-flux"), captioner=None, taps={"unet": [1]})
