"""The image backbone both student kinds share (compress.models.backbones): a torchvision classifier whose
output layer is a projection (student_clip) or nothing (image_student, which adds its own head)."""
import pytest
import torch

from compress.models.backbones import torchvision_backbone


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "squeezenet1_1"])
def test_projection_is_the_feature_backbone_followed_by_a_linear(arch):
    torch.manual_seed(0)
    projected, head_name = torchvision_backbone(arch, 32, out_dim=16)
    features, feature_head = torchvision_backbone(arch, 32)
    assert feature_head == head_name
    # the same network but for its output layer: the projection applied to the pooled features
    features.load_state_dict({k: v for k, v in projected.state_dict().items() if not k.startswith(head_name + ".")})
    head = projected.get_submodule(head_name)
    linear = head[-1] if isinstance(head, torch.nn.Sequential) else head
    images = torch.randn(2, 3, 32, 32)
    projected.eval()
    features.eval()
    with torch.no_grad():
        torch.testing.assert_close(projected(images), linear(features(images).flatten(1)))
    assert isinstance(linear, torch.nn.Linear) and linear.out_features == 16
