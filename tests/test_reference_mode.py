"""DiffSegmenter's reference mode, tested against the published method's facts (not its code):
own-pass refinement, the "++" weighting, token selection and the "-ing" rule, class independence,
the VAE sample and the prompt names."""
import pytest
import torch

from conftest import patched  # tests/conftest.py
from diffseg_d2.diffusion import AttentionStore, build_class_prompts
from diffseg_d2.modeling.meta_arch.diffsegmenter import parse_prompt_names


def test_own_pass_refinement_uses_each_class_s_self_attention():
    """M_k = S_k c_k with S_k the mean over layers and heads of class k's own softmax(QK^T):
    built so the two classes' passes attend differently, the averaged refinement differs."""
    torch.manual_seed(0)
    n, heads, N, d = 2, 2, 16, 4
    store = AttentionStore((4, 4), torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1), own_self_attention=True)
    layers = [(torch.randn(n, heads, N, d) * 3, torch.randn(n, heads, N, d)) for _ in range(2)]
    for q, k in layers:
        store.add_self_qk(1, slice(0, n), q, k)
    c = torch.rand(n, N)
    own = store.refine_own(1, c)
    S = [sum(torch.softmax(q[b, h] @ k[b, h].T, -1) for q, k in layers for h in range(heads)) / (2 * heads)
         for b in range(n)]
    torch.testing.assert_close(own, torch.stack([S[b] @ c[b] for b in range(n)]), rtol=1e-5, atol=1e-6)
    averaged = torch.stack([(S[0] + S[1]) / 2 @ c[b] for b in range(n)])
    assert (own - averaged).abs().max() > 1e-2


def test_class_word_weighting_is_compel_s_formula(tiny_sd):
    prompts = build_class_prompts(tiny_sd.tokenizer, ["dog", "potted plant"], "a photograph of {}")
    plain = tiny_sd.encode_text(prompts.input_ids).tokens
    weighted = tiny_sd.encode_text(prompts.input_ids, prompts.emphasis, 1.21).tokens
    empty = tiny_sd.empty_prompt_context().tokens
    mask = prompts.emphasis[..., None]
    torch.testing.assert_close(weighted, torch.where(mask, empty + 1.21 * (plain - empty), plain))
    # Only the class name's LAST word is weighted ("potted plant++" weights "plant").
    ids = prompts.input_ids[1]
    plant = tiny_sd.tokenizer("plant", add_special_tokens=False).input_ids
    assert ids[prompts.emphasis[1]].tolist() == plant
    assert prompts.emphasis.sum(1).tolist() == [1, len(plant)]


def test_token_selection_and_the_ing_rule(tiny_sd):
    tok = tiny_sd.tokenizer
    name = "pottedplant"  # three sub-tokens under CLIP's BPE
    sub = tok(name, add_special_tokens=False).input_ids
    assert len(sub) >= 2
    start = len(tok("a photograph of", add_special_tokens=False).input_ids) + 1  # after the start token
    for selection, expected in (("first", [start]), ("last", [start + len(sub) - 1]),
                                ("mean", list(range(start, start + len(sub))))):
        p = build_class_prompts(tok, [name], "a photograph of {}", selection=selection)
        picked = p.token_index[0][p.token_weight[0] > 0].tolist()
        assert picked == expected, selection
        torch.testing.assert_close(p.token_weight[0].sum(), torch.tensor(1.0))
    # A continuation whose first word ends in "ing": the token after the read one joins it.
    p = build_class_prompts(tok, ["dog", "dog"], "a photograph of {}", continuations=[" running on grass", " on grass"],
                            selection="first", ing_rule=True)
    assert p.prompts == ["a photograph of dog running on grass", "a photograph of dog on grass"]
    assert p.token_index[0][p.token_weight[0] > 0].tolist() == [start, start + 1]
    assert p.token_index[1][p.token_weight[1] > 0].tolist() == [start]
    assert torch.equal(p.input_ids[0], tok("a photograph of dog running on grass", padding="max_length",
                                           max_length=tok.model_max_length, return_tensors="pt").input_ids[0])


def test_reference_mode_maps_of_a_class_do_not_depend_on_the_others(tiny_model):
    image = torch.randint(0, 256, (3, 48, 64)).float()
    with patched(tiny_model, category_filter=None, conditioning="per_class", refinement="own"):
        two = tiny_model.class_maps(image, ["person", "chair"], [0, 1])
        three = tiny_model.class_maps(image, ["person", "chair", "bottle"], [0, 1, 2])
        torch.testing.assert_close(three[:2], two, rtol=1e-4, atol=1e-5)
        with patched(tiny_model, refinement="averaged"):
            averaged = tiny_model.class_maps(image, ["person", "chair", "bottle"], [0, 1, 2])
    assert not torch.allclose(averaged[:2], two, rtol=1e-4, atol=1e-5)


def test_vae_latent_is_a_seeded_posterior_sample(tiny_model):
    image = torch.randint(0, 256, (3, 40, 40)).float()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    with patched(tiny_model, vae_latent="sample"):
        a, b = tiny_model.encode(image, g()), tiny_model.encode(image, g())
    with patched(tiny_model, vae_latent="mean"):
        mean = tiny_model.encode(image, g())
    assert torch.equal(a, b) and not torch.allclose(a, mean)


def test_prompt_names_change_the_prompt_not_the_output_classes(tiny_model):
    assert parse_prompt_names(["dining table=table", " person = people "]) == {"dining table": "table", "person": "people"}
    with pytest.raises(ValueError, match="PROMPT_NAMES entry 'person'"):
        parse_prompt_names(["person"])
    with patched(tiny_model, prompt_names={"dining table": "table"}, category_filter=None):
        prompts, _ = tiny_model._build_prompts(["dining table", "person"])
        out = tiny_model([{"image": torch.zeros(3, 32, 32), "vocabulary": ["background", "dining table"]}])[0]
    assert prompts.prompts == ["a photograph of table", "a photograph of person"]
    assert out["sem_seg"].shape[0] == 2
