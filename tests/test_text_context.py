"""The text tower run up to the batch's last pooled token (compress.models.text_context) gives the features and
gradients of the whole context, runs on fewer columns, and leaves every model where that would not be exact."""
import copy

import open_clip
import pytest
import torch
from conftest import run_trainer
from torch import nn

from compress.models.text_context import text_context_unchanged_reason, trim_text_context

TEXT = {"context_length": 16, "vocab_size": 500, "width": 32, "heads": 2, "layers": 2}
VISION = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}


def _clip(custom: bool = False, **text_cfg):
    """open_clip's CLIP (the text tower's parts on the model) or CustomTextCLIP (a TextTransformer, as EVA's)."""
    torch.manual_seed(0)
    kind = open_clip.model.CustomTextCLIP if custom else open_clip.model.CLIP
    return kind(embed_dim=16, vision_cfg=VISION, text_cfg={**TEXT, **text_cfg})


def _text_transformer(model):
    return model.text.transformer if isinstance(model, open_clip.model.CustomTextCLIP) else model.transformer


def _tokens(eos: int = 499):
    """Captions of 3 to 9 tokens ending in `eos` (the largest id, as in CLIP's tokenizer), zero padding after."""
    torch.manual_seed(1)
    rows = torch.zeros(6, TEXT["context_length"], dtype=torch.long)
    for i, length in enumerate([3, 5, 9, 4, 7, 6]):
        rows[i, :length - 1] = torch.randint(1, 400, (length - 1,))
        rows[i, length - 1] = eos
    return rows


def _features_and_grads(model, text):
    seen = []
    hook = _text_transformer(model).register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    features = model.encode_text(text)
    hook.remove()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(features.square().sum(), params, allow_unused=True)
    return features, grads, seen[0]


@pytest.mark.parametrize("custom", [False, True], ids=["CLIP", "CustomTextCLIP"])
@pytest.mark.parametrize("text_cfg", [{}, {"pool_type": "eos", "eos_id": 499}], ids=["argmax", "eos"])
def test_trimmed_text_tower_gives_the_whole_contexts_features_and_gradients_on_fewer_columns(custom, text_cfg):
    full = _clip(custom, **text_cfg)
    assert text_context_unchanged_reason(full) is None
    trimmed = trim_text_context(copy.deepcopy(full))
    text = _tokens()
    want, want_grads, full_columns = _features_and_grads(full, text)
    got, got_grads, trimmed_columns = _features_and_grads(trimmed, text)
    assert full_columns == 16 and trimmed_columns == 9  # up to the longest caption's end-of-text token
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for want_grad, got_grad in zip(want_grads, got_grads):
        if want_grad is None:
            assert got_grad is None
        else:
            # float rounding of different matrix shapes, relative to the gradient's scale
            torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-5 * want_grad.abs().max().item())
    # the forward (CLIP's, through encode_text) takes the trimmed path too, and the state dict is unchanged
    image = torch.randn(6, 3, 32, 32)
    torch.testing.assert_close(trimmed(image, text)[1], full(image, text)[1], rtol=0, atol=1e-5)
    assert trimmed.state_dict().keys() == full.state_dict().keys()


@pytest.mark.parametrize("custom, text_cfg, reason", [
    (False, {"no_causal_mask": True}, "no causal mask"),
    (False, {"pool_type": "last"}, "pools text by 'last'"),
    (False, {"pool_type": "first"}, "pools text by 'first'"),
    (True, {"no_causal_mask": True}, "no causal mask"),  # SigLIP's text tower
    (True, {"embed_cls": True}, "appends a class token"),  # CoCa's
])
def test_a_text_tower_whose_features_depend_on_the_padding_keeps_the_whole_context(custom, text_cfg, reason):
    model = _clip(custom, **text_cfg)
    assert reason in text_context_unchanged_reason(model)
    trimmed = trim_text_context(model)
    assert "encode_text" not in trimmed.__dict__ and "forward" not in getattr(trimmed, "text", nn.Module()).__dict__


@pytest.mark.slow
def test_trainer_trims_by_default_and_writes_the_weights_of_the_whole_context(tiny_corpus, tmp_path):
    """Two steps of --job clip each way: the default run logs that it trims and ends at the weights of the
    --full-text-context run, up to float rounding."""
    states = {}
    for name, extra in [("trimmed", []), ("full", ["--full-text-context"])]:
        run_trainer(["--train-data", str(tiny_corpus / "train.tsv"), "--model", "clipc-vit-t2-32",
                     "--logs-root", str(tmp_path), "--name", name, "--workers", "0", "--batch-size", "16",
                     "--stop-after-steps", "2", "--epochs", "1", "--lr", "1e-3", "--seed", "5", *extra])
        log = (tmp_path / name / "out.log").read_text()
        states[name] = torch.load(tmp_path / name / "checkpoints" / "epoch_latest.pt",
                                  weights_only=True)["state_dict"]
        expected = "the whole context (--full-text-context)" if extra else "runs up to each batch's longest caption"
        assert "text tower: " + expected in log
    assert states["trimmed"].keys() == states["full"].keys()
    for key in states["full"]:
        torch.testing.assert_close(states["trimmed"][key], states["full"][key], rtol=0, atol=1e-5, msg=key)
