"""Reading a diffusion transformer's attention: our exact streamed read-out against a plain pass and against
materialising the attention matrix (presets ``sd3`` and ``flux``).

The transformers are the released ones' shapes (``RELEASED_TRANSFORMERS``: SD3 medium's joint blocks of
24 heads x 64, FLUX.1 dev's double- and single-stream blocks of 24 heads x 128) with random weights, at
1024x1024 (a 128x128 latent: 4096 image tokens), with as many blocks as ``--transformer-blocks`` asks (by
default fewer than the released models have, to fit this machine's memory and time: a block's cost does
not depend on the others, so the table also gives the time per block). The text is a precomputed random
tensor of the family's shape (SD3: 333 tokens, CLIP + T5; FLUX dev: 512 T5 tokens): text is encoded once
per vocabulary, not per image. Each configuration is its own process; one warm-up call, then
``--repeats`` timed calls; peak = increase of peak memory over the level before the warm-up.

* plain: one transformer call;
* ours, maps: the same call recording every block's image-to-text probabilities of 20 class words
  (``record_joint_attention``: the softmax over ALL keys times the class keys' one-hot columns, through
  the fused attention kernel), then the mean over blocks;
* ours, maps + refinement: also keeps the first block's queries and keys and applies its image-to-image
  attention to the 20 maps (the softmax times the maps, the same kernel; DiffSegmenter's refinement);
* materialised: what attention-map tools do: per block the whole (1, heads, S, S) softmax is formed and
  the image-to-text part kept (then the same reduction).
"""
import logging
import time

from . import harness
from .harness import fmt_s, median

logger = logging.getLogger("diffseg_d2.benchmark")

PRESETS = ("sd3", "flux")
DEFAULT_REPEATS = 2
FAMILY = {"sd3": "sd3", "flux": "flux-dev"}
# Blocks built by default: SD3 (joint blocks); FLUX (double-stream, single-stream).
DEFAULT_BLOCKS = {"sd3": (6,), "flux": (2, 2)}
IMAGE_SIZE = 1024
CLASSES = 20
TARGET_PEAK = 1.2  # read-out peak memory increase <= this x the plain pass's
TARGET_TIME = 1.3  # read-out time <= this x the plain pass's
KINDS = {
    "plain": "plain: 1 transformer call",
    "ours-maps": "ours: exact streamed read-out, image-to-text maps of 20 classes from every block",
    "ours-refine": "ours: the same + image-to-image refinement from the first block",
    "materialised": "materialised: (1, heads, S, S) softmax formed per block, image-to-text part kept",
}
TITLES = {
    "sd3": "sd3: the SD3 medium transformer's blocks, random weights, 1024x1024",
    "flux": "flux: the FLUX.1 dev transformer's blocks, random weights, 1024x1024",
}


# ====================================================================== what is measured (in the worker)
def build(preset: str, blocks):
    """The transformer (random weights, eval) and the keyword arguments of one call at 1024x1024."""
    import diffusers
    import torch

    from diffseg_d2.pretrained.diffusion_transformers import RELEASED_TRANSFORMERS, TRANSFORMER_FAMILIES

    family = TRANSFORMER_FAMILIES[FAMILY[preset]]
    config = dict(RELEASED_TRANSFORMERS[family.name])
    config["num_layers"] = blocks[0]
    if family.packing > 1:
        config["num_single_layers"] = blocks[1]
    torch.manual_seed(0)
    transformer = getattr(diffusers, family.transformer)(**config).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    latent = IMAGE_SIZE // 8
    text = family.t5_length + (77 if family.clip_hidden_layer is not None else 0)
    pooled = config["pooled_projection_dim"]
    inputs = dict(encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], generator=g),
                  pooled_projections=torch.randn(1, pooled, generator=g), return_dict=False)
    if family.packing > 1:
        side = latent // family.packing
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        inputs.update(hidden_states=torch.randn(1, side * side, config["in_channels"], generator=g),
                      timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                      img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3))
    else:
        inputs.update(hidden_states=torch.randn(1, config["in_channels"], latent, latent, generator=g),
                      timestep=torch.tensor([500.0]))
    return transformer, inputs, text


def _materialised_store(token_index, token_weight):
    """A store whose read-out forms the whole softmax, as attention-map tools do."""
    from diffseg_d2.diffusion.joint_attention import JointAttentionStore

    class MaterialisedStore(JointAttentionStore):
        def record(self, name, query, key, image, text):
            probs = (query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5).softmax(-1)  # (B, H, S, S)
            cross = probs[0][:, image, text]  # (H, N_img, L_text), what the tools keep
            maps = (cross[:, :, self.token_index] * self.token_weight).sum(-1).mean(0).transpose(0, 1)
            self.layers[name] = self.layers.get(name, 0) + maps
            self.counts[name] = self.counts.get(name, 0) + 1

    return MaterialisedStore(token_index, token_weight)


def measure(spec: dict) -> dict:
    import torch

    from diffseg_d2.diffusion import JointAttentionStore, joint_attention_layers, minmax_per_map, record_joint_attention

    start = time.perf_counter()
    blocks = tuple(spec["blocks"])
    transformer, inputs, text = build(spec["preset"], blocks)
    device = spec["device"]
    transformer.to(device)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    build_s = time.perf_counter() - start
    logger.info("%s: transformer built in %.1f s, measuring", spec["name"], build_s)
    layers = list(joint_attention_layers(transformer))
    g = torch.Generator().manual_seed(2)
    token_index = torch.randint(0, text, (CLASSES, 1), generator=g)
    token_weight = torch.ones(CLASSES, 1)
    kind = spec["kind"]

    def call():
        with torch.no_grad():
            if kind == "plain":
                return transformer(**inputs)
            if kind == "materialised":
                store = _materialised_store(token_index, token_weight)
            else:
                refine = frozenset(layers[:1]) if kind == "ours-refine" else frozenset()
                store = JointAttentionStore(token_index, token_weight, refine_blocks=refine)
            with record_joint_attention(transformer, store, layers, text):
                transformer(**inputs)
            maps = minmax_per_map(store.maps())
            return store.refine(maps) if kind == "ours-refine" else maps

    load = harness.OtherLoad()
    load.start()
    meter = harness.PeakMemory(spec["device"])
    meter.start()
    times = harness.timed_calls(call, spec["repeats"], spec["device"])
    return {"times": times, "build_s": build_s, "blocks": list(blocks), "layers": len(layers), "dtype": "float32",
            "other_load": load.fraction(), "tokens": (IMAGE_SIZE // 16) ** 2 + text, **meter.result()}


# ====================================================================== running and rendering
def run(preset: str, args, device: str) -> dict:
    blocks = args.transformer_blocks or DEFAULT_BLOCKS[preset]
    if len(blocks) != len(DEFAULT_BLOCKS[preset]):
        raise SystemExit(f"--transformer-blocks for {preset}: {len(DEFAULT_BLOCKS[preset])} number(s) "
                         f"({'joint blocks' if preset == 'sd3' else 'double-stream, single-stream blocks'}).")
    start = time.perf_counter()
    base = {"preset": preset, "device": device, "threads": args.threads, "repeats": args.repeats or DEFAULT_REPEATS,
            "blocks": list(blocks)}
    specs = [{**base, "name": kind, "kind": kind, "label": label} for kind, label in KINDS.items()]
    results = harness.run_each(specs, args.wait_quiet)
    return {"preset": preset, "specs": specs, "results": results, "wall_s": time.perf_counter() - start}


def render(run: dict, cmdline: str) -> str:
    preset = run["preset"]
    results = run["results"]
    ok = {k: r for k, r in results.items() if "error" not in r}
    info = next(iter(ok.values()), {})
    blocks = info.get("blocks") or DEFAULT_BLOCKS[preset]
    shape = (f"{blocks[0]} of SD3 medium's 24 joint blocks" if preset == "sd3" else
             f"{blocks[0]} of FLUX.1 dev's 19 double-stream and {blocks[1]} of its 38 single-stream blocks")
    out = harness.heading(TITLES[preset], harness.torch_machine(info), run, cmdline)
    out += [f"- Model: {shape} at their real widths (24 heads), random weights; the sequence is "
            f"{info.get('tokens', '?')} tokens (4096 image + text); text: precomputed random embeddings",
            "- Each row is its own process; peak = increase of peak memory over the level before the warm-up call",
            "",
            "| configuration | repeats | median s | min-max s | s per block | peak MB | time / plain | peak / plain | "
            "other processes' CPU |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    plain = ok.get("plain")
    for s in run["specs"]:
        r = results[s["name"]]
        if "error" in r:
            out.append(f"| {s['label']} | {s['repeats']} | failed: {r['error']} | | | | | | |")
            continue
        med = median(r)
        t_ratio = f"{med / median(plain):.2f}x" if plain else "-"
        m_ratio = f"{r['peak_mib'] / plain['peak_mib']:.2f}x" if plain and plain["peak_mib"] > 0 else "-"
        load = "-" if r.get("other_load") is None else f"{100 * r['other_load']:.0f}%"
        out.append(f"| {s['label']} | {len(r['times'])} | {fmt_s(med)} | {fmt_s(min(r['times']))}-{fmt_s(max(r['times']))} "
                   f"| {fmt_s(med / r['layers'])} | {r['peak_mib']:.0f} | {t_ratio} | {m_ratio} | {load} |")
    out += ["", "Targets (ratios of medians of this run):", ""]
    for name in ("ours-maps", "ours-refine"):
        r = ok.get(name)
        if not (plain and r and plain["peak_mib"] > 0):
            continue
        t, m = median(r) / median(plain), r["peak_mib"] / plain["peak_mib"]
        out.append(f"- **{harness.check(t <= TARGET_TIME)}** {name}: time <= {TARGET_TIME}x plain: "
                   f"{fmt_s(median(r))} s / {fmt_s(median(plain))} s = **{t:.2f}x**")
        out.append(f"- **{harness.check(m <= TARGET_PEAK)}** {name}: peak memory <= {TARGET_PEAK}x plain: "
                   f"{r['peak_mib']:.0f} MB / {plain['peak_mib']:.0f} MB = **{m:.2f}x**")
    mat = ok.get("materialised")
    if plain and mat and plain["peak_mib"] > 0:
        out.append(f"- materialised, for comparison: {median(mat) / median(plain):.2f}x the time, "
                   f"{mat['peak_mib'] / plain['peak_mib']:.2f}x the peak memory of plain")
    out += [""] + harness.busy_note([(k, r.get("other_load")) for k, r in ok.items()])
    return "\n".join(out).rstrip() + "\n"
