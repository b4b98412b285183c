"""FLIP token masking is a function of the image and the seed: the same image keeps the same tokens alone,
at any position of a batch, and after a save/load; older specs (no per_image field) still load."""
import pytest
import torch

import compress
from compress.models.compact_clip import TokenMask, image_keys
from compress.models.registry import build_model, open_clip_spec
from compress.models.spec import SpecError, validate_spec
from compress.ops.token_mask import mask_tokens


@pytest.fixture(scope="module")
def masked():
    torch.manual_seed(0)
    return mask_tokens(build_model(open_clip_spec("clipc-vit-t2-32")).eval(), 0.5, seed=7)


def _kept_tokens(model, images):
    """The tokens the mask hands on (class token + kept patches), as the first block sees them."""
    seen = []
    handle = model.visual.ln_pre.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        features = model.encode_image(images)
    handle.remove()
    return seen[0], features


def test_an_image_keeps_the_same_tokens_alone_and_at_any_batch_position(masked):
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, 32, 32, generator=generator)
    others = torch.randn(5, 3, 32, 32, generator=generator)
    alone_tokens, alone = _kept_tokens(masked, image)
    for position in (0, 1, 5):
        batch = torch.cat([others[:position], image, others[position:]])
        tokens, features = _kept_tokens(masked, batch)
        # the same patches with the same positions reach the transformer, so the feature is the same
        torch.testing.assert_close(tokens[position], alone_tokens[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(features[position], alone[0], rtol=1e-5, atol=1e-6)


def test_the_choice_is_random_per_image_and_follows_the_seed(masked):
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    keys = image_keys(images, 7)
    assert len(set(keys)) == 8  # every image its own draw
    assert image_keys(images, 7) == keys and image_keys(images, 8) != keys
    scores = torch.stack([torch.rand(16, generator=torch.Generator().manual_seed(k)) for k in keys])
    kept = scores.topk(8, dim=1).indices
    assert len({tuple(sorted(row.tolist())) for row in kept}) > 1  # not one pattern for every image
    tokens, first = _kept_tokens(masked, images)
    assert tokens.shape == (8, 1 + 8, 64)
    torch.testing.assert_close(_kept_tokens(masked, images)[1], first)  # seeded: the same every call
    reloaded = compress.load({"model_spec": masked.model_spec, "state_dict": masked.state_dict()})
    torch.testing.assert_close(_kept_tokens(reloaded, images)[1], first)


def test_new_specs_record_per_image_and_old_specs_still_load(masked):
    assert masked.model_spec["token_mask"] == {"drop": 0.5, "seed": 7, "per_image": True}
    old_spec = {**masked.model_spec, "token_mask": {"drop": 0.5, "seed": 7}}  # as written before the field
    old = compress.load({"model_spec": old_spec, "state_dict": masked.state_dict()})
    assert isinstance(old.visual.patch_dropout, TokenMask) and not old.visual.patch_dropout.per_image
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert old.encode_image(images).shape == (4, 64)
    with pytest.raises(SpecError, match="token_mask.order: unknown key"):
        validate_spec({**masked.model_spec, "token_mask": {"drop": 0.5, "order": "raster"}})
    with pytest.raises(SpecError, match="token_mask.per_image"):
        validate_spec({**masked.model_spec, "token_mask": {"drop": 0.5, "per_image": "yes"}})


@pytest.mark.parametrize("architecture, register_tokens", [("vit_base_patch16_siglip_224", "reg_tokens"),
                                                              ("eva02_tiny_patch14_224", "num_reg_tokens")])
def test_a_timm_vit_keeps_its_prefix_tokens_and_each_image_the_same_patches(architecture, register_tokens):
    """In a timm ViT or EVA tower (open_clip's TimmModel holds it as `trunk`) the mask takes timm's `patch_drop`
    place, after the positional embedding: the class and register tokens pass unchanged, half of the patches
    remain, in eval mode, the same ones for an image alone and within a batch; EVA gets their indices too, by which
    it selects their rotary embeddings."""
    import timm
    from torch import nn

    from compress.models.compact_clip import install_token_mask

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = timm.create_model(architecture, pretrained=False, img_size=64, patch_size=16, embed_dim=32,
                                           depth=1, num_heads=2, class_token=True, global_pool="token",
                                           **{register_tokens: 1})

        def forward(self, images):
            return self.trunk(images)

    torch.manual_seed(0)
    tower = Tower().eval()
    mask = TokenMask(0.5, seed=3, per_image=True)
    install_token_mask(tower, mask)
    assert tower.trunk.patch_drop is mask and mask.prefix_tokens == 2
    seen = []
    mask.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        tower(images)
        tower(images[1:2])
    (tokens, kept), (_, alone) = seen
    if architecture.startswith("eva"):
        (kept, indices), (alone, _) = kept, alone
        torch.testing.assert_close(kept[:, 2:], tokens[:, 2:].gather(1, indices[..., None].expand(-1, -1, 32)))
    assert tokens.shape[1] == 2 + 16 and kept.shape[1] == 2 + 8
    torch.testing.assert_close(kept[:, :2], tokens[:, :2], rtol=0, atol=0)
    for image in range(3):  # every kept patch is one of the image's own patches
        assert all(any(torch.equal(patch, other) for other in tokens[image, 2:]) for patch in kept[image, 2:])
    torch.testing.assert_close(alone[0], kept[1], rtol=0, atol=1e-6)
