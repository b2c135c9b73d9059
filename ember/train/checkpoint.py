"""Training checkpoints: model, optimizer, schedule, data position, RNG states and config.

    ckpts = TrainCheckpoints(out / "checkpoints", dist, keep_last=3)
    ckpts.save(step, model, optimizer, {"step": step, "data": loader.state_dict(), ...})
    found = ckpts.restore(model, optimizer)  # (folder, trainer state) of the newest that verifies, or None

One folder per checkpoint, written through torch.distributed.checkpoint (DCP) in every case,
so a single process, DDP and FSDP2 share one format and a checkpoint saved by any world size
loads into any other (an FSDP2 run's checkpoint reloads into a plain single-process model):

    checkpoints/step-00000200/
        .metadata, __0_0.distcp, ...   model + optimizer tensors (DCP; one file per rank)
        rng-0.json, rng-1.json, ...    each rank's torch / python / numpy RNG state
        trainer.json                   step, data position, schedule, resolved config, counters
        checkpoint.json                written last: sha256 of every file above

A checkpoint is assembled in `.step-N.tmp/` and renamed into place only when complete, so a
crash (even SIGKILL) mid-save leaves the previous ones untouched. On resume each candidate is
verified against checkpoint.json; a corrupt or incomplete one is renamed `*.corrupt` (never
deleted), a warning names it, and the next older one is used. Only complete checkpoints count
towards keep_last, and old ones are pruned only after a new one is in place.

load() checks the manifest again immediately before DCP reads the folder, because DCP's
`.metadata` is a pickle that torch unpickles: a file changed since it was saved (or one the
manifest does not list) is never handed to it. The manifest catches corruption and accidental
edits, not an attacker who can also rewrite checkpoint.json: checkpoints are trusted input,
like any file torch.load reads.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from torch.distributed.checkpoint.api import CheckpointException

from ember.atomic import atomic_write_json
from ember.errors import EmberError
from ember.train.distributed import DistInfo, barrier, broadcast_object

log = logging.getLogger(__name__)

MARKER = "checkpoint.json"
TRAINER = "trainer.json"
FORMAT = "ember-train-checkpoint/1"


class TrainCheckpointError(EmberError):
    """A training checkpoint that cannot be used (corrupt, or for a different model)."""


class CorruptCheckpointError(TrainCheckpointError):
    """A checkpoint whose files do not match its manifest; load() has set it aside as *.corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can touch, as JSON (no pickle)."""
    np_state = np.random.get_state()
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
             "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


def _first_cause(e: BaseException) -> str:
    """The most telling line of a DCP error (it wraps each rank's exception)."""
    text = str(e)
    for line in text.splitlines():
        if "Error:" in line or "Missing key" in line or "size mismatch" in line:
            return line.strip()[:300]
    return (text.strip().splitlines() or [type(e).__name__])[0][:300]


def _dcp():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    return dcp, get_state_dict, set_state_dict


def _frozen(module: nn.Module) -> bool:
    return not all(p.requires_grad for p in module.parameters())


def _state_dicts(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state for DCP.

    With frozen parameters (LoRA, QLoRA) only the trained ones are saved: the frozen base comes
    back from its own checkpoint, a checkpoint stays the size of the adapters, and quantized base
    layers (whose state-dict keys are not module attributes) never reach DCP's key mapping.
    """
    _, get_state_dict, _ = _dcp()
    if not _frozen(module):
        return get_state_dict(module, optimizer)
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    trained = {name: p for name, p in module.named_parameters() if p.requires_grad}
    return trained, get_optimizer_state_dict(module, optimizer)


def _restore(module: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    _, _, set_state_dict = _dcp()
    if not _frozen(module):
        set_state_dict(module, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    # DCP loaded the trained tensors in place (they are the module's own parameters); the
    # optimizer state still needs mapping back from names.
    set_optimizer_state_dict(module, optimizer, optim_sd)


class TrainCheckpoints:
    """The checkpoint folders of one run (see the module docstring)."""

    def __init__(self, root: str | Path, dist: DistInfo, keep_last: int = 3) -> None:
        self.root = Path(root)
        self.dist = dist
        self.keep_last = max(1, keep_last)

    # ---- listing -------------------------------------------------------------------------------
    def complete(self) -> list[tuple[int, Path]]:
        """Checkpoints with a completion marker, oldest first (step read from the marker)."""
        found = []
        for d in self.root.glob("step-*"):
            if d.is_dir() and not d.name.endswith(".corrupt"):
                try:
                    found.append((int(json.loads((d / MARKER).read_text())["step"]), d))
                except (OSError, ValueError, KeyError, TypeError):
                    found.append((-1, d))  # incomplete: verify() will reject it
        return sorted(found)

    def verify(self, folder: Path) -> str | None:
        """None if the checkpoint's files are exactly those its marker lists, each matching its
        sha256, else what is wrong."""
        try:
            marker = json.loads((folder / MARKER).read_text())
            files = marker["files"]
            if marker.get("format") != FORMAT or not isinstance(files, dict):
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{MARKER} is missing or unreadable"
        for name, digest in files.items():
            # Names are plain file names in the folder: a marker cannot point the check elsewhere.
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..", MARKER):
                return f"{MARKER} lists {str(name)[:100]!r}, which is not a file of the checkpoint"
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if _sha256(path) != digest:
                return f"{name} does not match its checksum"
        # A file the manifest does not list was never checked, so DCP must not find it either.
        extra = sorted(p.name for p in folder.iterdir() if p.name != MARKER and p.name not in files)
        if extra:
            return f"{extra[0]} is not in {MARKER}"
        return None

    def _set_aside(self, folder: Path) -> Path:
        """Rename a corrupt checkpoint to *.corrupt (or *.corruptN), never deleting it."""
        aside = folder.with_name(folder.name + ".corrupt")
        n = 1
        while aside.exists():
            aside = folder.with_name(f"{folder.name}.corrupt{n}")
            n += 1
        folder.rename(aside)
        return aside

    def _latest_on_main(self) -> tuple[str | None, list[str]]:
        for debris in self.root.glob(".step-*.tmp"):  # saves cut short by a kill: never complete
            shutil.rmtree(debris, ignore_errors=True)
        notes = []
        # Newest first; folders without a readable marker (step -1) are never usable.
        candidates = sorted(self.complete(), key=lambda sf: (sf[0] < 0, -sf[0]))
        found = None
        for _, folder in candidates:
            problem = self.verify(folder) if found is None or not (folder / MARKER).exists() else None
            if problem is None:
                found = found or str(folder)
                continue
            aside = self._set_aside(folder)
            notes.append(f"checkpoint {folder.name} is corrupt ({problem}); kept as {aside.name}"
                         + ("" if found else ", trying the previous one"))
        return found, notes

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies; corrupt newer ones are set aside with a warning."""
        result = self._latest_on_main() if self.dist.is_main else None
        path, notes = broadcast_object(result, self.dist)
        if self.dist.is_main:
            for note in notes:
                log.warning(note)
                print(f"warning: {note}", flush=True)
        if path is None and notes:
            raise TrainCheckpointError(f"no usable checkpoint in {self.root}: every one is corrupt "
                                       "(set aside as *.corrupt); start a new run with another --out")
        return None if path is None else Path(path)

    # ---- save / load ---------------------------------------------------------------------------
    def save(self, step: int, module: nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any]) -> Path:
        dcp, _, _ = _dcp()
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".step-{step:08d}.tmp"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that was killed
            tmp.mkdir(parents=True)
        barrier(self.dist)
        model_sd, optim_sd = _state_dicts(module, optimizer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        (tmp / f"rng-{self.dist.rank}.json").write_text(json.dumps(rng_state()))
        barrier(self.dist)
        if self.dist.is_main:
            (tmp / TRAINER).write_text(json.dumps({"format": FORMAT, **trainer_state}, indent=1))
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            atomic_write_json(tmp / MARKER, {"format": FORMAT, "step": step, "files": files})
            if final.exists():  # same step saved before (e.g. a rerun after a fallback)
                old = final.with_name(final.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
            self._prune()
        barrier(self.dist)
        return final

    def _prune(self) -> None:
        done = [(s, d) for s, d in self.complete() if s >= 0]
        for _, folder in done[:-self.keep_last]:
            shutil.rmtree(folder, ignore_errors=True)

    def _check_before_loading(self, folder: Path) -> None:
        """Raise CorruptCheckpointError (the folder set aside, a warning printed) unless folder
        still matches its manifest; rank 0 checks for every rank."""
        problem = broadcast_object(self.verify(folder) if self.dist.is_main else None, self.dist)
        if problem is None:
            return
        note = f"checkpoint {folder.name} is corrupt ({problem})"
        if self.dist.is_main:
            note += f"; kept as {self._set_aside(folder).name}"
            log.warning(note)
            print(f"warning: {note}", flush=True)
        barrier(self.dist)  # set aside before any rank looks for the next one
        raise CorruptCheckpointError(note)

    def restore(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Path, dict[str, Any]] | None:
        """Load the newest checkpoint that verifies (see load); one that fails its check at load
        time is set aside like any corrupt one and the previous one is tried. None: there is none."""
        set_aside = False
        while (folder := self.latest()) is not None:
            try:
                return folder, self.load(folder, module, optimizer)
            except CorruptCheckpointError:
                set_aside = True  # by load: latest() now finds the previous one
        if set_aside:  # as latest() does: never silently restart a run whose checkpoints all failed
            raise TrainCheckpointError(f"no usable checkpoint in {self.root}: every one is corrupt "
                                       "(set aside as *.corrupt); start a new run with another --out")
        return None

    def load(self, folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model, optimizer and this rank's RNG from folder; returns the trainer state.
        Raises CorruptCheckpointError (folder set aside) if its files no longer match checkpoint.json."""
        self._check_before_loading(folder)
        dcp, _, _ = _dcp()
        model_sd, optim_sd = _state_dicts(module, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                dcp.load(state, checkpoint_id=str(folder))
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            first = _first_cause(e)
            raise TrainCheckpointError(f"checkpoint {folder} does not fit this model and optimizer "
                                       f"({first}); resume with the same model config") from None
        _restore(module, optimizer, state["model"], state["optim"])
        rng = folder / f"rng-{self.dist.rank}.json"
        if rng.exists():
            set_rng_state(json.loads(rng.read_text()))
        return json.loads((folder / TRAINER).read_text())

    def load_model_only(self, folder: Path, module: nn.Module) -> None:
        """Load just the model weights of a checkpoint (any world size) into a plain module,
        after the same manifest check as load."""
        self._check_before_loading(folder)
        dcp, _, _ = _dcp()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        sd = {"model": get_model_state_dict(module)}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(sd, checkpoint_id=str(folder))
        set_model_state_dict(module, sd["model"])
