"""Pydantic models of the admin routes: τ (a value or a target), the τ controller, reloads."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from modelpack.sweep import TARGET_KINDS, Expected, Target
from service.json_fields import Fraction, NoNulls, PositiveNumber, one_of
from service.packages import PACKAGE_NAME
from service.schemas import ModelRef
from service.tau_controller import ControllerConfig, Quantity, TauController
from service.tau_controller import State as ControllerState

TargetKind = Literal["flop_saving", "max_top1_loss", "mflops"]  # modelpack.sweep.TARGET_KINDS


class TauTarget(NoNulls):
    """One target to choose τ from the package's sweep (exactly one field)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=one_of(*TARGET_KINDS))

    flop_saving: Fraction | SkipJsonSchema[None] = Field(
        default=None, examples=[0.4],
        description="Save at least this fraction of the original model's FLOPs; the most "
        "accurate τ that does.")
    max_top1_loss: Fraction | SkipJsonSchema[None] = Field(
        default=None, examples=[0.005],
        description="Lose at most this much top-1 against the original (0.005 = half a point); "
        "the cheapest τ that does.")
    mflops: PositiveNumber | SkipJsonSchema[None] = Field(
        default=None, examples=[600.0],
        description="Spend at most this many MFLOPs an image on average; the most accurate τ "
        "that does.")

    @model_validator(mode="after")
    def _exactly_one(self) -> TauTarget:
        given = [k for k in TARGET_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(TARGET_KINDS)}, got "
                             f"{', '.join(given) or 'none'}")
        return self

    def to_target(self) -> Target:
        kind = next(k for k in TARGET_KINDS if getattr(self, k) is not None)
        return Target(kind, float(getattr(self, kind)))


class TauUpdate(NoNulls):
    model_config = ConfigDict(extra="forbid", json_schema_extra=one_of("tau", "target"))

    tau: Fraction | SkipJsonSchema[None] = Field(
        default=None, examples=[0.7],
        description="New τ in [0, 1]: 0 runs one head per image, 1 runs all.")
    target: TauTarget | SkipJsonSchema[None] = Field(default=None, description="Instead of tau: choose τ from "
                                     "the package's τ sweep to meet this target.")

    @model_validator(mode="after")
    def _tau_or_target(self) -> TauUpdate:
        if (self.tau is None) == (self.target is None):
            raise ValueError('give either "tau" or "target", not both or neither')
        return self


class ExpectedFigures(BaseModel):
    """What the offline τ sweep predicts at this τ (validation split of the training run)."""

    top1: float
    top5: float
    mean_flops: float
    flop_saving: float = Field(description="1 - mean_flops / original FLOPs.")
    mean_heads: float
    cluster_accuracy: float
    method: Literal["exact", "interpolated", "nearest"] = Field(
        description="exact: a swept τ; interpolated: linear between the two neighbouring swept "
        "τs; nearest: outside the swept range.")
    sweep_taus: list[float] = Field(description="The swept τ(s) the figures come from.")


class TauState(BaseModel):
    tau: float
    default_tau: float
    expected: ExpectedFigures | None = Field(description="null when the package has no τ sweep.")


class TauChanged(TauState):
    previous: float = Field(description="τ before this change.")
    controller_stopped: bool = Field(default=False, description="The τ controller was running "
                                     "and stopped: an operator's τ pins it.")
    target: dict[TargetKind, float] | None = Field(
        default=None, min_length=1, max_length=1, examples=[{"flop_saving": 0.4}],
        description="The target τ was chosen for, when one was given.")


class ControllerStatus(BaseModel):
    """The τ controller now; fields that do not apply (it is off, no window judged yet) are
    left out."""

    state: ControllerState = Field(description="off: not running; idle: too few requests in the "
                                   "last window to judge; holding, raising, lowering: what the "
                                   "last window decided; at_bound: τ is at tau_min or tau_max.")
    tau: float = Field(description="τ served now.")
    config: ControllerConfig | SkipJsonSchema[None] = None
    quantity: Quantity | SkipJsonSchema[None] = Field(
        default=None, description="What the controller holds, in base units.")
    target: float | SkipJsonSchema[None] = Field(default=None, description="In `quantity`'s units.")
    measured: float | SkipJsonSchema[None] = Field(
        default=None, description="The last window's value with enough requests.")
    step: float | SkipJsonSchema[None] = Field(default=None, description="The next τ step.")
    ceiling: float | SkipJsonSchema[None] = Field(
        default=None, description="A τ that broke the target at about today's request rate: "
        "not raised to again until the rate changes.")
    windows: int | SkipJsonSchema[None] = Field(default=None, description="Windows judged.")

    @classmethod
    def of(cls, controller: TauController | None, tau: float) -> ControllerStatus:
        if controller is None:
            return cls(state="off", tau=tau)
        c = controller
        return cls(state=c.state, tau=tau, config=c.config, quantity=c.config.quantity,
                   target=c.config.target, measured=c.measured, step=c.step, ceiling=c.ceiling,
                   windows=c.windows)


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    package: str = Field(pattern=PACKAGE_NAME, max_length=255, examples=["tiny-imagenet-200-v2"],
                         description="Name of a package directory inside the models root "
                         "(CPCNN_MODELS_ROOT); a plain name, not a path.")


class Reloaded(BaseModel):
    model: ModelRef = Field(description="The package served from now on.")
    previous: ModelRef = Field(description="The package it replaced.")
    tau: float = Field(description="τ for requests that give none: kept if an operator set it "
                       "(CPCNN_TAU or PUT /admin/tau), else the new package's default_tau.")
    default_tau: float = Field(description="The new package's default τ.")
    seconds: float = Field(description="Time to load, validate and warm up the new package.")


def expected_figures(e: Expected | None) -> ExpectedFigures | None:
    if e is None:
        return None
    return ExpectedFigures(top1=e.top1, top5=e.top5, mean_flops=e.mean_flops,
                           flop_saving=e.flop_saving, mean_heads=e.mean_heads,
                           cluster_accuracy=e.cluster_accuracy, method=e.method,
                           sweep_taus=list(e.sweep_taus))


