"""pipeline.models.checkpoints: reading state dicts safely, loading them strictly."""

import pytest
import torch

from pipeline.models import checkpoints


class LoadError(RuntimeError):
    pass


def _module():
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))


def _read(path):
    return checkpoints.read_state_dict(str(path), what="test checkpoint", error=LoadError)


def test_wrappers_and_data_parallel_prefixes_are_removed(tmp_path):
    sd = _module().state_dict()
    for i, obj in enumerate([sd, {"model": sd}, {"state_dict": {f"module.{k}": v for k, v in sd.items()}}]):
        torch.save(obj, tmp_path / f"{i}.pt")
        got = _read(tmp_path / f"{i}.pt")
        assert got.keys() == sd.keys() and all(torch.equal(got[k], v) for k, v in sd.items())


def test_safetensors_files_are_read_with_safetensors(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in _module().state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    got = _read(tmp_path / "w.safetensors")
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(LoadError, match=r"bad\.safetensors could not be loaded safely \(safetensors\)"):
        _read(tmp_path / "bad.safetensors")


def test_unreadable_inputs_name_the_file(tmp_path):
    with pytest.raises(LoadError, match=r"test checkpoint .*nope\.pt does not exist"):
        _read(tmp_path / "nope.pt")
    with pytest.raises(LoadError, match="is a directory, not a file"):
        _read(tmp_path)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(LoadError, match=r"is not a state dict \(got list\)"):
        _read(tmp_path / "list.pt")
    torch.save({}, tmp_path / "empty.pt")
    with pytest.raises(LoadError, match=r"is not a state dict \(got an empty dict\)"):
        _read(tmp_path / "empty.pt")


def test_load_strict_names_missing_unexpected_and_misshapen_keys():
    sd = _module().state_dict()
    target = _module()
    with pytest.raises(LoadError, match=r"^f\.pt does not fit tiny: missing \['1\.bias'\], unexpected \[\]$"):
        checkpoints.load_strict(target, {k: v for k, v in sd.items() if k != "1.bias"}, source="f.pt", model="tiny",
                                error=LoadError)
    with pytest.raises(LoadError, match=r"unexpected keys \['extra'\] \(1 in all\)"):
        checkpoints.load_strict(target, {**sd, "extra": torch.zeros(1)}, source="f.pt", model="tiny", error=LoadError,
                                counted=True)
    with pytest.raises(LoadError, match=r"shape mismatch \['0\.bias \(5,\) vs \(2,\)'\]"):
        checkpoints.load_strict(target, {**sd, "0.bias": torch.zeros(5)}, source="f.pt", model="tiny", error=LoadError)
    checkpoints.load_strict(target, sd, source="f.pt", model="tiny", error=LoadError)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in sd.items())
