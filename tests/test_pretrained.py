"""The frozen pretrained models share one base: no parameter trains and a parent's train() leaves them in
eval mode; the random:<architecture> presets are refused with the choices when unknown."""
import pytest
import torch
from torch import nn

from diffseg_d2.diffusion import FrozenStableDiffusion, load_stable_diffusion
from diffseg_d2.pretrained import FrozenModel, MissingWeightsError
from diffseg_d2.pretrained.blip import BlipCaptioner
from diffseg_d2.pretrained.clip import OpenCLIP
from diffseg_d2.pretrained.dino import DenseDINO


def test_every_pretrained_wrapper_is_frozen_and_stays_in_eval_under_a_training_parent():
    assert issubclass(BlipCaptioner, FrozenModel)  # BLIP has no tiny preset; same base as the others
    parent = nn.ModuleDict({
        "sd": FrozenStableDiffusion(load_stable_diffusion("tiny")),
        "clip": OpenCLIP.from_weights("tiny", ["a photo of a {}."]),
        "dino": DenseDINO.from_weights("tiny"),
        "head": nn.Linear(2, 2),
    })
    parent.train()
    assert parent["head"].training  # the trainable part trains ...
    for name in ("sd", "clip", "dino"):
        frozen = parent[name]
        assert isinstance(frozen, FrozenModel)
        assert not any(m.training for m in frozen.modules()), f"{name} left eval mode"
        assert not any(p.requires_grad for p in frozen.parameters()), f"{name} has trainable parameters"


def test_random_presets_build_the_named_architecture_and_refuse_unknown_ones():
    dino = DenseDINO.from_weights("random:tiny")
    assert dino.embed_dim == 32 and dino.patch_size == 14
    with torch.no_grad():
        assert dino(torch.rand(1, 3, 28, 28) * 255).shape == (1, 32, 2, 2)
    with pytest.raises(MissingWeightsError, match="random:vitl14"):
        DenseDINO.from_weights("random:vit-huge")
    with pytest.raises(MissingWeightsError, match="random:sd15"):
        load_stable_diffusion("random:sd99")
    parts = load_stable_diffusion("random:tiny")
    assert parts.unet.config.block_out_channels == (32, 64, 64)


def test_building_random_weights_leaves_the_callers_random_state_alone():
    """A preset built in the middle of a run (or on one rank of several) must not reseed it."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = DenseDINO.from_weights("random:tiny")
    assert torch.equal(torch.rand(3), expected)
    # ... and the weights still come from the preset's own seed.
    second = DenseDINO.from_weights("random:tiny")
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_the_openai_clip_hub_weights_are_built_with_quick_gelu(monkeypatch):
    """FreeDA's CLIP (timm/vit_large_patch14_clip_224.openai, OpenAI's weights) needs QuickGELU. open_clip
    builds an hf-hub model from the repository's own json alone, so the loader asks open_clip's registry
    and forces QuickGELU for the repositories it lists with it (LAION's weights keep GELU)."""
    import open_clip

    from diffseg_d2.pretrained.clip import registry_quick_gelu

    assert registry_quick_gelu(open_clip, "timm/vit_large_patch14_clip_224.openai")
    assert not registry_quick_gelu(open_clip, "laion/CLIP-ViT-L-14-laion2B-s32B-b82K")
    built = {}
    tiny = OpenCLIP.from_weights("tiny", ["a photo of a {}."])

    def create_model(name, **kwargs):  # the hub is unreachable here: record the request, return the tiny model
        built[name] = kwargs
        return tiny.model

    monkeypatch.setattr(open_clip, "create_model", create_model)
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name: tiny.tokenizer)
    OpenCLIP.from_weights("timm/vit_large_patch14_clip_224.openai", ["a photo of a {}."])
    OpenCLIP.from_weights("laion/CLIP-ViT-L-14-laion2B-s32B-b82K", ["a photo of a {}."])
    assert built["hf-hub:timm/vit_large_patch14_clip_224.openai"].get("force_quick_gelu") is True
    assert "force_quick_gelu" not in built["hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K"]
