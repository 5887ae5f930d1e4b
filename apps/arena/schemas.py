"""Request and response bodies: every field bounded, every type strict.

Ids are 63-bit integers, past JavaScript's exact range, so they travel as
decimal strings in JSON and are accepted as strings or integers.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

Username = Annotated[
    str, StringConstraints(strip_whitespace=True, to_lower=True, pattern=r"^[A-Za-z0-9_]{3,32}$")
]
# No NUL: the password hasher refuses it, so the schema says so up front.
Password = Annotated[str, StringConstraints(min_length=8, max_length=128, pattern=r"^[^\x00]*$")]
# No control characters: PostgreSQL refuses NUL in text where SQLite stores it, so the
# schema refuses it for both (one answer, 422, on every backend), and the rest of C0
# has no business in a one-line name. No surrounding whitespace either, refused rather
# than stripped: stripping makes the server accept what the published schema forbids
# (a 65-character name ending in a space), which schema-driven clients count as a bug.
RoomName = Annotated[
    str,
    StringConstraints(
        min_length=1,
        max_length=64,
        pattern=r"^[^\s\x00-\x1f\x7f]([^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f])?$",
    ),
]
# A message may span lines and hold tabs; other control characters (NUL first) are refused.
Body = Annotated[
    str, StringConstraints(min_length=1, max_length=2000, pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]*$")
]
Amount = Annotated[StrictInt, Field(gt=0, le=1_000_000_000)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Credentials(_Strict):
    username: Username
    password: Password


class RefreshIn(_Strict):
    refresh_token: Annotated[str, StringConstraints(min_length=1, max_length=256)]


class TokensOut(BaseModel):
    access_token: str
    refresh_token: str
    token_type: str = "bearer"
    expires_in: int


class UserOut(BaseModel):
    id: str
    username: str


class RoomIn(_Strict):
    name: RoomName


class RoomOut(BaseModel):
    id: str
    name: str
    owner_id: str


class RoomList(BaseModel):
    items: list[RoomOut]


class MessageIn(_Strict):
    body: Body


class MessageOut(BaseModel):
    id: str
    room_id: str
    author: str
    body: str
    created_at: float


class MessagePage(BaseModel):
    items: list[MessageOut]
    next_cursor: str | None


class TransferIn(_Strict):
    to: Username
    amount: Amount


class TransferOut(BaseModel):
    id: str
    to: str
    amount: int
    status: str
    reason: str | None = None


class WalletOut(BaseModel):
    user_id: str
    balance: int


class LeaderRow(BaseModel):
    username: str
    points: int


class Leaderboard(BaseModel):
    items: list[LeaderRow]
