"""Users' avatars under ``/mmopen/<key>/<size>``: a key stops working once its user changes
avatar (the old URL 404s), as WeChat's do."""

from __future__ import annotations

from keeper.wechat.simulator.images import avatar_png
from keeper.wechat.simulator.records import _NOT_FOUND, AVATAR_SIZES, _Reply
from keeper.wechat.simulator.state import SimState


class AvatarHost(SimState):
    """Serves ``/mmopen/`` (not API calls: never counted, forced or failed)."""

    def _avatar(self, path: str) -> _Reply:
        parts = path.split("/")  # "", "mmopen", key, size
        size = int(parts[3]) if len(parts) == 4 and parts[3].isdigit() else -1
        key = parts[2] if len(parts) == 4 else ""
        with self._lock:
            owner = self._image_owner.get(key)
            live = size in AVATAR_SIZES and owner is not None and self._image_key[owner] == key
            self._avatars["served" if live else "not_found"] += 1
            if live:
                self._avatar_downloads[key] = self._avatar_downloads.get(key, 0) + 1
        return _Reply(200, "image/png", avatar_png(key, AVATAR_SIZES[size])) if live else _NOT_FOUND
