"""The WeChat simulator, spoken to over real loopback HTTP as keeper speaks to WeChat."""

from __future__ import annotations

import io
import json
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from keeper.wechat.simulator import (
    ERRCODES,
    FAILURE_KINDS,
    HOSTILE_KINDS,
    HOSTILE_OK_KEY,
    HOSTILE_REDIRECT_OUT,
    ODD_ANSWERS,
    ODD_BY_NAME,
    SimQuota,
    Simulator,
    hostile,
    images,
    parse_quota,
)
from keeper.wechat.simulator.cli import main

APPID, SECRET = "wx-app-1", "app-secret-1"
OTHER_APPID, OTHER_SECRET = "wx-app-2", "app-secret-2"
T0 = 1_700_000_000.0  # a multiple of 2 s, so "3/2 seconds" windows start exactly here
DAY_S = 86400.0
REPO = Path(__file__).resolve().parents[2]
RID = re.compile(r", rid: [0-9a-f]{8}-[0-9a-f]{8}-[0-9a-f]{8}")


class Clock:
    """The simulator's clock, ticked by hand: no test waits for real time to pass."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_sim(clock: Clock) -> Iterator[Callable[..., Simulator]]:
    started: list[Simulator] = []

    def make(**options: Any) -> Simulator:
        options = {"clock": clock, "timeout_sleep_s": 0.3, "seed": 7, **options}
        sim = Simulator(**options)
        sim.add_app(APPID, SECRET)
        sim.add_app(OTHER_APPID, OTHER_SECRET)
        sim.start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture
def sim(make_sim: Callable[..., Simulator]) -> Simulator:
    return make_sim()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def call(http: requests.Session, sim: Simulator, path: str, **params: str) -> dict[str, Any]:
    response = http.get(sim.url + path, params=params, timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain"
    # WeChat sends UTF-8 under a charset-less text/plain: decode it explicitly, as keeper must.
    answer: dict[str, Any] = json.loads(response.content.decode("utf-8"))
    return answer


def exchange(http: requests.Session, sim: Simulator, code: str, /,
             **overrides: str) -> dict[str, Any]:
    params = {"appid": APPID, "secret": SECRET, "code": code,
              "grant_type": "authorization_code", **overrides}
    return call(http, sim, "/sns/oauth2/access_token", **{k: v for k, v in params.items() if v})


def refresh(http: requests.Session, sim: Simulator, token: str, **extra: str) -> dict[str, Any]:
    params = {"appid": APPID, "grant_type": "refresh_token", "refresh_token": token, **extra}
    return call(http, sim, "/sns/oauth2/refresh_token", **params)


def auth(http: requests.Session, sim: Simulator, token: str, openid: str) -> dict[str, Any]:
    return call(http, sim, "/sns/auth", access_token=token, openid=openid)


def userinfo(http: requests.Session, sim: Simulator, token: str, openid: str,
             **extra: str) -> dict[str, Any]:
    return call(http, sim, "/sns/userinfo", access_token=token, openid=openid, **extra)


def add_grant(sim: Simulator, openid: str = "o-user-0001", *, access_in_s: float = 3600.0,
              refresh_age_s: float = DAY_S, **fields: Any) -> tuple[str, str]:
    """A grant whose access token lives access_in_s more seconds; returns (access, refresh)."""
    access, refresh_token = f"AT-{openid}", f"RT-{openid}"
    sim.add_grant(**{"appid": APPID, "openid": openid, "access_token": access,
                     "refresh_token": refresh_token, "access_expires_at": T0 + access_in_s,
                     "refresh_issued_at": T0 - refresh_age_s, **fields})
    return access, refresh_token


def errcode(answer: dict[str, Any]) -> int:
    return int(answer.get("errcode", 0))


# -- code exchange ----------------------------------------------------------------------------


def test_a_code_becomes_a_grant_the_simulator_then_honours(
        sim: Simulator, http: requests.Session) -> None:
    code = sim.issue_code(appid=APPID, openid="o-new", unionid="u-new")
    answer = exchange(http, sim, code)
    assert answer["expires_in"] == 7200
    assert (answer["openid"], answer["scope"], answer["unionid"]) == (
        "o-new", "snsapi_login", "u-new")  # a website's QR login, the default
    assert "is_snapshotuser" not in answer
    assert auth(http, sim, answer["access_token"], "o-new") == {"errcode": 0, "errmsg": "ok"}
    assert refresh(http, sim, answer["refresh_token"])["access_token"] == answer["access_token"]
    assert sim.stats()["codes_issued"] == 1


def test_a_code_is_single_use(sim: Simulator, http: requests.Session) -> None:
    code = sim.issue_code(appid=APPID, openid="o-1")
    assert "access_token" in exchange(http, sim, code)
    assert errcode(exchange(http, sim, code)) == 40163


def test_a_code_whose_answer_was_lost_is_still_consumed(
        sim: Simulator, http: requests.Session) -> None:
    code = sim.issue_code(appid=APPID, openid="o-1")
    sim.force("code", -1)
    assert errcode(exchange(http, sim, code)) == -1
    assert errcode(exchange(http, sim, code)) == 40163  # why keeper never retries an exchange


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"code": "no-such-code"}, 40029),
    ({"appid": "wx-unknown"}, 40013),
    ({"secret": "wrong"}, 40125),
    ({"appid": ""}, 41002),
    ({"secret": ""}, 41004),
    ({"code": ""}, 41008),
    ({"grant_type": "client_credential"}, 40002),
])
def test_code_exchange_errors(sim: Simulator, http: requests.Session,
                              overrides: dict[str, str], expected: int) -> None:
    code = sim.issue_code(appid=APPID, openid="o-1")
    assert errcode(exchange(http, sim, code, **overrides)) == expected


def test_a_code_issued_to_another_app_is_invalid(sim: Simulator, http: requests.Session) -> None:
    code = sim.issue_code(appid=OTHER_APPID, openid="o-1")
    assert errcode(exchange(http, sim, code)) == 40029


def test_a_code_expires_after_its_ttl(sim: Simulator, http: requests.Session,
                                      clock: Clock) -> None:
    code = sim.issue_code(appid=APPID, openid="o-1", ttl_s=300)
    clock.tick(300)
    assert errcode(exchange(http, sim, code)) == 42003


def test_a_snapshot_user_is_marked_and_refused_userinfo(
        sim: Simulator, http: requests.Session) -> None:
    answer = exchange(http, sim, sim.issue_code(appid=APPID, openid="o-snap", snapshot=True))
    assert answer["is_snapshotuser"] == 1
    assert errcode(userinfo(http, sim, answer["access_token"], "o-snap")) == 48001


# -- refresh ----------------------------------------------------------------------------------


def test_refreshing_a_live_access_token_keeps_it_and_pushes_its_expiry(
        sim: Simulator, http: requests.Session, clock: Clock) -> None:
    access, refresh_token = add_grant(sim, access_in_s=600)
    answer = refresh(http, sim, refresh_token)
    assert (answer["access_token"], answer["refresh_token"]) == (access, refresh_token)
    assert (answer["expires_in"], answer["openid"], answer["scope"]) == (
        7200, "o-user-0001", "snsapi_userinfo")
    clock.tick(7199)  # long past the old expiry (600 s)
    assert errcode(auth(http, sim, access, "o-user-0001")) == 0
    clock.tick(1)
    assert errcode(auth(http, sim, access, "o-user-0001")) == 42001


def test_refreshing_an_expired_access_token_issues_a_new_one(
        sim: Simulator, http: requests.Session) -> None:
    old_access, refresh_token = add_grant(sim, access_in_s=0)
    assert errcode(auth(http, sim, old_access, "o-user-0001")) == 42001
    answer = refresh(http, sim, refresh_token)
    assert answer["access_token"] != old_access
    assert answer["refresh_token"] == refresh_token  # no rotation by default
    assert errcode(auth(http, sim, answer["access_token"], "o-user-0001")) == 0
    assert errcode(auth(http, sim, old_access, "o-user-0001")) == 40001


def test_rotation_mode_replaces_the_refresh_token_and_kills_the_old_one(
        make_sim: Callable[..., Simulator], http: requests.Session, clock: Clock) -> None:
    sim = make_sim(rotate_refresh_tokens=True)
    _, old = add_grant(sim, refresh_age_s=29 * DAY_S)
    new = refresh(http, sim, old)["refresh_token"]
    assert new != old
    assert errcode(refresh(http, sim, old)) == 40030
    clock.tick(20 * DAY_S)  # a rotated token starts a new 30 days
    assert refresh(http, sim, new)["refresh_token"] not in (old, new)


def test_rotation_can_be_chosen_per_grant(sim: Simulator, http: requests.Session) -> None:
    _, rotating = add_grant(sim, "o-rot", rotate=True)
    _, fixed = add_grant(sim, "o-fixed")
    assert refresh(http, sim, rotating)["refresh_token"] != rotating
    assert refresh(http, sim, fixed)["refresh_token"] == fixed


def test_a_refresh_token_dies_after_its_lifetime(
        make_sim: Callable[..., Simulator], http: requests.Session, clock: Clock) -> None:
    sim = make_sim()
    _, refresh_token = add_grant(sim, refresh_age_s=30 * DAY_S - 1)
    assert "access_token" in refresh(http, sim, refresh_token)  # refreshing does not renew it
    clock.tick(1)
    assert errcode(refresh(http, sim, refresh_token)) == 42002
    mobile = make_sim(refresh_token_days=180)
    _, long_lived = add_grant(mobile, refresh_age_s=179 * DAY_S)
    assert "access_token" in refresh(http, mobile, long_lived)


def test_a_revoked_grant_answers_42007_everywhere(sim: Simulator, http: requests.Session) -> None:
    access, refresh_token = add_grant(sim, state="revoked")
    assert errcode(refresh(http, sim, refresh_token)) == 42007
    assert errcode(auth(http, sim, access, "o-user-0001")) == 42007
    assert errcode(userinfo(http, sim, access, "o-user-0001")) == 42007


def test_unknown_foreign_or_invalidated_refresh_tokens_answer_40030(
        sim: Simulator, http: requests.Session) -> None:
    _, invalid = add_grant(sim, "o-invalid", state="invalid")
    _, foreign = add_grant(sim, "o-foreign", appid=OTHER_APPID)
    assert errcode(refresh(http, sim, "RT-nobody")) == 40030
    assert errcode(refresh(http, sim, invalid)) == 40030
    assert errcode(refresh(http, sim, foreign)) == 40030
    assert errcode(call(http, sim, "/sns/oauth2/refresh_token", appid="wx-unknown",
                        grant_type="refresh_token", refresh_token=foreign)) == 40013


def test_a_secret_sent_to_refresh_is_answered_but_counted(
        sim: Simulator, http: requests.Session) -> None:
    _, refresh_token = add_grant(sim)
    assert "access_token" in refresh(http, sim, refresh_token, secret=SECRET)
    figures = sim.stats()["endpoints"]["refresh"]  # type: ignore[index]
    assert (figures["ok"], figures["secret_sent"]) == (1, 1)


# -- auth and userinfo ------------------------------------------------------------------------


def test_auth_checks_token_openid_and_expiry(sim: Simulator, http: requests.Session) -> None:
    access, _ = add_grant(sim)
    expired, _ = add_grant(sim, "o-expired", access_in_s=0)
    assert auth(http, sim, access, "o-user-0001") == {"errcode": 0, "errmsg": "ok"}
    assert errcode(auth(http, sim, access, "o-someone-else")) == 40003
    assert errcode(auth(http, sim, "AT-nobody", "o-user-0001")) == 40001
    assert errcode(auth(http, sim, expired, "o-expired")) == 42001
    assert errcode(call(http, sim, "/sns/auth", access_token=access)) == 41009


def test_userinfo_merges_the_grant_profile_over_the_legacy_profile(
        sim: Simulator, http: requests.Session) -> None:
    profile = {"nickname": "小明", "sex": "2"}
    access, _ = add_grant(sim, "o-user-4242", unionid="u-42", profile=profile,
                          legacy_profile=True)
    answer = userinfo(http, sim, access, "o-user-4242")
    assert answer["nickname"] == "小明"
    assert answer["sex"] == "2"  # WeChat has sent sex as a string
    assert (answer["openid"], answer["unionid"], answer["privilege"]) == ("o-user-4242", "u-42", [])
    assert answer["city"] == "深圳"
    assert answer["headimgurl"].startswith(f"{sim.url}/mmopen/")
    assert answer["headimgurl"].endswith("/132")
    english = userinfo(http, sim, access, "o-user-4242", lang="en")
    assert english["city"] == "Shenzhen"
    plain, _ = add_grant(sim, "o-plain-777777", legacy_profile=True)
    assert userinfo(http, sim, plain, "o-plain-777777")["nickname"] == "user-777777"
    assert sim.stats(detail=True)["userinfo_by_openid"] == {"o-user-4242": 2, "o-plain-777777": 1}


def test_userinfo_is_refused_for_snsapi_base(sim: Simulator, http: requests.Session) -> None:
    access, _ = add_grant(sim, scope="snsapi_base")
    snapshot, _ = add_grant(sim, "o-snap", state="snapshot")
    assert errcode(userinfo(http, sim, access, "o-user-0001")) == 48001
    assert errcode(userinfo(http, sim, snapshot, "o-snap")) == 48001
    assert errcode(auth(http, sim, access, "o-user-0001")) == 0


# -- avatars ----------------------------------------------------------------------------------


def png_size(body: bytes) -> tuple[int, int]:
    """Check the PNG is well formed (signature, chunk CRCs, pixel data) and give its size."""
    chunks = png_chunks(body)
    assert list(chunks) == [b"IHDR", b"IDAT", b"IEND"]
    width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
    assert len(zlib.decompress(chunks[b"IDAT"])) == height * (1 + 3 * width)
    return width, height


def test_the_avatar_url_serves_a_valid_png(sim: Simulator, http: requests.Session) -> None:
    access, _ = add_grant(sim)
    url = userinfo(http, sim, access, "o-user-0001")["headimgurl"]
    response = http.get(url, timeout=5)
    assert response.headers["Content-Type"] == "image/png"
    assert png_size(response.content) == (132, 132)
    assert png_size(http.get(url[:-3] + "0", timeout=5).content) == (640, 640)
    assert png_size(http.get(url[:-3] + "46", timeout=5).content) == (46, 46)
    assert http.get(url[:-3] + "100", timeout=5).status_code == 404
    assert sim.stats()["avatars_served"] == 3


def test_a_changed_avatar_kills_the_old_url(sim: Simulator, http: requests.Session) -> None:
    access, _ = add_grant(sim)
    old_url = userinfo(http, sim, access, "o-user-0001")["headimgurl"]
    old_png = http.get(old_url, timeout=5).content
    sim.set_avatar("o-user-0001", "new-face")
    new_url = userinfo(http, sim, access, "o-user-0001")["headimgurl"]
    assert new_url == f"{sim.url}/mmopen/new-face/132"
    assert http.get(old_url, timeout=5).status_code == 404
    assert http.get(new_url, timeout=5).content != old_png  # another colour
    sim.set_avatar("o-user-0001", None)
    assert userinfo(http, sim, access, "o-user-0001")["headimgurl"] == ""
    assert http.get(new_url, timeout=5).status_code == 404


def test_avatar_downloads_are_counted_by_image_key(
        sim: Simulator, http: requests.Session) -> None:
    sim.set_avatar("o-a", "face-a")
    sim.set_avatar("o-b", "face-b")
    for path in ("face-a/132", "face-a/0", "face-b/46", "face-c/132", "face-a/100"):
        http.get(f"{sim.url}/mmopen/{path}", timeout=5)
    stats = sim.stats(detail=True)
    assert stats["avatar_downloads_by_key"] == {"face-a": 2, "face-b": 1}  # 404s not counted
    assert (stats["avatars_served"], stats["avatars_not_found"]) == (3, 2)
    assert "avatar_downloads_by_key" not in sim.stats()
    endpoints: dict[str, dict[str, Any]] = stats["endpoints"]  # type: ignore[assignment]
    assert all(figures["calls"] == 0 for figures in endpoints.values())  # not API calls
    sim.reset_stats()
    assert sim.stats(detail=True)["avatar_downloads_by_key"] == {}


def test_avatars_change_every_nth_profile_read(
        make_sim: Callable[..., Simulator], http: requests.Session) -> None:
    sim = make_sim(avatar_change_every=2)
    access, _ = add_grant(sim)
    other, _ = add_grant(sim, "o-other")

    def headimgurl(token: str = access, openid: str = "o-user-0001") -> str:
        url: str = userinfo(http, sim, token, openid)["headimgurl"]
        assert url.startswith(f"{sim.url}/mmopen/") and url.endswith("/132")
        return url

    urls = [headimgurl() for _ in range(5)]
    assert urls[0] != urls[1] == urls[2] != urls[3] == urls[4]
    assert len(set(urls)) == 3
    assert [http.get(url, timeout=5).status_code for url in set(urls)].count(200) == 1
    assert http.get(urls[4], timeout=5).status_code == 200
    other_url = headimgurl(other, "o-other")  # each user has a count of their own
    assert headimgurl(other, "o-other") != other_url

    # Answers that fail or get lost do not count: only the profiles a client received do.
    sim.force("userinfo", "truncated")
    sim.force("userinfo", 45009)
    http.get(f"{sim.url}/sns/userinfo", params={"access_token": access, "openid": "o-user-0001"},
             timeout=5)
    assert errcode(userinfo(http, sim, access, "o-user-0001")) == 45009
    assert headimgurl() != urls[4]  # the 6th successful read
    sixth = headimgurl()  # the 7th

    sim.configure(avatar_change_every=0)
    assert {headimgurl() for _ in range(3)} == {sixth}
    sim.configure(avatar_change_every=3)  # the count starts again
    assert [headimgurl() == sixth for _ in range(3)] == [True, True, False]
    assert sim.stats(detail=True)["userinfo_by_openid"] == {"o-user-0001": 13, "o-other": 2}
    with pytest.raises(ValueError, match="avatar_change_every"):
        sim.configure(avatar_change_every=-1)
    with pytest.raises(ValueError, match="avatar_change_every"):
        Simulator(avatar_change_every=True)


def test_a_user_headimgurl_can_point_anywhere_until_set_avatar(
        sim: Simulator, http: requests.Session) -> None:
    access, _ = add_grant(sim)
    own_url = userinfo(http, sim, access, "o-user-0001")["headimgurl"]
    sim.set_avatar_url("o-user-0001", sim.hostile_url("endless"))
    assert sim.hostile_url("endless") == f"{sim.url}/hostile/endless/a.png"
    assert userinfo(http, sim, access, "o-user-0001")["headimgurl"] == sim.hostile_url("endless")
    assert http.get(own_url, timeout=5).status_code == 200  # the user's own avatar lives on
    sim.set_avatar_url("o-user-0001", "")
    assert userinfo(http, sim, access, "o-user-0001")["headimgurl"] == ""
    sim.set_avatar("o-user-0001", "back")
    assert userinfo(http, sim, access, "o-user-0001")["headimgurl"] == f"{sim.url}/mmopen/back/132"
    sim.set_avatar_url("o-later", "https://example.com/x.png")  # before the user has a grant
    later, _ = add_grant(sim, "o-later")
    assert userinfo(http, sim, later, "o-later")["headimgurl"] == "https://example.com/x.png"
    with pytest.raises(ValueError, match="hostile kind"):
        sim.hostile_url("nice")


def test_the_admin_api_sets_avatar_urls_and_avatar_changes(
        sim: Simulator, http: requests.Session) -> None:
    access, _ = add_grant(sim)
    admin = f"{sim.url}/_sim"
    hostile = sim.hostile_url("bomb")
    assert http.post(f"{admin}/avatar", json={"openid": "o-user-0001", "url": hostile},
                     timeout=5).json() == {"ok": True}
    assert userinfo(http, sim, access, "o-user-0001")["headimgurl"] == hostile
    both = {"openid": "o-user-0001", "url": hostile, "image_key": "k"}
    assert http.post(f"{admin}/avatar", json=both, timeout=5).status_code == 400
    assert http.post(f"{admin}/avatar", json={"openid": "o-user-0001", "image_key": "k"},
                     timeout=5).json() == {"ok": True}
    assert userinfo(http, sim, access, "o-user-0001")["headimgurl"] == f"{sim.url}/mmopen/k/132"
    assert http.post(f"{admin}/config", json={"avatar_change_every": 1},
                     timeout=5).json() == {"ok": True}
    assert userinfo(http, sim, access, "o-user-0001")["headimgurl"] != f"{sim.url}/mmopen/k/132"
    assert http.post(f"{admin}/config", json={"avatar_change_every": -2},
                     timeout=5).status_code == 400


# -- hostile avatar hosts ---------------------------------------------------------------------


def png_chunks(body: bytes) -> dict[bytes, bytes]:
    """The chunks of a PNG whose signature and CRCs are right (which need not decode)."""
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    chunks: dict[bytes, bytes] = {}
    offset = 8
    while offset < len(body):
        (length,) = struct.unpack(">I", body[offset:offset + 4])
        tag, data = body[offset + 4:offset + 8], body[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", body[offset + 8 + length:offset + 12 + length])
        assert crc == zlib.crc32(tag + data)
        chunks[tag] = data
        offset += 12 + length
    return chunks


def test_hostile_html_truncated_and_bomb(sim: Simulator, http: requests.Session) -> None:
    html = http.get(sim.hostile_url("html"), timeout=5)
    assert (html.status_code, html.headers["Content-Type"]) == (200, "image/jpeg")
    assert html.content.startswith(b"<!DOCTYPE html>")

    truncated = http.get(sim.hostile_url("truncated"), timeout=5)
    assert (truncated.status_code, truncated.headers["Content-Type"]) == (200, "image/png")
    assert truncated.headers["Content-Length"] == str(len(truncated.content))
    whole = images.avatar_png("hostile-truncated", 64)
    assert truncated.content == whole[:len(whole) // 2]
    assert b"IEND" not in truncated.content

    bomb = http.get(sim.hostile_url("bomb"), timeout=5)
    assert (bomb.status_code, bomb.headers["Content-Type"]) == (200, "image/png")
    assert len(bomb.content) < 2000
    chunks = png_chunks(bomb.content)
    assert list(chunks) == [b"IHDR", b"IDAT", b"IEND"]
    # 30000 x 30000, 8-bit grayscale: 900 megapixels declared, a handful of rows present.
    assert struct.unpack(">IIBBBBB", chunks[b"IHDR"]) == (30000, 30000, 8, 0, 0, 0, 0)
    assert len(zlib.decompress(chunks[b"IDAT"])) < 30001 * 30000 // 1000


@pytest.mark.parametrize(("kind", "content_type", "magic", "pil_format"), [
    ("gif", "image/gif", b"GIF89a", "GIF"),
    ("webp", "image/webp", b"RIFF", "WEBP"),
    ("jpeg", "image/jpeg", b"\xff\xd8\xff", "JPEG"),
])
def test_hostile_hosts_serve_tiny_images_in_other_formats(
        sim: Simulator, http: requests.Session, kind: str, content_type: str, magic: bytes,
        pil_format: str) -> None:
    response = http.get(sim.hostile_url(kind), timeout=5)
    assert (response.status_code, response.headers["Content-Type"]) == (200, content_type)
    body = response.content
    assert body.startswith(magic) and len(body) < 200
    if kind == "webp":
        assert body[8:16] == b"WEBPVP8L"
        assert struct.unpack("<I", body[4:8])[0] == len(body) - 8
    if kind == "jpeg":
        assert body.endswith(b"\xff\xd9")
    with Image.open(io.BytesIO(body)) as image:
        image.load()
        assert (image.format, image.size) == (pil_format, (1, 1))


def test_hostile_redirects(sim: Simulator, http: requests.Session) -> None:
    out = http.get(sim.hostile_url("redirect-out"), timeout=5, allow_redirects=False)
    assert (out.status_code, out.headers["Location"]) == (302, HOSTILE_REDIRECT_OUT)
    assert HOSTILE_REDIRECT_OUT == "http://evil.example.invalid/x.png"

    hop = http.get(sim.hostile_url("redirect-loop"), timeout=5, allow_redirects=False)
    assert (hop.status_code, hop.headers["Location"]) == (
        302, f"{sim.url}/hostile/redirect-loop/1")
    hop = http.get(hop.headers["Location"], timeout=5, allow_redirects=False)
    assert hop.headers["Location"] == f"{sim.url}/hostile/redirect-loop/2"
    http.max_redirects = 5
    with pytest.raises(requests.TooManyRedirects):
        http.get(sim.hostile_url("redirect-loop"), timeout=5)

    ok = http.get(sim.hostile_url("redirect-ok"), timeout=5)
    assert [r.status_code for r in ok.history] == [302]
    assert ok.history[0].headers["Location"] == f"{sim.url}/mmopen/{HOSTILE_OK_KEY}/0"
    assert (ok.status_code, ok.headers["Content-Type"]) == (200, "image/png")
    assert png_size(ok.content) == (640, 640)

    stats = sim.stats(detail=True)
    assert stats["hostile_requests"] == {"redirect-loop": 2 + 6, "redirect-ok": 1,
                                         "redirect-out": 1}
    assert stats["avatar_downloads_by_key"] == {HOSTILE_OK_KEY: 1}


def handler_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate()
            if "process_request_thread" in thread.name}


def test_the_endless_avatar_streams_until_the_client_hangs_up(sim: Simulator) -> None:
    before = handler_threads()
    with requests.get(sim.hostile_url("endless"), stream=True, timeout=5) as response:
        assert (response.status_code, response.headers["Content-Type"]) == (200, "image/png")
        assert "Content-Length" not in response.headers
        head = response.raw.read(256 * 1024)
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        assert head[8:] == bytes(len(head) - 8)
        (handler,) = handler_threads() - before
        assert handler.is_alive()  # still sending: 64 MiB cannot have fit in the socket buffers
    # Hanging up ends the sending thread (it would otherwise write, or spin, forever).
    handler.join(timeout=5)
    assert not handler.is_alive()
    assert sim.stats()["hostile_requests"] == {"endless": 1}


def test_the_endless_avatar_gives_up_after_its_cap(
        sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hostile.HOSTILE_ENDLESS_MAX_BYTES == 64 * 1024 * 1024
    monkeypatch.setattr(hostile, "HOSTILE_ENDLESS_MAX_BYTES", 1024 * 1024)
    with requests.get(sim.hostile_url("endless"), stream=True, timeout=5) as response:
        body = b"".join(response.iter_content(65536))  # ends when the server closes
    assert len(body) == 1024 * 1024
    assert body[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_slow_avatar_host_outlasts_a_short_timeout(
        sim: Simulator, http: requests.Session, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hostile.HOSTILE_SLOW_S == 5.0
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        http.get(sim.hostile_url("slow"), timeout=0.2)
    assert time.monotonic() - started < 2.0
    monkeypatch.setattr(hostile, "HOSTILE_SLOW_S", 0.0)  # read per request
    response = http.get(sim.hostile_url("slow"), timeout=5)
    assert response.headers["Content-Type"] == "image/png"
    assert png_size(response.content) == (46, 46)
    # stop() (the fixture's) abandons the stalled answer at once rather than after 5 s.


def test_hostile_hosts_are_not_api_calls_and_never_fail(
        make_sim: Callable[..., Simulator], http: requests.Session) -> None:
    sim = make_sim(failure_rates={"-1": 1.0})
    sim.force("userinfo", 45009, count=5)
    sim.set_avatar("o-user-0001", "face")
    quick = [kind for kind in HOSTILE_KINDS if kind not in ("endless", "slow")]
    statuses = {kind: http.get(sim.hostile_url(kind), timeout=5, allow_redirects=False
                               ).status_code for kind in quick}
    assert statuses == {kind: 302 if kind.startswith("redirect") else 200 for kind in quick}
    assert http.get(f"{sim.url}/mmopen/face/132", timeout=5).status_code == 200
    assert http.get(f"{sim.url}/hostile/nice/a.png", timeout=5).status_code == 404
    stats = sim.stats()
    assert stats["hostile_requests"] == dict.fromkeys(sorted(quick), 1)
    endpoints: dict[str, dict[str, Any]] = stats["endpoints"]  # type: ignore[assignment]
    assert all(figures["calls"] == 0 for figures in endpoints.values())
    access, _ = add_grant(sim)  # the forced answers are all still queued
    assert [errcode(userinfo(http, sim, access, "o-user-0001")) for _ in range(6)] == (
        [45009] * 5 + [-1])
    sim.reset_stats()
    assert sim.stats()["hostile_requests"] == {}


# -- quotas -----------------------------------------------------------------------------------


def test_a_quota_answers_45011_within_its_fixed_window(
        make_sim: Callable[..., Simulator], http: requests.Session, clock: Clock) -> None:
    sim = make_sim(quotas={"refresh": parse_quota("3/2 seconds")})
    _, refresh_token = add_grant(sim)
    _, other = add_grant(sim, "o-other", appid=OTHER_APPID)
    # Three calls at the end of one window, four at the start of the next.
    outcomes = []
    for at in (1.0, 1.5, 1.9, 2.0, 2.1, 2.2, 2.3):
        clock.now = T0 + at
        outcomes.append(errcode(refresh(http, sim, refresh_token)))
    assert outcomes == [0, 0, 0, 0, 0, 0, 45011]
    answer = call(http, sim, "/sns/oauth2/refresh_token", appid=OTHER_APPID,
                  grant_type="refresh_token", refresh_token=other)
    assert "access_token" in answer  # the quota is per app
    clock.now = T0 + 4.0
    assert errcode(refresh(http, sim, refresh_token)) == 0

    figures = sim.stats()["per_app"][APPID]["refresh"]  # type: ignore[index]
    assert figures == {
        "calls": 8, "ok": 7, "errors": {}, "quota_rejected": 1, "secret_sent": 0,
        "quota": 3, "window_s": 2.0,
        # Arrivals, rejected ones included: 4 in [T0+2, T0+4); 7 in [T0+1, T0+3).
        "max_fixed_window": 4, "max_sliding_window": 7,
    }
    totals = sim.stats()["endpoints"]["refresh"]  # type: ignore[index]
    assert (totals["calls"], totals["max_sliding_window"]) == (9, 7)


def test_endpoints_without_a_quota_measure_windows_of_60_s(
        sim: Simulator, http: requests.Session, clock: Clock) -> None:
    access, _ = add_grant(sim)
    for _ in range(3):
        auth(http, sim, access, "o-user-0001")
        clock.tick(30)
    figures = sim.stats()["endpoints"]["auth"]  # type: ignore[index]
    assert (figures["quota"], figures["window_s"], figures["max_sliding_window"]) == (None, None, 2)


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [45009, 45011, 40164, 40014, 50001, 50002, 41001])
def test_any_errcode_can_be_forced(sim: Simulator, http: requests.Session, code: int) -> None:
    _, refresh_token = add_grant(sim)
    sim.force("refresh", code)
    answer = refresh(http, sim, refresh_token)
    assert answer["errcode"] == code
    assert answer["errmsg"].startswith(ERRCODES[code].errmsg + ", rid: ")
    assert "access_token" in refresh(http, sim, refresh_token)


def test_forced_failure_kinds(sim: Simulator, http: requests.Session) -> None:
    access, _ = add_grant(sim)
    url = f"{sim.url}/sns/auth?access_token={access}&openid=o-user-0001"
    for kind in ("-1", "502", "truncated", "html"):
        sim.force("auth", kind)
    busy = http.get(url, timeout=5).json()
    assert busy["errcode"] == -1 and RID.fullmatch(busy["errmsg"].removeprefix("system error"))
    gateway = http.get(url, timeout=5)
    assert (gateway.status_code, gateway.headers["Content-Type"]) == (502, "text/html")
    truncated = http.get(url, timeout=5)
    assert (truncated.status_code, truncated.headers["Content-Type"]) == (200, "text/plain")
    assert '{"errcode":0,"errmsg":"ok"}'.startswith(truncated.text)
    with pytest.raises(json.JSONDecodeError):
        json.loads(truncated.text)
    page = http.get(url, timeout=5)
    assert (page.status_code, page.headers["Content-Type"]) == (200, "text/html")
    assert page.text.startswith("<!DOCTYPE html>")
    assert http.get(url, timeout=5).json()["errcode"] == 0
    errors = sim.stats()["endpoints"]["auth"]["errors"]  # type: ignore[index]
    assert errors == {"-1": 1, "502": 1, "truncated": 1, "html": 1}


def test_a_forced_timeout_stalls_then_closes(sim: Simulator, http: requests.Session) -> None:
    access, _ = add_grant(sim)
    sim.force("userinfo", "timeout")
    with pytest.raises(requests.exceptions.ReadTimeout):
        userinfo_url = f"{sim.url}/sns/userinfo"
        http.get(userinfo_url, params={"access_token": access, "openid": "o-user-0001"},
                 timeout=0.1)
    assert userinfo(http, sim, access, "o-user-0001")["openid"] == "o-user-0001"


def test_forced_answers_can_target_one_user_and_repeat(
        sim: Simulator, http: requests.Session) -> None:
    _, mine = add_grant(sim, "o-mine")
    _, theirs = add_grant(sim, "o-theirs")
    sim.force("refresh", 45009, count=2, openid="o-mine")
    assert errcode(refresh(http, sim, theirs)) == 0
    assert [errcode(refresh(http, sim, mine)) for _ in range(3)] == [45009, 45009, 0]
    with pytest.raises(ValueError, match="endpoint"):
        sim.force("token", -1)
    with pytest.raises(ValueError, match="errcode"):
        sim.force("refresh", "slow")


def test_random_failures_follow_their_rates(make_sim: Callable[..., Simulator],
                                            http: requests.Session) -> None:
    always = make_sim(failure_rates={"-1": 1.0})
    access, _ = add_grant(always)
    assert errcode(auth(http, always, access, "o-user-0001")) == -1
    sometimes = make_sim(failure_rates={"html": 0.5})
    add_grant(sometimes)
    kinds = [http.get(f"{sometimes.url}/sns/auth", timeout=5,
                      params={"access_token": access, "openid": "o-user-0001"}
                      ).headers["Content-Type"] for _ in range(40)]
    assert 5 < kinds.count("text/html") < 35
    with pytest.raises(ValueError):
        Simulator(failure_rates={"-1": 0.7, "502": 0.7})


# -- stats, latency, routing ------------------------------------------------------------------


def test_stats_add_up_and_never_hold_tokens(sim: Simulator, http: requests.Session) -> None:
    access, refresh_token = add_grant(sim)
    refresh(http, sim, refresh_token)
    refresh(http, sim, refresh_token)
    refresh(http, sim, "RT-nobody")
    auth(http, sim, access, "o-user-0001")
    stats = sim.stats(detail=True)
    endpoints: dict[str, dict[str, Any]] = stats["endpoints"]  # type: ignore[assignment]
    assert set(endpoints) == {"code", "refresh", "auth", "userinfo"}
    for figures in endpoints.values():
        assert figures["calls"] == (figures["ok"] + sum(figures["errors"].values())
                                    + figures["quota_rejected"])
    assert endpoints["refresh"]["errors"] == {"40030": 1}
    assert stats["refreshes_by_openid"] == {"o-user-0001": 2}
    assert access not in json.dumps(stats) and refresh_token not in json.dumps(stats)
    sim.reset_stats()
    assert sim.stats()["endpoints"]["refresh"]["calls"] == 0  # type: ignore[index]


def test_latency_is_added_to_each_answer(make_sim: Callable[..., Simulator],
                                         http: requests.Session) -> None:
    sim = make_sim(latency_s=0.05)
    started = time.monotonic()
    auth(http, sim, "AT-nobody", "o-1")
    assert time.monotonic() - started >= 0.05


def test_unknown_paths_get_a_404_page(sim: Simulator, http: requests.Session) -> None:
    for path in ("/", "/cgi-bin/token", "/mmopen/nobody/132", "/_sim/nothing"):
        assert http.get(sim.url + path, timeout=5).status_code == 404
    assert http.get(sim.url + "/", timeout=5).headers["Content-Type"] == "text/html"


@pytest.mark.parametrize(("text", "quota"), [
    ("50000/minute", SimQuota(50000, 60.0)),
    ("20/2 seconds", SimQuota(20, 2.0)),
    ("100/second", SimQuota(100, 1.0)),
    ("5/hour", SimQuota(5, 3600.0)),
    ("7/30", SimQuota(7, 30.0)),
])
def test_parse_quota(text: str, quota: SimQuota) -> None:
    assert parse_quota(text) == quota


@pytest.mark.parametrize("text", ["", "5", "5/fortnight", "0/minute", "x/minute", "5/0 s"])
def test_parse_quota_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_quota(text)


# -- admin API and the command ----------------------------------------------------------------


def test_the_admin_api_drives_a_simulator(make_sim: Callable[..., Simulator],
                                          http: requests.Session) -> None:
    sim = make_sim()
    admin = f"{sim.url}/_sim"
    assert http.get(f"{admin}/health", timeout=5).json() == {"ok": True}
    assert http.post(f"{admin}/apps", json={"appid": "wx-remote", "secret": "s"},
                     timeout=5).json() == {"ok": True}
    now = T0
    grants = [{"appid": "wx-remote", "openid": f"o-{i}", "access_token": f"AT-{i}",
               "refresh_token": f"RT-{i}", "access_expires_at": now + 3600,
               "refresh_issued_at": now - DAY_S, "unionid": None} for i in range(50_000)]
    # One request seeds a benchmark's 50,000 grants. No stopwatch here (a busy test machine
    # is no place for one): the request's own timeout still fails a seeding that went
    # quadratic, which would take minutes at this size.
    added = http.post(f"{admin}/grants", json={"grants": grants}, timeout=30)
    assert added.json() == {"added": 50_000}

    def remote_refresh(i: int) -> dict[str, Any]:
        return call(http, sim, "/sns/oauth2/refresh_token", appid="wx-remote",
                    grant_type="refresh_token", refresh_token=f"RT-{i}")

    assert remote_refresh(49_999)["openid"] == "o-49999"
    code = http.post(f"{admin}/codes", json={"appid": "wx-remote", "openid": "o-x"},
                     timeout=5).json()["code"]
    answer = exchange(http, sim, code, appid="wx-remote", secret="s")
    assert answer["openid"] == "o-x"
    http.post(f"{admin}/force", json={"endpoint": "refresh", "answer": 45011}, timeout=5)
    assert errcode(remote_refresh(1)) == 45011
    http.post(f"{admin}/avatar", json={"openid": "o-x", "image_key": None}, timeout=5)
    assert userinfo(http, sim, answer["access_token"], "o-x")["headimgurl"] == ""
    config = {"quotas": {"refresh": "2/minute"}, "latency_s": 0, "rotate_refresh_tokens": True}
    assert http.post(f"{admin}/config", json=config, timeout=5).json() == {"ok": True}
    assert remote_refresh(2)["refresh_token"] != "RT-2"
    remote_refresh(3)
    assert errcode(remote_refresh(4)) == 45011
    stats = http.get(f"{admin}/stats", params={"detail": "1"}, timeout=5).json()
    assert stats["per_app"]["wx-remote"]["refresh"]["quota"] == 2
    assert stats["refreshes_by_openid"]["o-2"] == 1
    http.post(f"{admin}/reset-stats", timeout=5)
    assert http.get(f"{admin}/stats", timeout=5).json()["per_app"] == {}
    bad = http.post(f"{admin}/force", json={"endpoint": "nope", "answer": 1}, timeout=5)
    assert bad.status_code == 400
    assert http.post(f"{admin}/grants", data=b"{not json", timeout=5).status_code == 400


#: For each admin POST: the field ``{}`` lacks (None: ``{}`` is a whole request), and a body
#: with a field of the wrong type, which the answer must name.
ADMIN_BAD_BODIES: dict[str, tuple[str | None, dict[str, Any], str]] = {
    "apps": ("appid", {"appid": 5, "secret": "s"}, "appid"),
    "grants": ("grants", {"grants": "all of them"}, "grants"),
    "codes": ("appid", {"appid": APPID, "openid": 7}, "openid"),
    "force": ("endpoint", {"endpoint": "refresh", "answer": 40030, "count": "2"}, "count"),
    "script": ("openid", {"openid": "o-1", "endpoint": "auth", "answer": [1]}, "answer"),
    "avatar": ("openid", {"openid": "o-1", "url": 5}, "url"),
    "config": (None, {"latency_s": "slow"}, "latency_s"),
    "reset-stats": (None, {"everything": True}, "everything"),
}


def test_the_admin_api_answers_a_bad_body_400_naming_what_is_wrong(
        sim: Simulator, http: requests.Session) -> None:
    admin = f"{sim.url}/_sim"
    for route, (missing, wrong, field) in ADMIN_BAD_BODIES.items():
        for body, named in ((b"{}", missing), (b"[1, 2]", ""), (b'"grants"', ""),
                            (b"{not json", ""), (b"\xff\xfe", ""),
                            (json.dumps(wrong).encode(), field)):
            r = http.post(f"{admin}/{route}", data=body, timeout=5,
                          headers={"Content-Type": "application/json"})
            if body == b"{}" and named is None:
                assert r.status_code == 200, (route, r.text)
                continue
            assert r.status_code == 400, (route, body, r.text)
            error = r.json()
            assert error["error"] == "bad_request" and error["detail"], (route, body, error)
            if named:
                assert error["detail"].startswith(f"{named}: "), (route, body, error)
            # Words for a person, not a Python exception.
            assert not re.search(r"[A-Z][a-z]+Error|Traceback|Exception", r.text), r.text
    # Inside a list of grants, the answer names the grant and its field; none is stored.
    good = {"appid": APPID, "openid": "o-ok", "access_token": "AT-ok", "refresh_token": "RT-ok",
            "access_expires_at": T0 + 3600, "refresh_issued_at": T0 - DAY_S}
    for bad, detail in (({k: v for k, v in good.items() if k != "openid"},
                         "grants[1].openid: required, a string"),
                        (good | {"access_expires_at": "soon"},
                         "grants[1].access_expires_at: expected a number (Unix seconds)"),
                        (good | {"state": "asleep"}, "grants[1].state: "),
                        (good | {"scope_": "x"}, "grants[1].scope_: unknown field"),
                        (7, "grants[1]: expected a grant object")):
        r = http.post(f"{admin}/grants", json={"grants": [good, bad]}, timeout=5)
        assert r.status_code == 400 and r.json()["detail"].startswith(detail), r.text
    assert sim.current_tokens() == {}
    # Values each route checks itself are 400s too, in the same form.
    for route, body in (("force", {"endpoint": "nope", "answer": 1}),
                        ("force", {"endpoint": "auth", "answer": 1, "count": 0}),
                        ("config", {"quotas": {"refresh": "lots"}}),
                        ("config", {"failure_rates": {"-1": 2}}),
                        ("avatar", {"openid": "o-1", "image_key": "no/slash"})):
        r = http.post(f"{admin}/{route}", json=body, timeout=5)
        assert r.status_code == 400 and r.json()["error"] == "bad_request", (route, r.text)
    assert http.post(f"{admin}/nothing", json={}, timeout=5).json()["error"] == "not_found"


@pytest.mark.e2e
def test_the_simulate_command_prints_its_url_and_stops_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "keeper.wechat.simulator", "--app", "wx-cli=s3cret",
         "--quota", "refresh=20/2 seconds", "--fail=-1=0", "--latency-ms", "1"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = json.loads(process.stdout.readline())["url"]
        assert url.startswith("http://127.0.0.1:")
        stats = requests.get(f"{url}/_sim/stats", timeout=5).json()
        assert (stats["endpoints"]["refresh"]["quota"],
                stats["endpoints"]["refresh"]["window_s"]) == (20, 2.0)
        answer = requests.get(f"{url}/sns/oauth2/refresh_token", timeout=5, params={
            "appid": "wx-cli", "grant_type": "refresh_token", "refresh_token": "RT-x"})
        assert answer.json()["errcode"] == 40030
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("argv", [["--host", "0.0.0.0"],  # noqa: S104 (must be refused)
                                  ["--host", "192.168.1.2"], ["--host", "example.com"],
                                  ["--quota", "refresh=lots"], ["--quota", "token=5/s"],
                                  ["--fail", "slow=0.1"], ["--app", "no-secret"],
                                  ["--script", "o-1:token:-1"], ["--script", "o-1:auth"],
                                  ["--script", "o-1:auth:profile_nul"],
                                  ["--script", "o-1:auth:nope"]])
def test_the_simulate_command_refuses_bad_options(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2


# -- WeChat as it answers today ---------------------------------------------------------------


def raw_call(http: requests.Session, sim: Simulator, endpoint: str,
             params: dict[str, str]) -> requests.Response:
    path = {"code": "/sns/oauth2/access_token", "refresh": "/sns/oauth2/refresh_token",
            "auth": "/sns/auth", "userinfo": "/sns/userinfo"}[endpoint]
    response = http.get(sim.url + path, params=params, timeout=5)
    assert response.status_code == 200
    return response


def test_profiles_come_with_sex_0_and_empty_region_by_default(
        sim: Simulator, http: requests.Session) -> None:
    access, _ = add_grant(sim, "o-user-1234", unionid="u-1234")
    answer = userinfo(http, sim, access, "o-user-1234")
    assert {k: answer[k] for k in ("sex", "province", "city", "country")} == {
        "sex": 0, "province": "", "city": "", "country": ""}
    assert answer["nickname"] == "user-r-1234" and answer["unionid"] == "u-1234"
    assert userinfo(http, sim, access, "o-user-1234", lang="en")["city"] == ""
    sim.configure(legacy_profiles=True)  # the whole simulator answers as before 2021
    assert userinfo(http, sim, access, "o-user-1234")["province"] == "广东"


def test_every_error_carries_a_rid_led_by_the_time(
        make_sim: Callable[..., Simulator], http: requests.Session) -> None:
    sim = make_sim(quotas={"refresh": parse_quota("1/minute")})
    answers = [refresh(http, sim, "RT-nobody"), refresh(http, sim, "RT-nobody"),
               auth(http, sim, "AT-nobody", "o-1"),
               exchange(http, sim, "no-such-code")]
    assert [errcode(a) for a in answers] == [40030, 45011, 40001, 40029]
    for answer in answers:
        text, rid = answer["errmsg"].split(", rid: ")
        assert text == ERRCODES[errcode(answer)].errmsg
        assert RID.fullmatch(", rid: " + rid) and int(rid[:8], 16) == int(T0)
    assert len({a["errmsg"] for a in answers}) == 4  # each request its own rid
    access, _ = add_grant(sim)
    assert auth(http, sim, access, "o-user-0001") == {"errcode": 0, "errmsg": "ok"}


def test_a_newer_grant_of_the_same_user_kills_the_older_tokens(
        sim: Simulator, http: requests.Session) -> None:
    old_access, old_refresh = add_grant(sim, "o-twice", unionid="u-twice")
    other_app = "RT-o-twice-2"  # the same user in another app: untouched by a login to this one
    add_grant(sim, "o-twice", appid=OTHER_APPID, access_token="AT-o-twice-2",
              refresh_token=other_app)
    sim.set_avatar("o-twice", "face")
    new = exchange(http, sim, sim.issue_code(appid=APPID, openid="o-twice", unionid="u-twice"))
    assert (new["openid"], new["scope"]) == ("o-twice", "snsapi_login")
    assert errcode(refresh(http, sim, old_refresh)) == 40030
    assert errcode(auth(http, sim, old_access, "o-twice")) == 40001
    assert refresh(http, sim, new["refresh_token"])["access_token"] == new["access_token"]
    assert userinfo(http, sim, new["access_token"], "o-twice")["headimgurl"].endswith(
        "/mmopen/face/132")  # still the same user
    assert sim.current_tokens()["o-twice"] in {(new["access_token"], new["refresh_token"]),
                                               ("AT-o-twice-2", other_app)}
    assert "access_token" in call(http, sim, "/sns/oauth2/refresh_token", appid=OTHER_APPID,
                                  grant_type="refresh_token", refresh_token=other_app)
    # A revoked user who logs in again is whole again; so is a grant added anew.
    _, revoked = add_grant(sim, "o-back", state="revoked")
    again = exchange(http, sim, sim.issue_code(appid=APPID, openid="o-back"))
    assert errcode(refresh(http, sim, revoked)) == 40030
    assert "access_token" in refresh(http, sim, again["refresh_token"])
    add_grant(sim, "o-back", refresh_token="RT-o-back-2")
    assert errcode(refresh(http, sim, again["refresh_token"])) == 40030


def test_errcodes_can_be_scripted_per_user_and_endpoint(
        sim: Simulator, http: requests.Session) -> None:
    access, refresh_token = add_grant(sim, "o-me")
    other_access, other_refresh = add_grant(sim, "o-you")
    params = {
        "code": {"appid": APPID, "secret": SECRET, "code": "c",
                 "grant_type": "authorization_code"},
        "refresh": {"appid": APPID, "grant_type": "refresh_token",
                    "refresh_token": refresh_token},
        "auth": {"access_token": access, "openid": "o-me"},
        "userinfo": {"access_token": access, "openid": "o-me"},
    }
    for endpoint in ("code", "refresh", "auth", "userinfo"):
        for code in ERRCODES:
            if endpoint == "code":
                params["code"]["code"] = sim.issue_code(appid=APPID, openid="o-me")
            sim.script("o-me", endpoint, code)
            if code in (40030, -1):
                sim.script("o-me", endpoint, f"errcode_{code}")  # the corpus name: the same
            for _ in range(2 if code in (40030, -1) else 1):
                answer = json.loads(raw_call(http, sim, endpoint, params[endpoint]).content)
                assert answer["errcode"] == code, (endpoint, code)
                assert RID.fullmatch(answer["errmsg"].removeprefix(ERRCODES[code].errmsg))
    # Nobody else was touched, and o-me's script is used up.
    assert "access_token" in refresh(http, sim, other_refresh)
    assert errcode(auth(http, sim, other_access, "o-you")) == 0
    assert "access_token" in refresh(http, sim, refresh_token)
    sim.script("o-me", "refresh", 50002, count=2)
    assert [errcode(refresh(http, sim, refresh_token)) for _ in range(3)] == [50002, 50002, 0]
    with pytest.raises(ValueError, match="ODD_ANSWERS"):
        sim.script("o-me", "refresh", "no-such-answer")
    with pytest.raises(ValueError, match="not 'refresh'"):
        sim.script("o-me", "refresh", "profile_nul")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f]")  # C0 but tab and newline
_PLACEHOLDER = re.compile(rb"\{[a-z_]+\}")


def cleaned(text: str) -> str:
    """The corpus's cleaning rule: lone surrogates become U+FFFD, C0 controls but tab and
    newline are removed."""
    return _CONTROL.sub("", "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch
                                    for ch in text))


def read_body(body: bytes) -> Any:
    """What a lenient client reads: UTF-8 (bad bytes replaced), raw control characters allowed."""
    return json.loads(body.decode("utf-8", "replace"), strict=False)


@pytest.mark.parametrize(("name", "endpoint"), [
    (answer.name, endpoint) for answer in ODD_ANSWERS for endpoint in answer.endpoints])
def test_every_odd_answer_is_served_as_written(
        make_sim: Callable[..., Simulator], http: requests.Session, name: str,
        endpoint: str) -> None:
    odd = ODD_BY_NAME[name]
    sim = make_sim(rotate_refresh_tokens=True)
    access, refresh_token = add_grant(sim, "o-odd", unionid="u-odd", access_in_s=0)
    fresh = refresh(http, sim, refresh_token)  # a live access token, a rotated refresh token
    access, refresh_token = fresh["access_token"], fresh["refresh_token"]
    code = sim.issue_code(appid=APPID, openid="o-odd", unionid="u-odd")
    params = {
        "code": {"appid": APPID, "secret": SECRET, "code": code,
                 "grant_type": "authorization_code"},
        "refresh": {"appid": APPID, "grant_type": "refresh_token",
                    "refresh_token": refresh_token},
        "auth": {"access_token": access, "openid": "o-odd"},
        "userinfo": {"access_token": access, "openid": "o-odd"},
    }[endpoint]
    sim.script("o-odd", endpoint, name)
    response = raw_call(http, sim, endpoint, params)
    assert response.headers["Content-Type"] == odd.content_type
    body = response.content
    assert not _PLACEHOLDER.search(body), body  # every placeholder filled
    assert sim.stats()["scripted_served"] == ({name: 1} if odd.errcode is None or not
                                              name.startswith("errcode_") else {})
    if odd.conclusion(endpoint) == "malformed" and not body.startswith(b"{"):
        return
    answer = read_body(body)
    assert isinstance(answer, dict)
    if odd.errcode is not None:
        assert answer["errcode"] == odd.errcode
        return
    if odd.expect in ("tokens", "profile"):
        assert answer["openid"] == "o-odd"
        # WeChat's refresh answer carries no unionid; the code's and the profile do.
        assert answer.get("unionid") == (None if endpoint == "refresh" else "u-odd")
    if odd.expect == "mismatch":
        assert answer["openid"] not in ("o-odd", "")
    if odd.expect == "profile":
        assert answer["headimgurl"].startswith(f"{sim.url}/mmopen/")
        for key, value in odd.fields.items():
            got = answer[key]
            assert (cleaned(got) if isinstance(got, str) and key != "sex" else int(got)) == value
    if odd.expect == "tokens":
        assert int(answer["expires_in"]) == 7200
        assert {k: int(answer[k]) for k in odd.fields} == odd.fields
        # Performed: the tokens in the body are the ones WeChat now holds.
        assert sim.current_tokens()["o-odd"] == (answer["access_token"], answer["refresh_token"])
        if endpoint == "refresh":
            assert answer["refresh_token"] != refresh_token  # rotated, and not lost
            assert errcode(refresh(http, sim, refresh_token)) == 40030
    elif endpoint == "refresh":
        # Not performed: the asker's stored tokens are still good.
        assert sim.current_tokens()["o-odd"] == (access, refresh_token)
        assert "access_token" in refresh(http, sim, refresh_token)
    if endpoint == "code":
        assert errcode(exchange(http, sim, code)) == 40163  # consumed all the same


def test_odd_profiles_hold_the_bytes_they_are_named_for(
        sim: Simulator, http: requests.Session) -> None:
    access, _ = add_grant(sim, "o-odd")
    bodies = {}
    for name in ("profile_control_chars", "profile_gbk_nickname", "profile_lone_surrogate",
                 "profile_nul", "profile_private_use", "profile_sex_as_string"):
        sim.script("o-odd", "userinfo", name)
        bodies[name] = raw_call(http, sim, "userinfo",
                                {"access_token": access, "openid": "o-odd"}).content
    control = bodies["profile_control_chars"]
    assert b'"nickname":"\x14' in control and b'"city":"\x08"' in control
    assert b"\xe5\xb9\xbf\n\xe4\xb8\x9c" in control  # 广\n东, a raw newline
    with pytest.raises(json.JSONDecodeError):
        json.loads(control)  # strict JSON refuses it
    assert "张三".encode("gbk") in bodies["profile_gbk_nickname"]
    with pytest.raises(UnicodeDecodeError):
        bodies["profile_gbk_nickname"].decode("utf-8")
    surrogate = json.loads(bodies["profile_lone_surrogate"])["nickname"]
    assert surrogate == "小明\ud83d"
    with pytest.raises(UnicodeEncodeError):
        surrogate.encode("utf-8")
    assert json.loads(bodies["profile_nul"])["nickname"] == "小\x00明"
    assert json.loads(bodies["profile_private_use"])["nickname"] == "\ue412小明\ue056"
    assert json.loads(bodies["profile_sex_as_string"])["sex"] == "1"
    assert sim.stats(detail=True)["userinfo_by_openid"] == {"o-odd": 6}  # all performed


def test_a_scripted_answer_that_performs_gives_the_real_error_when_the_call_fails(
        sim: Simulator, http: requests.Session) -> None:
    _, refresh_token = add_grant(sim, "o-late", refresh_age_s=31 * DAY_S)
    sim.script("o-late", "refresh", "tokens_application_json")
    assert errcode(refresh(http, sim, refresh_token)) == 42002
    assert sim.stats()["scripted_served"] == {"tokens_application_json": 1}


def test_every_corpus_entry_says_where_it_comes_from() -> None:
    endpoints = {"code", "refresh", "auth", "userinfo"}
    conclusions = {"tokens", "profile", "valid", "malformed", "mismatch", "transient", "quota",
                   "config", "app_banned", "bug", "login_again", "reauth", "refresh_access",
                   "stop_token", "no_profile", "profile_refused", "unknown"}
    for odd in ODD_ANSWERS:
        assert odd.source and set(odd.endpoints) <= endpoints, odd.name
        assert {odd.conclusion(e) for e in odd.endpoints} <= conclusions, odd.name
        assert odd.name not in FAILURE_KINDS
        if odd.expect == "reauth":
            assert odd.fields["reason"] in ("refresh_token_invalid", "refresh_token_expired",
                                            "authorization_revoked")
    table = {40030, 42002, 42007, 40029, 40163, 42003, 40003, 48001, 50001, 50002, 40013,
             40125, 40164, 48004, 45009, 45011, -1, 40002, 40035, 40097, 40001, 40014, 42001,
             *range(41001, 41010)}
    assert table < set(ERRCODES)  # and one unknown code
    assert {f"errcode_{code}" for code in ERRCODES} <= set(ODD_BY_NAME)


def test_the_admin_api_lists_and_scripts_odd_answers(
        sim: Simulator, http: requests.Session) -> None:
    admin = f"{sim.url}/_sim"
    listed = http.get(f"{admin}/answers", timeout=5).json()["answers"]
    assert [entry["name"] for entry in listed] == [odd.name for odd in ODD_ANSWERS]
    control = next(entry for entry in listed if entry["name"] == "profile_control_chars")
    assert control["endpoints"] == ["userinfo"] and control["expect"] == "profile"
    assert "\\x14" in control["body"] or "\x14" in control["body"]
    access, refresh_token = add_grant(sim, "o-remote")
    assert http.post(f"{admin}/script", json={"openid": "o-remote", "endpoint": "refresh",
                                              "answer": 42007, "count": 2},
                     timeout=5).json() == {"ok": True}
    assert [errcode(refresh(http, sim, refresh_token)) for _ in range(3)] == [42007, 42007, 0]
    http.post(f"{admin}/script", json={"openid": "o-remote", "endpoint": "auth",
                                       "answer": "auth_empty_object"}, timeout=5)
    assert auth(http, sim, access, "o-remote") == {}
    bad = http.post(f"{admin}/script", json={"openid": "o-remote", "endpoint": "auth",
                                             "answer": "nope"}, timeout=5)
    assert bad.status_code == 400 and "ODD_ANSWERS" in bad.json()["detail"]
    code = http.post(f"{admin}/codes", json={"appid": APPID, "openid": "o-old",
                                             "legacy_profile": True}, timeout=5).json()["code"]
    grant = exchange(http, sim, code)
    assert userinfo(http, sim, grant["access_token"], "o-old")["city"] == "深圳"


@pytest.mark.e2e
def test_the_simulate_command_lists_the_corpus() -> None:
    listed = subprocess.run([sys.executable, "-m", "keeper.wechat.simulator", "--list-answers"],
                            cwd=REPO, capture_output=True, text=True, check=True, timeout=60)
    names = [json.loads(line)["name"] for line in listed.stdout.splitlines()]
    assert names == [odd.name for odd in ODD_ANSWERS]


@pytest.mark.e2e
def test_the_simulate_command_scripts_answers() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "keeper.wechat.simulator", "--app", "wx-cli=s3cret",
         "--script", "o:1:refresh:-1:2", "--script", "o:1:userinfo:profile_nul",
         "--legacy-profiles"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = json.loads(process.stdout.readline())["url"]
        grant = {"appid": "wx-cli", "openid": "o:1", "access_token": "AT-x",
                 "refresh_token": "RT-x", "access_expires_at": time.time() + 3600,
                 "refresh_issued_at": time.time()}
        requests.post(f"{url}/_sim/grants", json={"grants": [grant]}, timeout=5)
        params = {"appid": "wx-cli", "grant_type": "refresh_token", "refresh_token": "RT-x"}
        codes = [requests.get(f"{url}/sns/oauth2/refresh_token", params=params, timeout=5
                              ).json().get("errcode", 0) for _ in range(3)]
        assert codes == [-1, -1, 0]
        profile = json.loads(requests.get(f"{url}/sns/userinfo", timeout=5, params={
            "access_token": "AT-x", "openid": "o:1"}).content)
        assert profile["nickname"] == "小\x00明" and profile["sex"] == 0  # the body as written
        legacy = json.loads(requests.get(f"{url}/sns/userinfo", timeout=5, params={
            "access_token": "AT-x", "openid": "o:1"}).content)
        assert (legacy["sex"], legacy["city"]) == (1, "深圳")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        process.kill()
        process.wait()
