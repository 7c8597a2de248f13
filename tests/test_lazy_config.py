"""The LazyConfig files build the models the yacs configs build: same state-dict keys, same outputs."""
import numpy as np
import pytest
import torch

from diffseg_d2 import get_diffseg_cfg
from diffseg_d2.model_zoo import get_config_file

VOCAB = ["background", "circle", "square", "triangle", "cross"]


def _scene():
    from diffseg_d2.microworld.scenes import render_scene, scene_seeds

    return torch.from_numpy(np.ascontiguousarray(render_scene(scene_seeds("val", 1)[0]).image)).permute(2, 0, 1)


def test_the_micro_diffsegmenter_lazy_config_is_the_yacs_one():
    from detectron2.config import LazyConfig, instantiate
    from detectron2.modeling import build_model

    lazy = LazyConfig.load(get_config_file("lazy/diffsegmenter_micro.py"))
    model = instantiate(lazy.model).eval()
    reference = build_model(get_diffseg_cfg("micro/diffsegmenter.yaml")).eval()
    assert type(model) is type(reference)
    assert model.state_dict().keys() == reference.state_dict().keys()
    for key in ("image_size", "prompt_template", "cross_attn_factors", "cross_attn_weights", "noise_step",
                "token_selection", "conditioning", "class_token_weight", "background_threshold"):
        assert getattr(model, key) == getattr(reference, key), key
    assert model.vocabulary == reference.vocabulary and model.category_filter.threshold == 0.15
    x = [{"image": _scene(), "vocabulary": VOCAB}]
    with torch.no_grad():
        assert torch.equal(model(x)[0]["sem_seg"], reference(x)[0]["sem_seg"])
    # The evaluation loop's pieces instantiate too.
    assert lazy.dataloader.evaluator.dataset_name == "diffseg_microworld_shapes_val"


@pytest.mark.slow
def test_the_lazy_evaluation_loop_evaluates_the_micro_diffsegmenter(tmp_path, monkeypatch):
    import os
    import sys

    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    sys.path.insert(0, os.path.join(root, "tools"))
    import lazy_train_net

    monkeypatch.setenv("DIFFSEG_D2_MICROWORLD_COUNT", "val=8")  # 8 scenes: the loop, not the number
    results = lazy_train_net.main(["--config-file", get_config_file("lazy/diffsegmenter_micro.py"), "--eval-only",
                                   f"dataloader.evaluator.output_dir={tmp_path}"])
    assert 0.0 < results["sem_seg"]["mIoU"] <= 100.0


def test_the_micro_freeda_lazy_config_is_the_yacs_one(tmp_path):
    """Both read one micro bank (6 captions, built here with the micro config as a user builds it)."""
    import os
    import subprocess
    import sys

    from detectron2.config import LazyConfig, instantiate
    from detectron2.modeling import build_model

    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle and a blue square\na green triangle\na yellow cross and a red square\n"
                        "a blue circle\na green square and a yellow triangle\na red cross\n")
    bank = tmp_path / "bank"
    proc = subprocess.run([sys.executable, os.path.join(root, "tools", "build_freeda_bank.py"), "--config-file",
                           get_config_file("micro/freeda.yaml"), "--captions", str(captions), "--output", str(bank),
                           "--no-progress"], capture_output=True, text=True, cwd=root, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lazy = LazyConfig.load(get_config_file("lazy/freeda_micro.py"))
    lazy.model.bank.folder = str(bank)
    model = instantiate(lazy.model).eval()
    reference = build_model(get_diffseg_cfg("micro/freeda.yaml", ["MODEL.DIFFSEG.FREEDA.BANK", str(bank)])).eval()
    assert type(model) is type(reference) and model.state_dict().keys() == reference.state_dict().keys()
    for key in ("top_k", "query_templates", "short_side", "window", "stride", "dino_size", "superpixel", "pipeline"):
        assert getattr(model, key) == getattr(reference, key), key
    x = [{"image": _scene(), "vocabulary": VOCAB}]
    with torch.no_grad():
        assert torch.equal(model(x)[0]["sem_seg"], reference(x)[0]["sem_seg"])


def _same_model(lazy_model, reference):
    """Same class and state-dict (keys and shapes); with the reference's weights copied in, same outputs."""
    assert type(lazy_model) is type(reference)
    mine, theirs = lazy_model.state_dict(), reference.state_dict()
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    lazy_model.load_state_dict(theirs)


def test_the_micro_odise_lazy_config_is_the_yacs_one():
    """One CLIP instance serves the captioner, the classifier and the ensemble, as in the yacs build."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.modeling import build_model

    lazy = LazyConfig.load(get_config_file("lazy/odise_micro.py"))
    model = instantiate(lazy.model).eval()
    reference = build_model(get_diffseg_cfg("micro/odise.yaml")).eval()
    _same_model(model, reference)
    assert model.clip is model.backbone.captioner.clip
    assert model.train_classes == reference.train_classes and model.vocabulary == reference.vocabulary
    for key in ("ensemble", "ensemble_alpha", "ensemble_beta", "ensemble_clip", "variant", "object_mask_threshold"):
        assert getattr(model, key) == getattr(reference, key), key
    x = [{"image": _scene()}]
    with torch.no_grad():
        out, expected = model(x)[0], reference(x)[0]
    assert torch.equal(out["sem_seg"], expected["sem_seg"])
    assert torch.equal(out["panoptic_seg"][0], expected["panoptic_seg"][0])
    assert lazy.dataloader.evaluator.dataset_name == "diffseg_microworld_panoptic_val"


def test_the_diffusion_backbone_under_detectrons_own_panoptic_fpn_lazy_config_is_the_yacs_one():
    import os

    from detectron2.config import LazyConfig, instantiate
    from detectron2.modeling import build_model

    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    lazy = LazyConfig.load(get_config_file("lazy/panoptic_fpn_diffusion_tiny.py"))
    model = instantiate(lazy.model).eval()
    reference = build_model(get_diffseg_cfg(os.path.join(root, "projects", "diffusion_panoptic_fpn", "configs",
                                                          "tiny.yaml"))).eval()
    _same_model(model, reference)
    assert type(model.backbone.bottom_up).__name__ == "DiffusionUNetBackbone"
    image = torch.nn.functional.interpolate(_scene()[None].float(), size=(128, 160), mode="nearest")[0]
    x = [{"image": image, "height": 128, "width": 160}]
    with torch.no_grad():
        out, expected = model(x)[0], reference(x)[0]
    assert torch.equal(out["sem_seg"], expected["sem_seg"])
    assert torch.equal(out["panoptic_seg"][0], expected["panoptic_seg"][0])
    assert torch.equal(out["instances"].pred_boxes.tensor, expected["instances"].pred_boxes.tensor)


@pytest.mark.slow
def test_the_lazy_training_loop_trains_odise_checkpoints_and_resumes(tmp_path, monkeypatch):
    import os
    import sys

    from detectron2.config import LazyConfig, instantiate

    from diffseg_d2.engine import StrictCheckpointer

    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    sys.path.insert(0, os.path.join(root, "tools"))
    import lazy_train_net

    monkeypatch.setenv("DIFFSEG_D2_MICROWORLD_COUNT", "val=4")  # the loop, not the number
    config = get_config_file("lazy/odise_micro.py")
    opts = [f"train.output_dir={tmp_path}", "dataloader.train.total_batch_size=2", "train.checkpointer.period=2",
            f"dataloader.evaluator.output_dir={tmp_path}"]
    results = lazy_train_net.main(["--config-file", config, *opts, "train.max_iter=2"])
    assert 0.0 <= results["panoptic_seg"]["PQ"] <= 100.0
    assert (tmp_path / "model_final.pth").is_file() and (tmp_path / "last_checkpoint").is_file()
    model = instantiate(LazyConfig.load(config).model)
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
    StrictCheckpointer(model).load(str(tmp_path / "model_final.pth"))  # every key matched
    assert any(not torch.equal(untrained[k], v) for k, v in model.state_dict().items())
    # --resume continues from iteration 2 to 3.
    lazy_train_net.main(["--config-file", config, "--resume", *opts, "train.max_iter=3"])
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert torch.load(tmp_path / "model_final.pth", weights_only=True)["iteration"] == 2
