"""Avatars end to end: profile reads against the simulator over loopback, files on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from keeper.avatars.sweep_pass import cleanup
from keeper.config import build_config
from keeper.crypto import create_key_file
from keeper.service.runtime import Runtime
from keeper.wechat.simulator import Simulator
from tests.conftest import APPID
from tests.e2e.helpers import make_grant
from tests.sweep.test_engine import put, sweep


@pytest.fixture
def rt(migrated_url: str, sim: Simulator, tmp_path: Path) -> Iterator[Runtime]:
    key = tmp_path / "test.key"
    create_key_file(key)
    config = build_config(
        {"database_url": migrated_url, "api_base": sim.url, "workers": 4,
         "read_timeout": 0.5, "connect_timeout": 0.5, "lease": "1m", "profile_interval": 0,
         "avatar_timeout": 0.5,
         "avatar_dir": str(tmp_path / "avatars"), "avatar_hosts": ["127.0.0.1"],
         "encryption_key_file": str(key), "apps": [{"appid": APPID}]},
        env={}, source="test",
    )
    runtime = Runtime.build(config)
    yield runtime
    runtime.close()


def profile(rt: Runtime, openid: str) -> dict[str, object]:
    g = rt.store.get_grant(APPID, openid)
    assert g is not None
    p = rt.store.profile(g.id)
    assert p is not None
    return p


def files(rt: Runtime) -> set[str]:
    root = rt.config.avatar_dir
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_a_changed_avatar_is_replaced_and_an_unchanged_one_not_downloaded_again(
    rt: Runtime, sim: Simulator
) -> None:
    put(rt, sim, make_grant("o1"))
    first = sweep(rt)
    assert first["avatars_saved"] == 1
    p1 = profile(rt, "o1")
    assert p1["avatar_type"] == "image/png" and p1["avatar_url"] == p1["headimgurl"]
    assert files(rt) == {p1["avatar_path"]}
    path = str(p1["avatar_path"])
    assert "o1" not in path and str(p1["avatar_sha256"]) in path
    served = sim.stats()["avatars_served"]

    second = sweep(rt)  # the profile is read again (profile_interval 0), the picture is the same
    assert second["avatars_saved"] == 0 and second["profiles_fetched"] == 1
    assert sim.stats()["avatars_served"] == served

    sim.set_avatar("o1", "newpicture")
    third = sweep(rt)
    assert third["avatars_saved"] == 1
    p3 = profile(rt, "o1")
    assert p3["avatar_sha256"] != p1["avatar_sha256"] and str(p3["headimgurl"]).endswith("/132")
    assert files(rt) == {p1["avatar_path"], p3["avatar_path"]}
    import time
    removed = cleanup(rt.store, rt.config.avatar_dir, min_age_s=0, now=time.time() + 1)
    assert removed["removed"] == 1 and files(rt) == {p3["avatar_path"]}


def test_a_missing_or_damaged_file_is_downloaded_again(rt: Runtime, sim: Simulator) -> None:
    put(rt, sim, make_grant("o1"))
    sweep(rt)
    path = rt.config.avatar_dir / str(profile(rt, "o1")["avatar_path"])
    path.write_bytes(b"damaged")
    assert sweep(rt)["avatars_saved"] == 1
    assert path.read_bytes().startswith(b"\x89PNG")


def test_two_users_with_the_same_picture_share_one_file(rt: Runtime, sim: Simulator) -> None:
    put(rt, sim, make_grant("o1"), make_grant("o2"))
    sim.set_avatar("o1", "shared")
    sim.set_avatar("o2", "shared")
    sweep(rt)
    assert profile(rt, "o1")["avatar_path"] == profile(rt, "o2")["avatar_path"]
    assert len(files(rt)) == 1


def test_no_avatar_is_recorded_and_the_old_file_kept(rt: Runtime, sim: Simulator) -> None:
    put(rt, sim, make_grant("o1"))
    sweep(rt)
    before = profile(rt, "o1")
    sim.set_avatar("o1", None)
    sweep(rt)
    after = profile(rt, "o1")
    assert after["headimgurl"] == "" and after["avatar_url"] == ""
    assert after["avatar_path"] == before["avatar_path"] and files(rt)
    from datetime import UTC, datetime

    status = rt.store.status(datetime.now(UTC))
    assert status["avatars_missing"] == 0 and status["avatars_saved"] == 1


HOSTILE = ["endless", "html", "redirect-out", "redirect-loop", "truncated", "bomb", "slow"]


def test_every_hostile_avatar_is_refused_once_without_harm(rt: Runtime, sim: Simulator) -> None:
    users = [make_grant(f"h-{kind}") for kind in HOSTILE] + [make_grant("ok")]
    put(rt, sim, *users)
    for kind in HOSTILE:
        sim.set_avatar_url(f"h-{kind}", sim.hostile_url(kind))
    with capture_logs() as logs:
        summary = sweep(rt)
    refused = [e for e in logs if e["event"] == "avatar.refused"]
    assert sorted(e["openid"] for e in refused) == sorted(f"h-{k}" for k in HOSTILE)
    assert summary["avatars_refused"] == len(HOSTILE) and summary["avatars_saved"] == 1
    assert summary["access_tokens_refreshed"] + summary["profiles_fetched"] >= len(users)
    assert len(files(rt)) == 1  # only the good one; no half files either
    for kind in HOSTILE:
        p = profile(rt, f"h-{kind}")
        assert p["avatar_sha256"] is None and p["avatar_error"]
    from datetime import UTC, datetime

    assert rt.store.status(datetime.now(UTC))["avatars_refused"] == len(HOSTILE)


@pytest.mark.parametrize("kind", ["redirect-ok", "gif", "webp", "jpeg"])
def test_allowed_redirects_and_every_image_kind_are_saved(
    rt: Runtime, sim: Simulator, kind: str
) -> None:
    put(rt, sim, make_grant("o1"))
    sim.set_avatar_url("o1", sim.hostile_url(kind))
    assert sweep(rt)["avatars_saved"] == 1
    mime = profile(rt, "o1")["avatar_type"]
    assert mime == {"redirect-ok": "image/png", "gif": "image/gif", "webp": "image/webp",
                    "jpeg": "image/jpeg"}[kind]
