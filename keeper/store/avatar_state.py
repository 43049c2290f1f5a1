"""Avatar rows of the store: which profiles need their avatar checked, and what was saved.

A mixin of :class:`keeper.store.grants.Store`, which provides ``engine``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select, update

from keeper.core.events import AVATAR_CHANGED, NewEvent
from keeper.store.db import translate
from keeper.store.events import record_events
from keeper.store.schema import grants, profiles


@dataclass(frozen=True)
class AvatarDue:
    """A profile read since its avatar was last checked."""

    grant_id: int
    appid: str
    openid: str
    headimgurl: str
    avatar_url: str | None
    avatar_sha256: str | None
    avatar_path: str | None


class AvatarState:
    """Avatar bookkeeping in the ``profiles`` table."""

    engine: Engine

    def due_avatars(self, limit: int, after_id: int = 0) -> list[AvatarDue]:
        with translate("listing avatars to check"), self.engine.connect() as conn:
            rows = conn.execute(
                select(profiles.c.grant_id, grants.c.appid, grants.c.openid,
                       profiles.c.headimgurl, profiles.c.avatar_url, profiles.c.avatar_sha256,
                       profiles.c.avatar_path)
                .join(grants, grants.c.id == profiles.c.grant_id)
                .where(profiles.c.avatar_due.is_(True), profiles.c.grant_id > after_id)
                .order_by(profiles.c.grant_id).limit(limit)
            ).all()
        return [AvatarDue(r.grant_id, r.appid, r.openid, r.headimgurl or "", r.avatar_url,
                          r.avatar_sha256, r.avatar_path) for r in rows]

    def record_avatar(
        self, due: AvatarDue, *, now: datetime, sha256: str | None = None,
        path: str | None = None, size: int | None = None, mime: str | None = None,
        error: str | None = None, clear_file: bool = False,
    ) -> bool:
        """The outcome of checking one avatar. Written only if the profile still shows the
        same ``headimgurl`` (a newer read keeps it due); True if written. A copy whose SHA-256
        differs from the one kept before records ``avatar.changed`` in the same transaction."""
        values: dict[str, object] = {"avatar_due": False, "avatar_error": error}
        if error is None:
            values["avatar_url"] = due.headimgurl
        if sha256 is not None:
            values.update(avatar_sha256=sha256, avatar_path=path, avatar_size=size,
                          avatar_type=mime, avatar_saved_at=now)
        elif clear_file:
            values.update(avatar_sha256=None, avatar_path=None, avatar_size=None,
                          avatar_type=None, avatar_saved_at=None)
        new_sha = sha256 if sha256 is not None else (None if clear_file else due.avatar_sha256)
        with translate("recording an avatar"), self.engine.begin() as conn:
            result = conn.execute(
                update(profiles)
                .where(profiles.c.grant_id == due.grant_id,
                       profiles.c.headimgurl == due.headimgurl)
                .values(values)
            )
            written = result.rowcount == 1
            # The first copy of a user's avatar is no change (as the first profile is not).
            if written and due.avatar_sha256 is not None and new_sha != due.avatar_sha256:
                unionid = conn.execute(select(grants.c.unionid)
                                       .where(grants.c.id == due.grant_id)).scalar()
                record_events(conn, [NewEvent(
                    AVATAR_CHANGED, due.appid, due.openid, unionid,
                    {"old_sha256": due.avatar_sha256, "new_sha256": new_sha})], now)
        return bool(written)

    def avatar_paths(self) -> set[str]:
        """Every file some profile points to (relative to avatar_dir)."""
        with translate("listing avatar files"), self.engine.connect() as conn:
            return {p for p in conn.execute(
                select(profiles.c.avatar_path).distinct()
                .where(profiles.c.avatar_path.is_not(None))
            ).scalars()}
