"""The wire format of the ``input`` data channel: one JSON object per message, ``t`` its discriminator
(the table is in :mod:`browservm.guest.xinput`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Move(_Msg):
    t: Literal["move"]
    x: int
    y: int


class Button(_Msg):
    t: Literal["down", "up"]
    button: int = Field(1, ge=1, le=3)
    x: int
    y: int


class Wheel(_Msg):
    t: Literal["wheel"]
    dx: float = 0.0
    dy: float = 0.0
    x: int
    y: int


class Key(_Msg):
    t: Literal["key"]
    key: str = Field(max_length=64)
    code: str = Field("", max_length=64)
    down: bool


class Text(_Msg):
    t: Literal["text"]
    text: str = Field(max_length=10_000)


class ClipboardText(_Msg):
    t: Literal["clipboard"]
    text: str


class Ping(_Msg):
    t: Literal["ping"]
    ts: float | int | str


class Release(_Msg):
    t: Literal["release"]


class Resize(_Msg):
    t: Literal["resize"]
    width: int = Field(ge=1, le=16384)
    height: int = Field(ge=1, le=16384)


InputMessage = Annotated[
    Move | Button | Wheel | Key | Text | ClipboardText | Ping | Release | Resize, Field(discriminator="t")
]
INPUT: TypeAdapter[InputMessage] = TypeAdapter(InputMessage)
