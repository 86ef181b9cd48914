"""Muon (airbench94_muon): orthogonalised Nesterov steps on the hidden conv filters, Nesterov SGD on the rest
(the head and a trainable conv reading the image included: ``optim.muon_groups``).

``--opt muon`` picks it; the optimizer itself is ``optim.MuonSGD``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..knobs import knob
from . import RunInfo, Technique, technique


@dataclass
class MuonFields:
    muon_lr: float = knob(0.24, "--opt muon: peak lr of the conv filters (orthogonalised steps, so not scaled "
                                "by --lr-unit)")
    muon_momentum: float = knob(0.6, "--opt muon: Nesterov momentum of the conv filters (--momentum is the SGD "
                                     "part's)")


@technique
class Muon(Technique):
    title, fields, order = "Muon (--opt muon)", MuonFields, 10

    def __init__(self, lr: float, momentum: float):
        self.lr, self.momentum = lr, momentum

    @classmethod
    def check(cls, cfg, need) -> None:
        need(cfg.muon_lr > 0, "muon_lr", "must be positive")
        need(0 <= cfg.muon_momentum < 1, "muon_momentum", "must be in [0, 1)")

    @classmethod
    def create(cls, cfg, run: RunInfo) -> "Muon | None":
        return cls(cfg.muon_lr, cfg.muon_momentum) if cfg.opt == "muon" else None

    def optimizer_options(self) -> dict:
        return {"muon_lr": self.lr, "muon_momentum": self.momentum}
