"""Stateful loaders, random streams and structure checks that exact resume rests on."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from helpers import TinyModel, fit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_ckpt import CheckpointCallback, CheckpointWarning, IncompatibleCheckpointError
from lightning_ckpt.resumable import (
    ResumableRandomSampler,
    WorkerRandomState,
    make_stateful,
    model_mismatch,
    optimizer_mismatch,
)
from lightning_ckpt.rng import capture_rng, restore_rng

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning", "ignore:.*set_vital.*")

DS = TensorDataset(torch.arange(20.0))


def batches(loader: DataLoader) -> list[list[float]]:
    return [b[0].tolist() for b in loader]


@pytest.mark.parametrize("plain", [True, False])
def test_rng_roundtrip_through_weights_only_load(plain: bool) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng(plain=plain)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_converted_loader_yields_the_same_batches_as_torch() -> None:
    plain = DataLoader(DS, batch_size=3, shuffle=True, drop_last=True)
    converted = make_stateful(DataLoader(DS, batch_size=3, shuffle=True, drop_last=True))
    assert isinstance(converted, StatefulDataLoader)
    assert isinstance(converted.sampler, ResumableRandomSampler)
    torch.manual_seed(0)
    expected = batches(plain) + batches(plain)
    torch.manual_seed(0)
    assert batches(converted) + batches(converted) == expected


def test_converted_loader_resumes_mid_epoch() -> None:
    torch.manual_seed(0)
    loader = make_stateful(DataLoader(DS, batch_size=4, shuffle=True))
    it = iter(loader)
    seen = [next(it)[0].tolist() for _ in range(2)]
    state = loader.state_dict()
    rest = [b[0].tolist() for b in it]
    fresh = make_stateful(DataLoader(DS, batch_size=4, shuffle=True))
    fresh.load_state_dict(state)
    torch.manual_seed(123)  # the global RNG no longer matters: the permutation comes from the state
    assert batches(fresh) == rest and len(seen + rest) == 5


def test_what_is_left_alone() -> None:
    stateful = StatefulDataLoader(DS, batch_size=2)
    assert make_stateful(stateful) is stateful

    class MyLoader(DataLoader):
        pass

    mine = MyLoader(DS, batch_size=2)
    assert make_stateful(mine) is mine
    nested = make_stateful({"a": DataLoader(DS), "b": [DataLoader(DS)]})
    assert isinstance(nested["a"], StatefulDataLoader) and isinstance(nested["b"][0], StatefulDataLoader)


def test_workers_get_their_random_state_carried() -> None:
    converted = make_stateful(DataLoader(DS, batch_size=2, num_workers=2))
    assert isinstance(converted.dataset, WorkerRandomState)
    assert converted.dataset[3] == DS[3] and len(converted.dataset) == len(DS)
    assert converted.dataset.tensors is DS.tensors  # attributes reach the wrapped dataset


def test_model_mismatch_names_keys_and_shapes() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    other = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 1), nn.Linear(1, 1))
    problems = model_mismatch(model.state_dict(), other.state_dict())
    text = "; ".join(problems)
    assert "not in the model: 2.bias, 2.weight" in text
    assert "0.weight: checkpoint (16, 4), model (8, 4)" in text
    assert model_mismatch(model.state_dict(), model.state_dict()) == []
    assert all("not in the model" not in p for p in model_mismatch(model.state_dict(), other.state_dict(), False))


def test_optimizer_mismatch() -> None:
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    state = opt.state_dict()
    assert optimizer_mismatch([opt], [state]) == []
    bigger = nn.Linear(4, 3)
    problems = optimizer_mismatch([torch.optim.Adam(bigger.parameters())], [state], {id(bigger.weight): "w"})
    assert any("w exp_avg: checkpoint (2, 4), parameter (3, 4)" in p for p in problems)
    two = torch.optim.Adam([{"params": [bigger.weight]}, {"params": [bigger.bias]}])
    assert "parameter groups" in optimizer_mismatch([two], [state])[0]
    assert "optimizer(s)" in optimizer_mismatch([opt, opt], [state])[0]


class WiderModel(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def test_resuming_into_a_different_model_is_an_error(tmp_path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path), save_last=True)
    fit(cb, max_epochs=1)
    from helpers import data, trainer

    cb2 = CheckpointCallback(dirpath=str(tmp_path))
    train, val = data()
    with pytest.raises(IncompatibleCheckpointError, match=r"net.0.weight: checkpoint \(8, 4\), model \(16, 4\)"):
        trainer([cb2], max_epochs=2).fit(WiderModel(), train, val, ckpt_path="last")


class TwoGroups(TinyModel):
    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.Adam([{"params": self.net[0].parameters()}, {"params": self.net[2].parameters()}])


def test_resuming_into_a_different_optimizer_is_an_error(tmp_path) -> None:
    cb = CheckpointCallback(dirpath=str(tmp_path), save_last=True)
    fit(cb, max_epochs=1)
    from helpers import data, trainer

    train, val = data()
    with pytest.raises(IncompatibleCheckpointError, match="parameter groups"):
        trainer([CheckpointCallback(dirpath=str(tmp_path))], max_epochs=2).fit(TwoGroups(), train, val,
                                                                              ckpt_path="last")


def test_mid_epoch_resume_with_an_unconvertible_loader_warns(tmp_path) -> None:
    class MyLoader(DataLoader):
        pass

    from helpers import trainer

    x = torch.randn(64, 4)
    loader = MyLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=True)
    cb = CheckpointCallback(dirpath=str(tmp_path), every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer([cb], max_epochs=1).fit(TinyModel(), loader)
    cb2 = CheckpointCallback(dirpath=str(tmp_path), every_n_train_steps=3, save_top_k=-1, filename="{step}")
    with pytest.warns(CheckpointWarning, match="cannot restore their position"):
        trainer([cb2], max_epochs=1).fit(TinyModel(), loader, ckpt_path=cb.manager.url_of("step=3.ckpt"))


def test_exact_resume_off_leaves_loaders_alone(tmp_path) -> None:
    seen = {}

    class Probe(CheckpointCallback):
        def on_train_start(self, trainer, pl_module):  # noqa: ANN001
            super().on_train_start(trainer, pl_module)
            seen["types"] = [type(dl).__name__ for dl in trainer.fit_loop._combined_loader.flattened]

    fit(Probe(dirpath=str(tmp_path), exact_resume=False), max_epochs=1)
    assert seen["types"] == ["DataLoader"]
    fit(Probe(dirpath=str(tmp_path / "b")), max_epochs=1)
    assert seen["types"] == ["StatefulDataLoader"]
    ckpt = torch.load(tmp_path / "b" / "epoch=0-step=8.ckpt", weights_only=True)
    (state,) = ckpt["callbacks"].values()
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
