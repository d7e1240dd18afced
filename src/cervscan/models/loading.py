"""Model roles, and loading a checkpoint for a role: read it safely, check that it fills the role, build
it on a device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cervscan.errors import CervscanError

#: Model roles, in the order the pipeline runs them. ``segmenter`` is the lesion segmenter.
ROLES: tuple[str, ...] = ("stage", "cervix", "segmenter", "classifier")
#: Checkpoint ``kind`` (and segmenter ``target``) each role needs.
ROLE_KIND = {"stage": ("stage", None), "cervix": ("segmenter", "cervix"),
             "segmenter": ("segmenter", "lesion"), "classifier": ("classifier", None)}


def checkpoint_role(ck: dict) -> str | None:
    """The pipeline role a checkpoint fills (None when it fills none)."""
    kind = ck.get("kind")
    if kind == "segmenter":
        return "cervix" if ck.get("target") == "cervix" else "segmenter"
    return kind if kind in ("stage", "classifier") else None


@dataclass
class LoadedModel:
    role: str
    net: object  # torch.nn.Module
    ckpt: dict
    ref: object | None = None  # cervscan.models.registry.ResolvedModel

    @property
    def size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.ckpt["input_size"])  # type: ignore[return-value]

    @property
    def label(self) -> str:
        """name@version:sha256[:12]; the manifest's name and version, else the checkpoint's."""
        ref = self.ref
        if ref is not None and getattr(ref, "entry", None) and ref.entry.get("name"):  # type: ignore[attr-defined]
            return ref.label  # type: ignore[attr-defined]
        name, ver = self.ckpt.get("name") or self.role, self.ckpt.get("version")
        sha = getattr(ref, "sha256", "") or ""
        return f"{name}{'@' + ver if ver else ''}{':' + sha[:12] if sha else ''}"


def load_model(role: str, path: Path | str, device, ref=None, *, deploy: bool = True) -> LoadedModel:
    """Read a checkpoint, check that it fills ``role``, build it on ``device``."""
    import torch  # lazy: torch, out of the model commands (registry imports this module)

    from cervscan.models.networks import (  # lazy: networks imports torch
        model_from_checkpoint,
        read_checkpoint,
    )

    ck = read_checkpoint(path)
    got = checkpoint_role(ck)
    if got != role:
        want_kind, want_target = ROLE_KIND[role]
        what = f"{ck.get('kind')}" + (f" ({ck.get('target') or 'lesion'})" if ck.get("kind") == "segmenter" else "")
        raise CervscanError(f"{path}: is a {what} checkpoint, not a {role} model "
                            f"(needs kind '{want_kind}'{', target ' + repr(want_target) if want_target else ''})")
    net = model_from_checkpoint(ck, deploy=deploy).to(device)
    if ck["kind"] == "segmenter" and torch.device(device).type == "cpu":
        net = net.to(memory_format=torch.channels_last)
    return LoadedModel(role, net, ck, ref)
