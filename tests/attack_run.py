"""A tiny training run for tests/test_exact_attack.py: attack_run.py CFG_JSON OUTDIR [RESUME_CKPT]."""
import json
import os
import random
import sys
import warnings

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_ckpt import CheckpointCallback

cfg = json.loads(sys.argv[1]); out = sys.argv[2]; resume = sys.argv[3] if len(sys.argv) > 3 else None
N = cfg.get("n", 24)

class DS(Dataset):
    def __init__(s): g = torch.Generator().manual_seed(0); s.x = torch.randn(N, 4, generator=g); s.y = torch.randn(N, 1, generator=g)
    def __len__(s): return N
    def __getitem__(s, i):
        x = s.x[i]
        if cfg.get("aug"): x = x + 0.1 * torch.rand(4)
        return x, s.y[i]

class IDS(IterableDataset):
    def __init__(s, withlen): s.d = DS(); s.withlen = withlen
    def __iter__(s):
        for i in torch.randperm(N).tolist(): yield s.d[i]
    def __len__(s):
        if not s.withlen: raise TypeError
        return N

def loader(seed_off=0):
    kw = {"batch_size": cfg.get("bs", 4), "num_workers": cfg.get("workers", 0)}
    if kw["num_workers"] and cfg.get("persistent"): kw["persistent_workers"] = True
    if cfg.get("iterable") is not None:
        return DataLoader(IDS(cfg["iterable"]), **kw)
    if cfg.get("gen"): kw["generator"] = torch.Generator().manual_seed(123 + seed_off)
    return DataLoader(DS(), shuffle=cfg.get("shuffle", True), **kw)

class M(L.LightningModule):
    def __init__(s):
        super().__init__(); s.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    def training_step(s, b, i):
        if cfg.get("multi"): b = b["a"] if isinstance(b, dict) else b[0]
        x, y = b
        if cfg.get("pyrand"): x = x * (1 + random.random() + float(np.random.rand()))
        return torch.nn.functional.mse_loss(s.net(x), y)
    def validation_step(s, b, i):
        x, y = b; l = torch.nn.functional.mse_loss(s.net(x), y); s.log("val_loss", l); return l
    def train_dataloader(s):
        if cfg.get("multi") == "dict": return {"a": loader(), "b": loader(1)}
        if cfg.get("multi") == "combined":
            from lightning.pytorch.utilities import CombinedLoader
            return CombinedLoader({"a": loader(), "b": loader(1)}, "max_size_cycle")
        return loader()
    def val_dataloader(s): return DataLoader(DS(), batch_size=8)
    def configure_optimizers(s):
        o = torch.optim.Adam(s.parameters(), lr=1e-2)
        sch = cfg.get("sched", "step")
        if sch == "step": return {"optimizer": o, "lr_scheduler": torch.optim.lr_scheduler.StepLR(o, 1, 0.7)}
        if sch == "onecycle":
            return {"optimizer": o, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.OneCycleLR(o, 0.05, total_steps=500), "interval": "step"}}
        return o

if cfg.get("seedw"): L.seed_everything(7, workers=True, verbose=False)
else: torch.manual_seed(7); random.seed(7); np.random.seed(7)
cbkw = {"dirpath": os.path.join(out, "ck"), "save_top_k": -1, "filename": "{epoch}-{step}",
        "every_n_epochs": cfg.get("every_n_epochs", 1)}
if cfg.get("async"): cbkw["async_save"] = True
if cfg.get("every_n_train_steps"): cbkw.pop("every_n_epochs"); cbkw["every_n_train_steps"] = cfg["every_n_train_steps"]
cb = CheckpointCallback(**cbkw)
tk = {"max_epochs": cfg.get("epochs", 3), "accelerator": "cpu", "devices": 1, "logger": False,
      "enable_progress_bar": False, "enable_model_summary": False, "callbacks": [cb],
      "num_sanity_val_steps": cfg.get("sanity", 2)}
for k in ("accumulate_grad_batches", "check_val_every_n_epoch", "val_check_interval", "limit_val_batches",
          "limit_train_batches", "max_steps", "deterministic", "precision"):
    if k in cfg: tk[k] = cfg[k]
with warnings.catch_warnings(record=True) as ws:
    warnings.simplefilter("always")
    tr = L.Trainer(**tk)
    m = M()
    tr.fit(m, ckpt_path=resume)
    if cfg.get("async"): cb.wait() if hasattr(cb, "wait") else None
wl = [f"{w.category.__name__}: {str(w.message)[:160]}" for w in ws]
opt = tr.optimizers[0].state_dict()
torch.save({"model": m.state_dict(), "opt": opt}, os.path.join(out, "final.pt"))
with open(os.path.join(out, "warnings.json"), "w") as f:
    json.dump(wl, f)
